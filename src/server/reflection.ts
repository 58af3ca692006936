/**
 * gRPC server reflection (grpc.reflection.v1 and v1alpha) from the real descriptors: the
 * FileDescriptorSet scripts/build-descriptors.sh compiles from protos/ at build time. Files are served
 * byte for byte as buf produced them, so a strict descriptor pool (grpcurl, grpc_cli, Python, Go) finds
 * real file names (vcpud/v1/state.proto), snake_case fields, map entries named FooEntry, comments, and a
 * `dependency` list for every import. Every answer carries the file and all it depends on.
 *
 * Why not @grpc/reflection: it serves what protobufjs synthesizes from proto-loader's definition (made-up
 * file names, camelCase fields, no dependencies), which strict pools reject.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { Reader, Writer } from 'protobufjs';
import { FileDescriptorProto, type IDescriptorProto, type IEnumDescriptorProto, type IFileDescriptorProto } from 'protobufjs/ext/descriptor';
import { packageRoot } from '../package';

/** Where the build puts the descriptor set (scripts/build-descriptors.sh; shipped with dist/src). */
export function descriptorSetPath(): string {
  return path.join(packageRoot(), 'dist', 'src', 'descriptor-set.binpb');
}

const LENGTH_DELIMITED = 2;

/** The top-level fields of a message: number, raw bytes (tag included) and, if length-delimited, the payload. */
function rawFields(message: Uint8Array): { field: number; raw: Uint8Array; payload?: Uint8Array }[] {
  const reader = Reader.create(message);
  const fields: { field: number; raw: Uint8Array; payload?: Uint8Array }[] = [];
  while (reader.pos < reader.len) {
    const start = reader.pos;
    const tag = reader.uint32();
    let payload: Uint8Array | undefined;
    if ((tag & 7) === LENGTH_DELIMITED) payload = reader.bytes();
    else reader.skipType(tag & 7);
    fields.push({ field: tag >>> 3, raw: message.subarray(start, reader.pos), payload });
  }
  return fields;
}

/** The FileDescriptorProtos of a FileDescriptorSet (field 1, repeated), each as its original bytes. */
export function splitFileDescriptorSet(set: Uint8Array): Uint8Array[] {
  return rawFields(set).flatMap((f) => (f.field === 1 && f.payload ? [f.payload] : []));
}

const SOURCE_CODE_INFO = 9;

/** A FileDescriptorProto without its comments and spans: what indexing and the service definitions need (decoding them is most of the cost). */
function withoutSourceInfo(file: Uint8Array): Uint8Array {
  return Buffer.concat(rawFields(file).flatMap((f) => (f.field === SOURCE_CODE_INFO ? [] : [f.raw])));
}

/** The built descriptor set, or an error saying how to produce it. */
export function readDescriptorSet(file: string = descriptorSetPath()): Uint8Array {
  try {
    return fs.readFileSync(file);
  } catch (e) {
    throw new Error(`server reflection needs ${file} (${(e as Error).message}): build it with npm run build or bash scripts/build-descriptors.sh`);
  }
}

interface IndexedFile {
  bytes: Uint8Array;
  dependency: string[];
}

/** Files by name, and the file that declares each fully qualified symbol or extension. */
export class DescriptorIndex {
  private readonly files = new Map<string, IndexedFile>();
  private readonly symbols = new Map<string, string>();
  /** extendee -> field number -> file name. */
  private readonly extensions = new Map<string, Map<number, string>>();

  /** Adds files; a file name or symbol already known keeps its first definition (the real descriptors go first). */
  add(files: Uint8Array[]): this {
    for (const bytes of files) {
      const proto = FileDescriptorProto.decode(withoutSourceInfo(bytes)) as IFileDescriptorProto;
      const name = proto.name ?? '';
      if (this.files.has(name)) continue;
      this.files.set(name, { bytes, dependency: (proto.dependency as string[] | undefined) ?? [] });
      this.indexFile(name, proto);
    }
    return this;
  }

  private symbol(fqn: string, file: string): void {
    if (!this.symbols.has(fqn)) this.symbols.set(fqn, file);
  }

  private indexFile(file: string, proto: IFileDescriptorProto): void {
    const scope = proto.package ? `${proto.package}.` : '';
    for (const m of proto.messageType ?? []) this.indexMessage(file, scope, m);
    for (const e of proto.enumType ?? []) this.indexEnum(file, scope, e);
    for (const s of proto.service ?? []) {
      this.symbol(scope + s.name, file);
      for (const m of s.method ?? []) this.symbol(`${scope}${s.name}.${m.name}`, file);
    }
    this.indexExtensions(file, scope, proto.extension ?? []);
  }

  private indexMessage(file: string, scope: string, m: IDescriptorProto): void {
    const fqn = scope + m.name;
    this.symbol(fqn, file);
    for (const f of m.field ?? []) this.symbol(`${fqn}.${f.name}`, file);
    for (const o of m.oneofDecl ?? []) this.symbol(`${fqn}.${o.name}`, file);
    for (const n of m.nestedType ?? []) this.indexMessage(file, `${fqn}.`, n);
    for (const e of m.enumType ?? []) this.indexEnum(file, `${fqn}.`, e);
    this.indexExtensions(file, `${fqn}.`, m.extension ?? []);
  }

  /** Enum values are siblings of their enum in protobuf's naming (C++ scoping). */
  private indexEnum(file: string, scope: string, e: IEnumDescriptorProto): void {
    this.symbol(scope + e.name, file);
    for (const v of e.value ?? []) this.symbol(scope + v.name, file);
  }

