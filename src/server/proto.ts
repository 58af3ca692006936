/**
 * The public API protos, loaded once. Every .proto under protos/ (vcpud.v1 and the vendored google.rpc)
 * goes through proto-loader with the options scripts/gen-proto-types.sh generated src/server/generated/
 * for, so the handler and client types there describe exactly the objects grpc-js hands us.
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
import type { ProtoGrpcType as SnapshotProtoGrpcType } from './generated/snapshot';
import type { ProtoGrpcType as StateProtoGrpcType } from './generated/state';
import type { ProtoGrpcType as VmProtoGrpcType } from './generated/vm';
import type { MigrationServiceDefinition } from './generated/vcpud/v1/MigrationService';
import type { SnapshotServiceDefinition } from './generated/vcpud/v1/SnapshotService';
import type { VcpuStateServiceDefinition } from './generated/vcpud/v1/VcpuStateService';
import type { VmServiceDefinition } from './generated/vcpud/v1/VmService';
import { passPreserialized } from './preserialized';
import { wireSerializer } from './wire-encoder';

/** The typed grpc object of vcpud.v1: the services, their messages and enums. */
export type VcpudProtoGrpcType = StateProtoGrpcType & VmProtoGrpcType & SnapshotProtoGrpcType & MigrationProtoGrpcType;

/** Fully qualified names of the services vcpud serves (health status keys, metrics labels). */
export const SERVICE_NAMES = {
  VcpuStateService: 'vcpud.v1.VcpuStateService',
  VmService: 'vcpud.v1.VmService',
  SnapshotService: 'vcpud.v1.SnapshotService',
  MigrationService: 'vcpud.v1.MigrationService',
} as const;

export interface VcpudServiceDefinitions {
  VcpuStateService: VcpuStateServiceDefinition;
  VmService: VmServiceDefinition;
  SnapshotService: SnapshotServiceDefinition;
  MigrationService: MigrationServiceDefinition;
}

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

let serviceDefinitions: VcpudServiceDefinitions | undefined;

/**
 * The service definitions to pass to server.addService. GetState's response, the hot path of checkpoint
 * loops, arrives already serialized (convert/raw-state.ts) or is written by the wire encoder
 * (src/server/wire-encoder.ts) instead of protobufjs; every other method keeps proto-loader's serializers.
 */
export function vcpudServiceDefinitions(): VcpudServiceDefinitions {
  if (!serviceDefinitions) {
    const v1 = vcpudProto().vcpud.v1;
    const state = v1.VcpuStateService.service;
    // The handler answers with Preserialized bytes (convert/raw-state.ts); anything else goes through the wire encoder.
    const getState = { ...state.GetState, responseSerialize: passPreserialized(wireSerializer(vcpudPackageDefinition(), 'vcpud.v1.GetStateResponse')) };
    serviceDefinitions = {
      VcpuStateService: { ...state, GetState: getState },
      VmService: v1.VmService.service,
      // CreateSnapshot's data messages are sent pre-serialized (snapshot-service.ts streamData).
      SnapshotService: passingPreserialized(v1.SnapshotService.service, 'CreateSnapshot'),
      MigrationService: v1.MigrationService.service,
    };
  }
  return serviceDefinitions;
}

/** `service` with `method`'s responses passed through when they are already serialized (preserialized.ts). */
function passingPreserialized<S extends grpc.ServiceDefinition, M extends keyof S & string>(service: S, method: M): S {
  return { ...service, [method]: { ...service[method], responseSerialize: passPreserialized(service[method].responseSerialize) } };
}
