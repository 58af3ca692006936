/**
 * Live migration at the server layer.
 *
 * Destination: vcpud.v1.MigrationService (PrepareIncomingMigration, GetIncomingMigration,
 * AbortIncomingMigration) and the one-time data endpoint of each incoming migration: a unix socket
 * in a private (0700) directory next to the API socket, or a TCP port on the API's host that takes
 * only TLS with the API's certificate, its client CA and its --allow-client rules (plaintext only
 * where the API itself is plaintext: --insecure on loopback).
 *
 * Source: MigrateVm (SnapshotService delegates here) drives src/vm/migration/outgoing.ts with the
 * destination reached over gRPC (control) and the data connection (memory and state), and streams
 * per-pass progress to its caller.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import { durationToMs, msToDuration } from '../../duration';
import { VcpudError, type ErrorKind } from '../../errors';
import { checkCreate } from '../../vm/limits';
import { Channel } from '../../vm/migration/channel';
import { IncomingMigration, type IncomingState } from '../../vm/migration/incoming';
import { migrateVm, type DestinationControl, type MigrationMode, type MigrationProgress, type MigrationReport } from '../../vm/migration/outgoing';
import { EnvelopeType, PROTOCOL_VERSION, type Hello } from '../../vm/migration/protocol';
import type { SnapshotHeader } from '../../vm/snapshot-format';
import type { TlsConfig } from '../config';
import { vmToProto } from '../convert';
import { decodeStatusDetails } from '../../api/status-details';
import type { AbortIncomingMigrationResponse__Output } from '../../api/generated/vcpud/v1/AbortIncomingMigrationResponse';
import type { GetVmResponse__Output } from '../../api/generated/vcpud/v1/GetVmResponse';
import type { Vm__Output } from '../../api/generated/vcpud/v1/Vm';
import type { IncomingMigrationState } from '../../api/generated/vcpud/v1/IncomingMigrationState';
import type { MigrateVmRequest__Output } from '../../api/generated/vcpud/v1/MigrateVmRequest';
import type { MigrateVmResponse } from '../../api/generated/vcpud/v1/MigrateVmResponse';
import type { MigrationServiceClient } from '../../api/generated/vcpud/v1/MigrationService';
import type { MigrationMode as ProtoMode } from '../../api/generated/vcpud/v1/MigrationMode';
import type { PrepareIncomingMigrationRequest__Output } from '../../api/generated/vcpud/v1/PrepareIncomingMigrationRequest';
import type { PrepareIncomingMigrationResponse, PrepareIncomingMigrationResponse__Output } from '../../api/generated/vcpud/v1/PrepareIncomingMigrationResponse';
import type { SnapshotPhase } from '../../api/generated/vcpud/v1/SnapshotPhase';
import { listen } from '../connections';
import { authorizeClient } from '../interceptors';
import type { Metrics } from '../metrics';
import { vcpudProto } from '../../api/proto';
import { vcpudServiceDefinitions } from '../service-definitions';
import type { ServiceSink } from '../server';
import type { BoundAddress } from '../transport';
import { unary, type ServiceContext } from './context';
import { writeWithBackpressure } from './streams';

const DEFAULT_MAX_DOWNTIME_MS = 50;
const DEFAULT_COMPLETION_PER_GIB_MS = 150_000;
/** Progress messages at most this often (plus one per pass and phase change). */
const PROGRESS_INTERVAL_MS = 100;
/**
 * This process, as a migration source names itself in PrepareIncomingMigration: a destination that
 * receives its own id is the same server (a migration to itself would "succeed" with a second copy).
 */
const INSTANCE_ID = randomUUID();

export interface MigrationServiceOptions {
  stallMs: number;
  /** The API's TLS settings (the data endpoint takes the same credentials and allowlist). */
  tls?: TlsConfig;
  metrics?: Metrics;
}

/** How MigrateVm reaches a destination: its gRPC target and the credentials for both planes. */
export interface DestinationTarget {
  target: string;
  creds: grpc.ChannelCredentials;
  options: grpc.ChannelOptions;
  /** PEMs for the TLS data connection (TCP destinations). */
  tls?: { ca: Buffer | null; cert: Buffer | null; key: Buffer | null; serverName?: string };
}

