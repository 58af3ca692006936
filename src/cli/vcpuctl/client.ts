/**
 * vcpuctl's connection to vcpud: the protos (loaded with the options the server and the generated
 * types use), the server address and credentials, promisified calls that each carry the deadline,
 * and decoding of the google.rpc.Status trailer of errors.
 *
 * The protos come from src/api/proto (no native addon is loaded by it), so the CLI and the
 * server read exactly the same definitions.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import type { VcpuStateServiceClient } from '../../api/generated/vcpud/v1/VcpuStateService';
import type { VmServiceClient } from '../../api/generated/vcpud/v1/VmService';
import type { GetCapabilitiesResponse__Output } from '../../api/generated/vcpud/v1/GetCapabilitiesResponse';
import type { GetStateRequest } from '../../api/generated/vcpud/v1/GetStateRequest';
import type { GetStateResponse__Output } from '../../api/generated/vcpud/v1/GetStateResponse';
import type { SetStateRequest } from '../../api/generated/vcpud/v1/SetStateRequest';
import type { SetStateResponse__Output } from '../../api/generated/vcpud/v1/SetStateResponse';
import type { GetNestedStateRequest } from '../../api/generated/vcpud/v1/GetNestedStateRequest';
import type { GetNestedStateResponse__Output } from '../../api/generated/vcpud/v1/GetNestedStateResponse';
import type { SetNestedStateRequest } from '../../api/generated/vcpud/v1/SetNestedStateRequest';
import type { SetNestedStateResponse__Output } from '../../api/generated/vcpud/v1/SetNestedStateResponse';
import type { CreateVmRequest } from '../../api/generated/vcpud/v1/CreateVmRequest';
import type { CreateVmResponse__Output } from '../../api/generated/vcpud/v1/CreateVmResponse';
import type { GetVmResponse__Output } from '../../api/generated/vcpud/v1/GetVmResponse';
import type { ListVmsRequest } from '../../api/generated/vcpud/v1/ListVmsRequest';
import type { ListVmsResponse__Output } from '../../api/generated/vcpud/v1/ListVmsResponse';
import type { MergeSnapshotResponse__Output } from '../../api/generated/vcpud/v1/MergeSnapshotResponse';
import type { DeleteVmResponse__Output } from '../../api/generated/vcpud/v1/DeleteVmResponse';
import type { WriteMemoryRequest } from '../../api/generated/vcpud/v1/WriteMemoryRequest';
import type { WriteMemoryResponse__Output } from '../../api/generated/vcpud/v1/WriteMemoryResponse';
import type { ReadMemoryRequest } from '../../api/generated/vcpud/v1/ReadMemoryRequest';
import type { LoadProgramRequest } from '../../api/generated/vcpud/v1/LoadProgramRequest';
import type { LoadProgramResponse__Output } from '../../api/generated/vcpud/v1/LoadProgramResponse';
import type { RunVmResponse__Output } from '../../api/generated/vcpud/v1/RunVmResponse';
import type { PauseVmResponse__Output } from '../../api/generated/vcpud/v1/PauseVmResponse';
import type { ResumeVmResponse__Output } from '../../api/generated/vcpud/v1/ResumeVmResponse';
import type { RunVcpuResponse__Output } from '../../api/generated/vcpud/v1/RunVcpuResponse';
import type { PauseVcpuResponse__Output } from '../../api/generated/vcpud/v1/PauseVcpuResponse';
import type { ResumeVcpuResponse__Output } from '../../api/generated/vcpud/v1/ResumeVcpuResponse';
import type { StreamConsoleRequest } from '../../api/generated/vcpud/v1/StreamConsoleRequest';
import type { StreamConsoleResponse__Output } from '../../api/generated/vcpud/v1/StreamConsoleResponse';
import type { SnapshotServiceClient } from '../../api/generated/vcpud/v1/SnapshotService';
import type { CreateSnapshotRequest } from '../../api/generated/vcpud/v1/CreateSnapshotRequest';
import type { CreateSnapshotResponse__Output } from '../../api/generated/vcpud/v1/CreateSnapshotResponse';
import type { RestoreSnapshotRequest } from '../../api/generated/vcpud/v1/RestoreSnapshotRequest';
import type { RestoreSnapshotResponse__Output } from '../../api/generated/vcpud/v1/RestoreSnapshotResponse';
import type { RestoreSnapshotStreamRequest } from '../../api/generated/vcpud/v1/RestoreSnapshotStreamRequest';
import { passPreserialized, type Preserialized } from '../../api/preserialized';
import type { RestoreSnapshotStreamResponse__Output } from '../../api/generated/vcpud/v1/RestoreSnapshotStreamResponse';
import type { ListSnapshotsRequest } from '../../api/generated/vcpud/v1/ListSnapshotsRequest';
import type { ListSnapshotsResponse__Output } from '../../api/generated/vcpud/v1/ListSnapshotsResponse';
import type { DeleteSnapshotResponse__Output } from '../../api/generated/vcpud/v1/DeleteSnapshotResponse';
import type { MigrateVmRequest } from '../../api/generated/vcpud/v1/MigrateVmRequest';
import type { MigrateVmResponse__Output } from '../../api/generated/vcpud/v1/MigrateVmResponse';
import { protoFiles, protosDir, vcpudProto } from '../../api/proto';
import { DEFAULT_SOCKET_RULE, ROOT_RUNTIME_DIR, SOCKET_NAME, defaultSocketAddress, unixSocketPath } from '../../address';
import { UsageError } from './args';
import { readInputFile } from './input-file';

/** Loads every vcpud proto once (the server's loader: same files, same options as the generated types). */
export const loadVcpudProto = vcpudProto;

