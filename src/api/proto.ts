/**
 * The public API protos, loaded once. Every .proto under protos/ (vcpud.v1 and the vendored google.rpc)
 * goes through proto-loader with the options scripts/gen-proto-types.sh generated src/api/generated/
 * for, so the handler and client types there describe exactly the objects grpc-js hands us.
 * Shared by the server and vcpuctl (src/api/ imports nothing from src/server, src/cli or src/vm).
 *
 * Loading is lazy (first call) and memoized: importing this module costs nothing, and every caller
 * shares one package definition (reflection needs the same descriptors the services were built from).
 */
import fs from 'node:fs';
import path from 'node:path';
import { packageRoot } from '../package';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import type { ProtoGrpcType as MigrationProtoGrpcType } from './generated/migration';
import { boundStringReads } from './bounded-string-reads';
import type { ProtoGrpcType as SnapshotProtoGrpcType } from './generated/snapshot';
import type { ProtoGrpcType as StateProtoGrpcType } from './generated/state';
import type { ProtoGrpcType as VmProtoGrpcType } from './generated/vm';

/** The typed grpc object of vcpud.v1: the services, their messages and enums. */
export type VcpudProtoGrpcType = StateProtoGrpcType & VmProtoGrpcType & SnapshotProtoGrpcType & MigrationProtoGrpcType;

/** Fully qualified names of the services vcpud serves (health status keys, metrics labels). */
export const SERVICE_NAMES = {
  VcpuStateService: 'vcpud.v1.VcpuStateService',
  VmService: 'vcpud.v1.VmService',
  SnapshotService: 'vcpud.v1.SnapshotService',
  MigrationService: 'vcpud.v1.MigrationService',
} as const;

/** The protos/ directory shipped with the package (it is the include root of every import). */
export function protosDir(): string {
  return path.join(packageRoot(), 'protos');
}

/** Options the server and the generated types agree on; see test/unit/protos.test.ts. */
export function protoLoaderOptions(): protoLoader.Options {
  return { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [protosDir()] };
}

/** Every .proto under protos/, as paths relative to it (the form imports use), sorted for stable output. */
export function protoFiles(): string[] {
  const root = protosDir();
  const walk = (dir: string): string[] =>
    fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
      const full = path.join(dir, e.name);
      if (e.isDirectory()) return walk(full);
      return e.name.endsWith('.proto') ? [path.relative(root, full)] : [];
    });
  return walk(root).sort();
}

let loaded: { definition: protoLoader.PackageDefinition; grpcObject: VcpudProtoGrpcType } | undefined;

function load() {
  if (!loaded) {
    boundStringReads(); // before anything is decoded with these definitions
    const definition = protoLoader.loadSync(protoFiles(), protoLoaderOptions());
    // loadPackageDefinition returns an untyped GrpcObject; the generated ProtoGrpcType describes it.
    const grpcObject = grpc.loadPackageDefinition(definition) as unknown as VcpudProtoGrpcType;
    loaded = { definition, grpcObject };
  }
  return loaded;
}

/** The proto-loader package definition of every vcpud proto (what reflection describes). */
export function vcpudPackageDefinition(): protoLoader.PackageDefinition {
  return load().definition;
}

/** The typed grpc object: vcpudProto().vcpud.v1.VmService is a client constructor with `.service`. */
export function vcpudProto(): VcpudProtoGrpcType {
  return load().grpcObject;
}