const STATE_NAMES: Record<IncomingState, IncomingMigrationState> = {
  waiting: 'INCOMING_MIGRATION_STATE_WAITING',
  receiving: 'INCOMING_MIGRATION_STATE_RECEIVING',
  committed: 'INCOMING_MIGRATION_STATE_COMMITTED',
  aborted: 'INCOMING_MIGRATION_STATE_ABORTED',
};
/** Discarded migrations stay answerable (Get/Abort) for a while, so a source can learn the outcome. */
const FORGET_AFTER_MS = 10 * 60_000;

/**
 * The destination's description of the VM from its COMMITTED message, when a MigrationDone can carry
 * it. It comes off the wire from another vcpud (maybe of another version): a shape the response
 * cannot serialize would fail the report of a migration that succeeded. Otherwise undefined, and the
 * VM is asked for with GetVm, as from a destination that does not describe it.
 */
export function describedVm(vm: unknown): Vm__Output | undefined {
  if (typeof vm !== 'object' || vm === null || typeof (vm as { id?: unknown }).id !== 'string') return undefined;
  try {
    vcpudServiceDefinitions().SnapshotService.MigrateVm.responseSerialize({ done: { destinationVm: vm } });
    return vm as Vm__Output;
  } catch {
    return undefined;
  }
}

type PrepareRequest = PrepareIncomingMigrationRequest__Output;

/**
 * An AbortSignal that aborts with `reason` when the call is cancelled: by its client, its deadline or
 * a lost connection (grpc-js emits 'cancelled' for each). `dispose` stops listening.
 */
function cancellationSignal(
  call: { cancelled: boolean; on(e: 'cancelled', f: () => void): unknown; off(e: 'cancelled', f: () => void): unknown },
  reason: VcpudError,
) {
  const abort = new AbortController();
  const onCancel = () => abort.abort(reason);
  if (call.cancelled) onCancel();
  else call.on('cancelled', onCancel);
  return { signal: abort.signal, dispose: () => call.off('cancelled', onCancel) };
}

export class MigrationService {
  private readonly incoming = new Map<string, IncomingMigration>();
  /** What prepares still under way (committing memory) hold against the limits before they join `incoming`. */
  private readonly preparing = new Set<{ vcpuCount: number; memoryBytes: number }>();
  private api?: BoundAddress;

  constructor(
    private readonly ctx: ServiceContext,
    private readonly opts: MigrationServiceOptions,
  ) {}

  /** The API's bound address, known once the server listens: data endpoints go next to it. */
  setApiAddress(api: BoundAddress): void {
    this.api = api;
  }

  register(server: ServiceSink): void {
    server.addService(vcpudServiceDefinitions().MigrationService, this.handlers());
  }

  private find(id: string): IncomingMigration {
    const m = this.incoming.get(id);
    if (!m) throw new VcpudError('not_found', `no incoming migration "${id}"`, { reason: 'MIGRATION_NOT_FOUND', field: 'migration_id' });
    return m;
  }

  handlers() {
    const ctx = this.ctx;
    return {
      PrepareIncomingMigration: unary(ctx, async (req: PrepareRequest, call) => {
        // The caller gone (cancelled, deadline passed, disconnected) before the answer: nobody can
        // use the migration, so it is discarded at once instead of after the stall timeout.
        const cancelled = cancellationSignal(
          call,
          new VcpudError('cancelled', 'PrepareIncomingMigration was cancelled by the caller (or its deadline passed)', { reason: 'MIGRATION_FAILED' }),
        );
        try {
          return await this.prepare(req, cancelled.signal);
        } finally {
          cancelled.dispose();
        }
      }),

      GetIncomingMigration: unary(ctx, (req: { migrationId: string }) => {
        const m = this.find(req.migrationId);
        return {
          state: STATE_NAMES[m.state],
          pagesReceived: String(m.pagesReceived),
          bytesReceived: String(m.bytesReceived),
          passes: m.passes,
          error: m.error,
          ...(m.vm && !m.vm.isDestroyed ? { vm: vmToProto(m.vm) } : {}),
        };
      }),

      AbortIncomingMigration: unary(ctx, (req: { migrationId: string; reason: string }) => {
        const m = this.find(req.migrationId);
        return { state: STATE_NAMES[m.discard(`aborted by the source: ${req.reason || 'no reason given'}`, { abandoned: true })] };
      }),
    };
  }