let pbRoot: protobuf.Root | undefined;

/**
 * The same protos as a protobufjs Root (camelCase field names like proto-loader with keepCase false):
 * binary VcpuState files, schema-driven --set edits and the google.rpc error details.
 */
export function protobufRoot(): protobuf.Root {
  if (!pbRoot) {
    const dir = protosDir();
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) => (path.isAbsolute(target) ? target : path.join(dir, target));
    root.loadSync(protoFiles(), { keepCase: false });
    root.resolveAll();
    pbRoot = root;
  }
  return pbRoot;
}

export function messageType(name: string): protobuf.Type {
  return protobufRoot().lookupType(name);
}

// ---------------------------------------------------------------------------------------------
// Address and credentials

/** The server vcpuctl talks to, and where that choice came from (named when it cannot be reached). */
export interface ServerChoice {
  address: string;
  source: string;
}

/**
 * The default server: $VCPUD_ADDR, else vcpud's own default socket for this user (src/address.ts);
 * when that socket does not exist but a root vcpud's does (/run/vcpud/vcpud.sock), that one.
 */
export function defaultServer(env: NodeJS.ProcessEnv = process.env, exists: (p: string) => boolean = fs.existsSync): ServerChoice {
  if (env.VCPUD_ADDR) return { address: env.VCPUD_ADDR, source: 'from $VCPUD_ADDR' };
  const own = defaultSocketAddress(env);
  const system = `unix:${path.join(ROOT_RUNTIME_DIR, SOCKET_NAME)}`;
  if (own !== system && !exists(own.slice('unix:'.length)) && exists(system.slice('unix:'.length)))
    return { address: system, source: "a root vcpud's socket: vcpuctl's default had none" };
  return { address: own, source: `vcpuctl's default: ${DEFAULT_SOCKET_RULE}` };
}

export interface ConnectOptions {
  /** unix:PATH or a path (relative ones resolve against cwd), or host:port. */
  server: string;
  /** Where `server` came from (--server, $VCPUD_ADDR, the default): named when it cannot be reached. */
  serverSource?: string;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  /** Override the name checked against the server certificate. */
  tlsServerName?: string;
  insecure?: boolean;
  /** Deadline of every call in ms; 0 = none. */
  timeoutMs: number;
  cwd?: string;
}