  private indexExtensions(file: string, scope: string, fields: NonNullable<IFileDescriptorProto['extension']>): void {
    for (const f of fields) {
      this.symbol(scope + f.name, file);
      const extendee = (f.extendee ?? '').replace(/^\./, '');
      if (!this.extensions.has(extendee)) this.extensions.set(extendee, new Map());
      this.extensions.get(extendee)?.set(f.number ?? 0, file);
    }
  }

  fileNames(): string[] {
    return [...this.files.keys()];
  }

  /** The file then everything it imports, transitively, each once; undefined for an unknown name. */
  fileWithDependencies(name: string): Uint8Array[] | undefined {
    if (!this.files.has(name)) return undefined;
    const seen = new Set<string>();
    const visit = (n: string) => {
      if (seen.has(n)) return;
      seen.add(n);
      for (const d of this.files.get(n)?.dependency ?? []) visit(d);
    };
    visit(name);
    // A dependency missing from the set would make a strict pool fail later; the build test guards it.
    return [...seen].flatMap((n) => this.files.get(n)?.bytes ?? []);
  }

  fileOfSymbol(fqn: string): string | undefined {
    return this.symbols.get(fqn);
  }

  fileOfExtension(extendee: string, field: number): string | undefined {
    return this.extensions.get(extendee)?.get(field);
  }

  extensionNumbers(extendee: string): number[] | undefined {
    const m = this.extensions.get(extendee);
    return m && [...m.keys()].sort((a, b) => a - b);
  }
}

/** A ServerReflectionRequest as proto-loader hands it over with keepCase and oneofs. */
interface ReflectionRequest {
  host?: string;
  message_request?: 'file_by_filename' | 'file_containing_symbol' | 'file_containing_extension' | 'all_extension_numbers_of_type' | 'list_services';
  file_by_filename?: string;
  file_containing_symbol?: string;
  file_containing_extension?: { containing_type?: string; extension_number?: number };
  all_extension_numbers_of_type?: string;
}

/** Answers one request; what was asked for and not found is NOT_FOUND in error_response, as the protocol says. */
export function answerReflection(index: DescriptorIndex, services: string[], req: ReflectionRequest): Record<string, unknown> {
  const base = { valid_host: req.host ?? '', original_request: req };
  const notFound = (what: string) => ({ ...base, error_response: { error_code: grpc.status.NOT_FOUND, error_message: `${what} not found` } });
  const files = (name: string | undefined, what: string) => {
    const found = name === undefined ? undefined : index.fileWithDependencies(name);
    return found ? { ...base, file_descriptor_response: { file_descriptor_proto: found } } : notFound(what);
  };
  switch (req.message_request) {
    case 'list_services':
      return { ...base, list_services_response: { service: services.map((name) => ({ name })) } };
    case 'file_by_filename':
      return files(req.file_by_filename, `file ${JSON.stringify(req.file_by_filename)}`);
    case 'file_containing_symbol': {
      const symbol = (req.file_containing_symbol ?? '').replace(/^\./, '');
      return files(index.fileOfSymbol(symbol), `symbol ${JSON.stringify(symbol)}`);
    }
    case 'file_containing_extension': {
      const { containing_type: type = '', extension_number: number = 0 } = req.file_containing_extension ?? {};
      return files(index.fileOfExtension(type, number), `extension ${number} of ${JSON.stringify(type)}`);
    }
    case 'all_extension_numbers_of_type': {
      const type = req.all_extension_numbers_of_type ?? '';
      const numbers = index.extensionNumbers(type);
      return numbers
        ? { ...base, all_extension_numbers_response: { base_type_name: type, extension_number: numbers } }
        : notFound(`extensions of ${JSON.stringify(type)}`);
    }
    default:
      return { ...base, error_response: { error_code: grpc.status.INVALID_ARGUMENT, error_message: 'ServerReflectionRequest sets no message_request' } };
  }
}

export const REFLECTION_SERVICES = ['grpc.reflection.v1.ServerReflection', 'grpc.reflection.v1alpha.ServerReflection'];

/** A FileDescriptorSet of `files`, comments left out. */
function descriptorSet(files: Uint8Array[]): Buffer {
  const w = Writer.create();
  for (const f of files) w.uint32((1 << 3) | LENGTH_DELIMITED).bytes(withoutSourceInfo(f));
  return Buffer.from(w.finish());
}

/**
 * Adds both reflection versions to `server`, answering from `index` and listing `services`. Their grpc-js
 * definitions come from the indexed files too (v1alpha has v1's messages under another package).
 */
export function addReflection(server: grpc.Server, index: DescriptorIndex, services: string[]): void {
  const files = REFLECTION_SERVICES.flatMap((s) => index.fileWithDependencies(index.fileOfSymbol(s) ?? '') ?? []);
  const definitions = protoLoader.loadFileDescriptorSetFromBuffer(descriptorSet(files), { keepCase: true, oneofs: true, longs: Number });
  for (const name of REFLECTION_SERVICES) {
    server.addService(definitions[name] as grpc.ServiceDefinition, {
      ServerReflectionInfo: (stream: grpc.ServerDuplexStream<ReflectionRequest, Record<string, unknown>>) => {
        stream.on('data', (req: ReflectionRequest) => stream.write(answerReflection(index, services, req)));
        stream.on('end', () => stream.end());
        stream.on('error', () => {}); // a client that goes away mid-stream is not a server error
      },
    });
  }
}