  /** PrepareIncomingMigration: an incoming migration and its data endpoint, discarded if `signal` aborts first. */
  private async prepare(req: PrepareRequest, signal: AbortSignal): Promise<PrepareIncomingMigrationResponse> {
    if (req.sourceInstanceId === INSTANCE_ID)
      throw new VcpudError(
        'failed_precondition',
        'the migration destination is this same vcpud (the source): a VM cannot migrate to the server it runs on; name another destination',
        {
          reason: 'MIGRATION_TO_SELF',
          field: 'destination',
        },
      );
    let header: SnapshotHeader;
    try {
      header = JSON.parse(req.headerJson.toString('utf8')) as SnapshotHeader;
      if (!header?.vm || !Array.isArray(header.vcpus) || !header.source) throw new Error('missing vm, vcpus or source');
    } catch (e) {
      throw new VcpudError('invalid_argument', `header_json is not a VM header: ${(e as Error).message}`, {
        violations: [{ rule: 'header', field: 'header_json', message: 'a snapshot-format header' }],
      });
    }
    let held: { vcpuCount: number; memoryBytes: number } | undefined;
    let m: IncomingMigration;
    try {
      m = await IncomingMigration.prepare(this.ctx.registry, this.ctx.caps, header, {
        name: req.vmName || undefined,
        stallMs: this.opts.stallMs,
        preallocate: req.preallocateMemory,
        signal,
        describe: (vm) => vmToProto(vm),
        checkLimits: (spec) => {
          // Incoming VMs not committed yet count against the limits too, and so do prepares still
          // committing their memory (a preallocating one takes seconds per GiB).
          const usage = this.ctx.registry.usage();
          const holding = [...this.preparing];
          for (const other of this.incoming.values())
            if (other.state === 'waiting' || other.state === 'receiving')
              holding.push({ vcpuCount: other.header.vm.vcpuCount, memoryBytes: other.memoryBytes });
          for (const h of holding) {
            usage.vms++;
            usage.vcpus += h.vcpuCount;
            usage.memoryBytes += h.memoryBytes;
          }
          checkCreate(this.ctx.registry.limits, usage, spec.vcpuCount, spec.memoryBytes);
          held = { vcpuCount: spec.vcpuCount, memoryBytes: spec.memoryBytes };
          this.preparing.add(held);
        },
      });
    } finally {
      if (held) this.preparing.delete(held);
    }
    // Synchronously after the hold is released: no other prepare's check runs in between.
    this.incoming.set(m.id, m);
    const metrics = this.opts.metrics;
    metrics?.migrationInProgress('incoming', 1);
    void m.done().then(() => {
      metrics?.migrationInProgress('incoming', -1);
      metrics?.recordIncomingMigration(m.state === 'committed' ? 'succeeded' : m.abandoned ? 'abandoned' : 'failed');
      setTimeout(() => this.incoming.delete(m.id), FORGET_AFTER_MS).unref();
    });
    let endpoint: string;
    try {
      endpoint = await this.openEndpoint(m);
    } catch (e) {
      m.discard(`the data endpoint could not be opened: ${(e as Error).message}`);
      throw e;
    }
    if (signal.aborted) {
      const message = `${(signal.reason as Error).message} before it answered: the incoming migration was discarded`;
      m.discard(message, { abandoned: true });
      throw new VcpudError('cancelled', message, { reason: 'MIGRATION_FAILED' });
    }
    return { migrationId: m.id, dataEndpoint: endpoint, token: m.token, stallTimeout: msToDuration(this.opts.stallMs) };
  }