export interface Target {
  kind: 'unix' | 'tcp';
  /** What grpc-js dials. */
  address: string;
}

/** Where `server` (given as `flag`) points: a socket path becomes unix:/abs/path, relative to `cwd`. */
export function resolveTarget(server: string, cwd: string = process.cwd(), flag = '--server'): Target {
  if (!server.trim()) throw new UsageError(`${flag}: empty address`);
  let socket: string | undefined;
  try {
    socket = unixSocketPath(server, cwd);
  } catch (e) {
    throw new UsageError(`${flag} ${server}: ${(e as Error).message}`);
  }
  // Anything else goes to grpc-js as given (host:port, or its own dns:/ipv4: forms).
  return socket !== undefined ? { kind: 'unix', address: `unix:${socket}` } : { kind: 'tcp', address: server };
}

export function channelCredentials(target: Target, o: ConnectOptions): grpc.ChannelCredentials {
  const anyTls = o.tlsCa !== undefined || o.tlsCert !== undefined || o.tlsKey !== undefined;
  if (target.kind === 'unix') {
    if (anyTls) throw new UsageError('--tls-ca/--tls-cert/--tls-key apply to TCP addresses; a unix socket is plaintext');
    return grpc.credentials.createInsecure();
  }
  if (o.insecure) {
    if (anyTls) throw new UsageError('--insecure conflicts with --tls-ca/--tls-cert/--tls-key: choose plaintext or TLS');
    return grpc.credentials.createInsecure();
  }
  if ((o.tlsCert === undefined) !== (o.tlsKey === undefined)) throw new UsageError('--tls-cert and --tls-key must be given together');
  const ca = o.tlsCa !== undefined ? readInputFile('--tls-ca', o.tlsCa) : null;
  const cert = o.tlsCert !== undefined ? readInputFile('--tls-cert', o.tlsCert) : null;
  const key = o.tlsKey !== undefined ? readInputFile('--tls-key', o.tlsKey) : null;
  return grpc.credentials.createSsl(ca, key, cert);
}

// ---------------------------------------------------------------------------------------------
// Calls

type UnaryFn<Req, Res> = (req: Req, md: grpc.Metadata, opts: grpc.CallOptions, cb: grpc.requestCallback<Res>) => grpc.ClientUnaryCall;

/** Pages of ListSnapshots vcpuctl follows at most (of the server's default 1000 entries each). */
const MAX_SNAPSHOT_PAGES = 10_000;

function unary<Req, Res>(fn: UnaryFn<Req, Res>, req: Req, opts: grpc.CallOptions): Promise<Res> {
  return new Promise((resolve, reject) => {
    fn(req, new grpc.Metadata(), opts, (err, res) => (err ? reject(err) : resolve(res as Res)));
  });
}

/** Connected clients of both vcpud services; every unary call gets the configured deadline. */
export class VcpudClient {
  readonly target: Target;
  readonly serverSource: string;
  readonly state: VcpuStateServiceClient;
  readonly vm: VmServiceClient;
  readonly snapshot: SnapshotServiceClient;
  private readonly timeoutMs: number;

  constructor(o: ConnectOptions) {
    this.target = resolveTarget(o.server, o.cwd);
    this.serverSource = o.serverSource ?? 'from --server';
    const creds = channelCredentials(this.target, o);
    const proto = loadVcpudProto().vcpud.v1;
    const channelOptions: grpc.ChannelOptions = { 'grpc.max_receive_message_length': 64 << 20, 'grpc.max_send_message_length': 64 << 20 };
    if (o.tlsServerName) channelOptions['grpc.ssl_target_name_override'] = o.tlsServerName;
    this.state = new proto.VcpuStateService(this.target.address, creds, channelOptions);
    this.vm = new proto.VmService(this.target.address, creds, { ...channelOptions, channelOverride: this.state.getChannel() });
    this.snapshot = new proto.SnapshotService(this.target.address, creds, { ...channelOptions, channelOverride: this.state.getChannel() });
    this.timeoutMs = o.timeoutMs;
  }