  /** Opens the one-time data endpoint of `m`; it closes when `m` is committed or discarded. */
  private async openEndpoint(m: IncomingMigration): Promise<string> {
    const api = this.api;
    if (!api) throw new VcpudError('unavailable', 'the API is not listening yet');
    const stallMs = this.opts.stallMs;
    let server: net.Server;
    const accept = (socket: net.Socket) => serveDataConnection(socket, m, stallMs, () => server.close());
    let endpoint: string;
    let cleanup = () => {};
    if (api.kind === 'unix') {
      const dir = fs.mkdtempSync(path.join(path.dirname(api.path), '.vcpud-migration-'));
      fs.chmodSync(dir, 0o700);
      const sock = path.join(dir, 'data.sock');
      server = net.createServer(accept);
      await listen(server, { path: sock });
      endpoint = `unix:${sock}`;
      cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
    } else {
      const t = this.opts.tls;
      if (t) {
        const ca = t.caFile ? fs.readFileSync(t.caFile) : undefined;
        const allowed = new Set(ca ? t.allowedClients : []);
        server = tls.createServer(
          { cert: fs.readFileSync(t.certFile), key: fs.readFileSync(t.keyFile), ca, requestCert: !!ca, rejectUnauthorized: !!ca, handshakeTimeout: stallMs },
          (socket) => {
            const denied = allowed.size ? authorizeClient({ sslPeerCertificate: socket.getPeerCertificate() } as never, allowed) : null;
            if (denied) return socket.destroy();
            accept(socket);
          },
        );
        server.on('tlsClientError', () => {});
      } else {
        server = net.createServer(accept); // --insecure: the API itself is plaintext on loopback
      }
      await listen(server, { host: api.host, port: 0 });
      endpoint = `tcp:${api.host.includes(':') ? `[${api.host}]` : api.host}:${(server.address() as net.AddressInfo).port}`;
    }
    void m.done().then(() => {
      server.close();
      cleanup();
    });
    return endpoint;
  }

  // -------------------------------------------------------------------------------------------
  // Source side: MigrateVm

  async migrate(call: grpc.ServerWritableStream<MigrateVmRequest__Output, MigrateVmResponse>, dest: DestinationTarget): Promise<void> {
    const req = call.request;
    const vm = this.ctx.registry.get(req.vmId);
    const v1 = vcpudProto().vcpud.v1;
    const migrations = new v1.MigrationService(dest.target, dest.creds, {
      ...dest.options,
      'grpc.keepalive_time_ms': 5000,
      'grpc.keepalive_timeout_ms': this.opts.stallMs,
    });
    const vms = new v1.VmService(dest.target, dest.creds, { ...dest.options, channelOverride: migrations.getChannel() });
    const cancelled = cancellationSignal(call, new VcpudError('unavailable', 'the migration was cancelled by the caller'));
    const stallMs = this.opts.stallMs;
    const control = destinationControl(dest, migrations, stallMs);
    const send = progressSender((m) => call.write(m));
    const mode: MigrationMode =
      ({ MIGRATION_MODE_PRE_COPY: 'pre-copy', MIGRATION_MODE_STOP_AND_COPY: 'stop-and-copy' } as Record<string, MigrationMode>)[req.mode] ?? 'auto';
    let report: MigrationReport;
    this.opts.metrics?.migrationInProgress('outgoing', 1);
    try {
      report = await migrateVm(vm, control, {
        caps: this.ctx.caps,
        mode,
        maxDowntimeMs: durationToMs(req.maxDowntime, DEFAULT_MAX_DOWNTIME_MS),
        bandwidth: Number(req.bandwidthBytesPerSecond ?? 0),
        completionTimeoutPerGiBMs: durationToMs(req.completionTimeoutPerGib, DEFAULT_COMPLETION_PER_GIB_MS),
        abortOnNoProgress: req.abortOnNoProgress,
        preallocateDestinationMemory: req.preallocateDestinationMemory,
        leavePaused: req.leavePaused,
        destinationVmName: req.destinationVmName || vm.name || undefined,
        stallMs,
        signal: cancelled.signal,
        onProgress: (p) => {
          send(p);
          this.opts.metrics?.recordMigrationProgress(p);
        },
        destroySource: () => this.ctx.registry.destroy(vm.id),
      });
    } catch (e) {
      this.opts.metrics?.recordMigration({ result: (e as VcpudError).kind === 'unavailable' && cancelled.signal.aborted ? 'cancelled' : 'failed' });
      migrations.close();
      throw migrationError(e, dest.target, vm.id);
    } finally {
      cancelled.dispose();
      this.opts.metrics?.migrationInProgress('outgoing', -1);
    }
    this.opts.metrics?.recordMigration({ result: 'succeeded', report });
    // The destination describes the VM in its COMMITTED message; an older one is asked.
    const described = describedVm(report.destinationVm);
    const after = described
      ? { vm: described }
      : await callUnary<GetVmResponse__Output>(stallMs, (md, o, cb) => vms.getVm({ vmId: report.destinationVmId }, md, o, cb)).catch(() => undefined);
    migrations.close();
    // Reported after the commit: a client that cancelled by now only misses the report.
    await writeWithBackpressure(call, {
      done: {
        ...(after?.vm ? { destinationVm: after.vm } : {}),
        bytesSent: String(report.bytesSent),
        duration: msToDuration(report.durationMs),
        downtime: msToDuration(report.downtimeMs),
        notes: report.notes,
        passes: report.passes,
        downtimeLastPass: msToDuration(report.lastPassMs),
        downtimeState: msToDuration(report.stateMs),
        downtimeRestore: msToDuration(report.restoreMs),
        downtimeResume: msToDuration(report.resumeMs),
        mode: (report.mode === 'pre-copy' ? 'MIGRATION_MODE_PRE_COPY' : 'MIGRATION_MODE_STOP_AND_COPY') as ProtoMode,
        maxThrottlePercent: report.maxThrottlePercent,
        setupPrepare: msToDuration(report.prepareMs),
        setupConnect: msToDuration(report.connectMs),
        preCopy: msToDuration(report.preCopyMs),
        deleteSource: msToDuration(report.deleteSourceMs),
      },
    });
  }
}