  /** Call options with the deadline (none when the timeout is 0). */
  callOptions(): grpc.CallOptions {
    return this.timeoutMs > 0 ? { deadline: new Date(Date.now() + this.timeoutMs) } : {};
  }

  close(): void {
    this.snapshot.close();
    this.vm.close();
    this.state.close();
  }

  getCapabilities() {
    return unary<object, GetCapabilitiesResponse__Output>((r, m, o, cb) => this.state.getCapabilities(r, m, o, cb), {}, this.callOptions());
  }
  getState(req: GetStateRequest) {
    return unary<GetStateRequest, GetStateResponse__Output>((r, m, o, cb) => this.state.getState(r, m, o, cb), req, this.callOptions());
  }
  setState(req: SetStateRequest) {
    return unary<SetStateRequest, SetStateResponse__Output>((r, m, o, cb) => this.state.setState(r, m, o, cb), req, this.callOptions());
  }
  getNestedState(req: GetNestedStateRequest) {
    return unary<GetNestedStateRequest, GetNestedStateResponse__Output>((r, m, o, cb) => this.state.getNestedState(r, m, o, cb), req, this.callOptions());
  }
  setNestedState(req: SetNestedStateRequest) {
    return unary<SetNestedStateRequest, SetNestedStateResponse__Output>((r, m, o, cb) => this.state.setNestedState(r, m, o, cb), req, this.callOptions());
  }
  createVm(req: CreateVmRequest) {
    return unary<CreateVmRequest, CreateVmResponse__Output>((r, m, o, cb) => this.vm.createVm(r, m, o, cb), req, this.callOptions());
  }
  getVm(vmId: string) {
    return unary<{ vmId: string }, GetVmResponse__Output>((r, m, o, cb) => this.vm.getVm(r, m, o, cb), { vmId }, this.callOptions());
  }
  listVms(req: ListVmsRequest) {
    return unary<ListVmsRequest, ListVmsResponse__Output>((r, m, o, cb) => this.vm.listVms(r, m, o, cb), req, this.callOptions());
  }
  deleteVm(vmId: string) {
    return unary<{ vmId: string }, DeleteVmResponse__Output>((r, m, o, cb) => this.vm.deleteVm(r, m, o, cb), { vmId }, this.callOptions());
  }
  writeMemory(req: WriteMemoryRequest) {
    return unary<WriteMemoryRequest, WriteMemoryResponse__Output>((r, m, o, cb) => this.vm.writeMemory(r, m, o, cb), req, this.callOptions());
  }
  loadProgram(req: LoadProgramRequest) {
    return unary<LoadProgramRequest, LoadProgramResponse__Output>((r, m, o, cb) => this.vm.loadProgram(r, m, o, cb), req, this.callOptions());
  }
  runVm(vmId: string) {
    return unary<{ vmId: string }, RunVmResponse__Output>((r, m, o, cb) => this.vm.runVm(r, m, o, cb), { vmId }, this.callOptions());
  }
  pauseVm(vmId: string) {
    return unary<{ vmId: string }, PauseVmResponse__Output>((r, m, o, cb) => this.vm.pauseVm(r, m, o, cb), { vmId }, this.callOptions());
  }
  resumeVm(vmId: string) {
    return unary<{ vmId: string }, ResumeVmResponse__Output>((r, m, o, cb) => this.vm.resumeVm(r, m, o, cb), { vmId }, this.callOptions());
  }
  runVcpu(vmId: string, vcpuId: number) {
    return unary<{ vmId: string; vcpuId: number }, RunVcpuResponse__Output>(
      (r, m, o, cb) => this.vm.runVcpu(r, m, o, cb),
      { vmId, vcpuId },
      this.callOptions(),
    );
  }
  pauseVcpu(vmId: string, vcpuId: number) {
    return unary<{ vmId: string; vcpuId: number }, PauseVcpuResponse__Output>(
      (r, m, o, cb) => this.vm.pauseVcpu(r, m, o, cb),
      { vmId, vcpuId },
      this.callOptions(),
    );
  }
  resumeVcpu(vmId: string, vcpuId: number) {
    return unary<{ vmId: string; vcpuId: number }, ResumeVcpuResponse__Output>(
      (r, m, o, cb) => this.vm.resumeVcpu(r, m, o, cb),
      { vmId, vcpuId },
      this.callOptions(),
    );
  }