/**
 * One connection to an incoming migration's data endpoint: it must present the migration's id and
 * token first (within the stall timeout); then `accepted` runs (the endpoint stops listening: it
 * is one-time) and the migration receives on it.
 */
export function serveDataConnection(socket: net.Socket, m: IncomingMigration, stallMs: number, accepted: () => void): void {
  const ch = new Channel(socket, stallMs, 'the source');
  ch.expectJson<Hello>(EnvelopeType.Hello, "waiting for the source's hello")
    .then(async (hello) => {
      if (hello.version !== PROTOCOL_VERSION || hello.migrationId !== m.id || !m.tokenMatches(Buffer.from(String(hello.token), 'base64')))
        throw new VcpudError('failed_precondition', "the data connection did not present this migration's token (or speaks another protocol version)");
      accepted();
      await ch.sendJson(EnvelopeType.HelloOk, {});
      await m.receive(ch);
    })
    .catch((e) => ch.fail(e as Error));
}

/**
 * One unary call with a deadline: `start` calls a generated client's method with the metadata, options
 * and callback given, so the request and reply types are the method's own. `signal` cancels it
 * (rejecting with the signal's reason).
 */
function callUnary<Res>(
  timeoutMs: number,
  start: (metadata: grpc.Metadata, options: grpc.CallOptions, callback: grpc.requestCallback<Res>) => grpc.ClientUnaryCall,
  signal?: AbortSignal,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    const onAbort = () => {
      reject(signal?.reason);
      call.cancel();
    };
    const call = start(new grpc.Metadata(), { deadline: Date.now() + timeoutMs }, (err, res) => {
      signal?.removeEventListener('abort', onAbort);
      if (err) reject(err);
      else resolve(res as Res);
    });
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** What PrepareIncomingMigration's deadline allows per GiB of guest memory the destination commits first. */
const PREALLOCATE_MS_PER_GIB = 10_000;

/** The destination's gRPC control plane and data endpoint, as the engine uses them. */
function destinationControl(dest: DestinationTarget, client: MigrationServiceClient, stallMs: number): DestinationControl {
  return {
    name: dest.target,
    prepare: async (header, vmName, preallocateMemory, signal) => {
      // Allocating a large VM's memory takes a moment; committing it, up to 2.9 s per GiB here (BENCHMARKS.md).
      const timeoutMs = Math.max(stallMs, 15_000) + (preallocateMemory ? (PREALLOCATE_MS_PER_GIB * header.vm.memoryBytes) / 1024 ** 3 : 0);
      try {
        const r = await callUnary<PrepareIncomingMigrationResponse__Output>(
          timeoutMs,
          (md, o, cb) =>
            client.prepareIncomingMigration(
              { headerJson: Buffer.from(JSON.stringify(header)), vmName: vmName ?? '', sourceInstanceId: INSTANCE_ID, preallocateMemory },
              md,
              o,
              cb,
            ),
          signal,
        );
        return { migrationId: r.migrationId, endpoint: r.dataEndpoint, token: r.token };
      } catch (e) {
        throw destinationError(e);
      }
    },
    connect: (endpoint, signal) => connectData(endpoint, dest, stallMs, signal),
    abort: async (migrationId, reason) => {
      try {
        const r = await callUnary<AbortIncomingMigrationResponse__Output>(Math.min(stallMs, 5000), (md, o, cb) =>
          client.abortIncomingMigration({ migrationId, reason: reason.slice(0, 1000) }, md, o, cb),
        );
        return r.state === 'INCOMING_MIGRATION_STATE_COMMITTED' ? 'committed' : 'aborted';
      } catch (e) {
        // NOT_FOUND: it never existed or is long gone; nothing of it runs there.
        return (e as grpc.ServiceError).code === grpc.status.NOT_FOUND ? 'aborted' : 'unknown';
      }
    },
  };
}

/** Connects the data plane: a unix socket, or TLS to the destination's host (never plaintext off the API's own terms). */
export function connectData(endpoint: string, dest: DestinationTarget, stallMs: number, signal: AbortSignal): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    // The abort listener below sees only aborts to come: a migration cancelled already connects nothing.
    if (signal.aborted) return reject(signal.reason as Error);
    let socket: net.Socket;
    const ready = dest.tls ? 'secureConnect' : 'connect';
    if (endpoint.startsWith('unix:')) {
      if (!dest.target.startsWith('unix:'))
        return reject(new VcpudError('failed_precondition', `the destination offered a unix data endpoint (${endpoint}) to a TCP client`));
      socket = net.connect({ path: endpoint.slice(5) });
    } else if (endpoint.startsWith('tcp:')) {
      const m = /^tcp:(?:\[(.+)\]|([^:]+)):(\d+)$/.exec(endpoint);
      if (!m) return reject(new VcpudError('internal', `the destination offered a malformed data endpoint ${endpoint}`));
      let host = m[1] ?? m[2];
      // A wildcard address means "the host you reached me at".
      if (host === '0.0.0.0' || host === '::') host = apiHost(dest.target);
      const port = Number(m[3]);
      if (dest.tls) {
        const t = dest.tls;
        socket = tls.connect({
          host,
          port,
          ca: t.ca ?? undefined,
          cert: t.cert ?? undefined,
          key: t.key ?? undefined,
          servername: t.serverName || (net.isIP(apiHost(dest.target)) ? undefined : apiHost(dest.target)),
        });
      } else {
        return reject(new VcpudError('failed_precondition', 'a TCP data connection needs TLS credentials'));
      }
    } else {
      return reject(new VcpudError('internal', `the destination offered an unknown data endpoint ${endpoint}`));
    }
    socket.setKeepAlive(true, 1000);
    const timer = setTimeout(() => fail(new VcpudError('unavailable', `the data connection to ${endpoint} was not established within ${stallMs} ms`)), stallMs);
    const onAbort = () => fail(signal.reason as Error);
    signal.addEventListener('abort', onAbort, { once: true });
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener('abort', onAbort);
      socket.off('error', fail);
    };
    function fail(e: Error) {
      done();
      socket.destroy();
      reject(e instanceof VcpudError ? e : new VcpudError('unavailable', `the data connection to ${endpoint} failed: ${e.message}`));
    }
    socket.once('error', fail);
    socket.once(ready, () => {
      done();
      resolve(socket);
    });
  });
}

function apiHost(target: string): string {
  const t = target.replace(/^dns:(\/\/[^/]*\/)?/, '');
  const m = /^\[(.+)\]:\d+$/.exec(t) ?? /^([^:]+):\d+$/.exec(t);
  return m ? m[1] : t;
}

const PHASES: Record<MigrationProgress['phase'], SnapshotPhase> = {
  memory: 'SNAPSHOT_PHASE_MEMORY',
  state: 'SNAPSHOT_PHASE_STATE',
  sync: 'SNAPSHOT_PHASE_SYNC',
  resume: 'SNAPSHOT_PHASE_RESUME',
};

/**
 * Progress messages: every phase or pass change and each pass's closing report (the one carrying the
 * rates it measured), otherwise at most every PROGRESS_INTERVAL_MS.
 */
function progressSender(write: (m: MigrateVmResponse) => void): (p: MigrationProgress) => void {
  let last = 0;
  let key = '';
  return (p) => {
    const k = `${p.phase}/${p.pass}/${p.switchingOver}/${!!p.passEnd}`;
    const t = Date.now();
    if (k === key && t - last < PROGRESS_INTERVAL_MS) return;
    key = k;
    last = t;
    write({
      progress: {
        phase: PHASES[p.phase],
        memoryBytesDone: String(p.memoryBytesDone),
        memoryBytesTotal: String(p.bytesTotal),
        bytesWritten: String(p.bytesSent),
        migration: {
          pass: p.pass,
          bytesTotal: String(p.bytesTotal),
          bytesSent: String(p.bytesSent),
          bytesRemaining: String(p.bytesRemaining),
          dirtyRateBytesPerSecond: String(Math.round(p.dirtyRate)),
          transferRateBytesPerSecond: String(Math.round(p.transferRate)),
          expectedDowntime: msToDuration(p.expectedDowntimeMs),
          throttlePercent: p.throttlePercent,
          switchingOver: p.switchingOver,
        },
      },
    });
  };
}