  /** ReadMemory, collected into one buffer (the whole stream is under one deadline). */
  readMemory(req: ReadMemoryRequest): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      const call = this.vm.readMemory(req, new grpc.Metadata(), this.callOptions());
      call.on('data', (c: { data: Buffer }) => chunks.push(c.data));
      call.on('error', reject);
      call.on('end', () => resolve(Buffer.concat(chunks)));
    });
  }

  /** CreateSnapshot: progress, data (when streamed) and done messages; no deadline (large VMs take long). */
  createSnapshot(req: CreateSnapshotRequest): grpc.ClientReadableStream<CreateSnapshotResponse__Output> {
    return this.snapshot.createSnapshot(req, new grpc.Metadata(), {});
  }
  restoreSnapshot(req: RestoreSnapshotRequest) {
    return unary<RestoreSnapshotRequest, RestoreSnapshotResponse__Output>((r, m, o, cb) => this.snapshot.restoreSnapshot(r, m, o, cb), req, this.callOptions());
  }
  /**
   * RestoreSnapshotStream: the returned stream takes the messages (data messages may come
   * pre-serialized: upload.ts); the promise is the response.
   */
  restoreSnapshotStream(): {
    stream: grpc.ClientWritableStream<RestoreSnapshotStreamRequest | Preserialized>;
    response: Promise<RestoreSnapshotStreamResponse__Output>;
  } {
    const method = loadVcpudProto().vcpud.v1.SnapshotService.service.RestoreSnapshotStream;
    let stream!: grpc.ClientWritableStream<RestoreSnapshotStreamRequest | Preserialized>;
    const response = new Promise<RestoreSnapshotStreamResponse__Output>((resolve, reject) => {
      stream = this.snapshot.makeClientStreamRequest(
        method.path,
        passPreserialized(method.requestSerialize),
        method.responseDeserialize,
        new grpc.Metadata(),
        {},
        (err, res) => (err ? reject(err) : resolve(res as RestoreSnapshotStreamResponse__Output)),
      );
    });
    return { stream, response };
  }
  /** Every page of ListSnapshots, concatenated (at most MAX_SNAPSHOT_PAGES pages). */
  async listSnapshots(): Promise<ListSnapshotsResponse__Output> {
    const snapshots: ListSnapshotsResponse__Output['snapshots'] = [];
    let pageToken = '';
    for (let page = 0; page < MAX_SNAPSHOT_PAGES; page++) {
      const r = await unary<ListSnapshotsRequest, ListSnapshotsResponse__Output>(
        (q, m, o, cb) => this.snapshot.listSnapshots(q, m, o, cb),
        { pageToken },
        this.callOptions(),
      );
      snapshots.push(...r.snapshots);
      pageToken = r.nextPageToken;
      if (!pageToken) break;
    }
    return { snapshots, nextPageToken: pageToken };
  }
  deleteSnapshot(name: string, cascade = false) {
    return unary<{ name: string; cascade: boolean }, DeleteSnapshotResponse__Output>(
      (r, m, o, cb) => this.snapshot.deleteSnapshot(r, m, o, cb),
      { name, cascade },
      this.callOptions(),
    );
  }
  /** MergeSnapshot without a deadline: it reads and writes the whole chain. */
  mergeSnapshot(name: string, target = '') {
    return unary<{ name: string; target: string }, MergeSnapshotResponse__Output>(
      (r, m, o, cb) => this.snapshot.mergeSnapshot(r, m, o, cb),
      { name, target },
      {},
    );
  }
  /** MigrateVm: progress and done messages; no deadline. */
  migrateVm(req: MigrateVmRequest): grpc.ClientReadableStream<MigrateVmResponse__Output> {
    return this.snapshot.migrateVm(req, new grpc.Metadata(), {});
  }

  /** StreamConsole, by default without a deadline: it lasts until the VM is deleted or the caller cancels. */
  streamConsole(req: StreamConsoleRequest, opts: grpc.CallOptions = {}): grpc.ClientReadableStream<StreamConsoleResponse__Output> {
    return this.vm.streamConsole(req, new grpc.Metadata(), opts);
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

/** What a client error carries: the shape of grpc-js's ServiceError (code, details, metadata). */
export interface ServiceErrorLike {
  code: number;
  details?: string;
  message?: string;
  metadata?: grpc.Metadata;
}

export function isServiceError(e: unknown): e is ServiceErrorLike {
  if (!e || typeof e !== 'object') return false;
  const o = e as Record<string, unknown>;
  return typeof o.code === 'number' && (typeof o.details === 'string' || (typeof o.metadata === 'object' && o.metadata !== null));
}

// The trailer decoder is the server's own (src/server/errors.ts loads no native addon).
export { decodeStatusDetails, type DecodedStatus } from '../../api/status-details';
import { decodeStatusDetails } from '../../api/status-details';

// ---------------------------------------------------------------------------------------------
// Connection failures

/** What grpc-js says when it never reached a server (no status came from vcpud). */
const NOT_CONNECTED = /^(No connection established|Name resolution failed|Failed to connect)/;

/** vcpud could not be reached: what was tried, why it failed, and what to check. */
export class ConnectionFailure extends Error {
  readonly code = grpc.status.UNAVAILABLE;
  constructor(
    readonly details: string,
    readonly hints: string[],
  ) {
    super(details);
    this.name = 'ConnectionFailure';
  }
}

function whyNotConnected(details: string): string {
  const cause = /Last error: (?:Error: )?(.*?)\.? Resolution note:/.exec(details)?.[1] ?? details.replace(/\.? Resolution note:.*$/, '');
  const errno = /\b(ENOENT|ECONNREFUSED|EACCES|EPERM|ENOTSOCK|ETIMEDOUT|EHOSTUNREACH)\b/.exec(cause)?.[1];
  const meaning: Record<string, string> = {
    ENOENT: 'no socket at that path',
    ECONNREFUSED: 'nothing is listening there',
    EACCES: 'permission denied',
    EPERM: 'permission denied',
    ENOTSOCK: 'that path is not a socket',
  };
  if (/^Name resolution failed/.test(details)) return 'the host name does not resolve';
  return errno && meaning[errno] ? `${meaning[errno]} (${cause})` : cause;
}

/** A connection failure of `client` as a ConnectionFailure; any other error unchanged. */
export function explainConnectionFailure(e: unknown, client: VcpudClient): unknown {
  if (!isServiceError(e) || e.code !== grpc.status.UNAVAILABLE || !NOT_CONNECTED.test(e.details ?? '') || decodeStatusDetails(e.metadata)) return e;
  const { target } = client;
  const socket = target.kind === 'unix' ? target.address.slice('unix:'.length) : undefined;
  return new ConnectionFailure(`cannot reach vcpud at ${target.address} (${client.serverSource}): ${whyNotConnected(e.details ?? '')}`, [
    `is vcpud running? It logs "vcpud serving" with the address it listens on`,
    socket
      ? `the socket must exist and be writable by you: check its owner and mode (ls -l ${socket}; vcpud's --socket-mode) and your groups`
      : 'is the port right, and does the server want TLS (--tls-ca) or plaintext (--insecure)?',
    'another server: --server unix:PATH|PATH|HOST:PORT, or $VCPUD_ADDR',
  ]);
}