const KIND_OF_CODE: Partial<Record<grpc.status, ErrorKind>> = {
  [grpc.status.INVALID_ARGUMENT]: 'invalid_argument',
  [grpc.status.FAILED_PRECONDITION]: 'failed_precondition',
  [grpc.status.RESOURCE_EXHAUSTED]: 'resource_exhausted',
  [grpc.status.DATA_LOSS]: 'data_loss',
  [grpc.status.NOT_FOUND]: 'not_found',
  [grpc.status.UNAVAILABLE]: 'unavailable',
  [grpc.status.CANCELLED]: 'unavailable',
  [grpc.status.DEADLINE_EXCEEDED]: 'unavailable',
  [grpc.status.PERMISSION_DENIED]: 'failed_precondition',
  [grpc.status.UNAUTHENTICATED]: 'failed_precondition',
};

/** A gRPC error from the destination as a VcpudError with its code, reason and violations. */
function destinationError(e: unknown): unknown {
  const grpcErr = e as grpc.ServiceError;
  if (typeof grpcErr?.code !== 'number' || !(grpcErr.metadata instanceof grpc.Metadata)) return e;
  const st = decodeStatusDetails(grpcErr.metadata);
  const reason = st?.errorInfo?.reason;
  const violations = [
    ...(st?.preconditionFailure ?? []).map((v) => ({ rule: v.type, field: v.subject, message: v.description })),
    ...(st?.badRequest ?? []).map((v) => ({ rule: v.reason, field: v.field, message: v.description })),
  ];
  return new VcpudError(
    KIND_OF_CODE[grpcErr.code as grpc.status] ?? 'internal',
    `the destination answered ${grpc.status[grpcErr.code]}${reason ? ` (${reason})` : ''}: ${grpcErr.details}`,
    {
      ...(violations.length ? { violations } : {}),
      // The caller's own mistake (the destination is this server) keeps its reason through the engine.
      ...(reason === 'MIGRATION_TO_SELF' ? { reason } : {}),
    },
  );
}

/** The error MigrateVm ends with: MIGRATION_FAILED, naming the VM, the destination, the phase and pass. */
function migrationError(e: unknown, target: string, vmId: string): VcpudError {
  const err = e as VcpudError;
  return new VcpudError(err?.kind ?? 'internal', `migration of VM ${vmId} to ${target} failed: ${err?.message ?? String(e)}`, {
    ...(err?.details ?? {}),
    reason: err?.details?.reason ?? 'MIGRATION_FAILED',
  });
}
