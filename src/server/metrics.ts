/**
 * Prometheus metrics, on a registry of our own (never prom-client's global one, so several servers in
 * one process, e.g. tests, do not collide).
 *
 * gRPC metrics use go-grpc-prometheus names, labels and code spellings, which orchestrators' dashboards
 * and alerts already query. Domain metrics share the vcpud_ prefix and base units; every label value
 * comes from a bounded set (method, ioctl, errno, section, capability, exit reason names).
 *
 * vcpud_state_bytes{section} is a histogram of the size of each state section served (one observation
 * per section per GetState/GetNestedState): its _sum is the bytes served per section, its buckets show
 * the size spread (xsave and nested state dwarf the others), its _count the sections served.
 */
import http from 'node:http';
import * as grpc from '@grpc/grpc-js';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { IoctlObserver } from '../ffi/observe';
import { parseHostPort } from './config';
import type { ConnectionEvents, ConnectionGate, ListenerName } from './connections';
import { packageVersion } from '../package';
import { boundIncrement, boundObserver, boundObservers, type Observe } from './bound-histogram';

/** prom-client default metrics removed from /metrics (see the constructor). */
const GAUGES_NAMED_LIKE_COUNTERS = ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'];

export type GrpcType = 'unary' | 'client_stream' | 'server_stream' | 'bidi_stream';

/** The labels of every per-RPC metric. */
export interface RpcLabels {
  grpc_type: GrpcType;
  grpc_service: string;
  grpc_method: string;
}

/** One method's RPC series, bound once (per-call prom-client label hashing was a few us a call). */
interface RpcSeries {
  started: () => void;
  msgReceived: () => void;
  msgSent: () => void;
  /** By status code. */
  handled: Map<number, () => void>;
  handlingSeconds: Observe;
}

/** Live values read at scrape time. */
export interface MetricSources {
  vms: () => number;
  vcpus: () => number;
  /** Cumulative vCPU exits by reason name (io, mmio, hlt, ...), as the runtime counts them. */
  exitsByReason: () => Record<string, number>;
}

export interface MetricsOptions {
  /** vcpud_build_info's version label; default: package.json's version. */
  version?: string;
  /** Node's process_* and nodejs_* metrics (default true). */
  defaultMetrics?: boolean;
}

/** go-grpc-prometheus's (i.e. Go's codes.Code.String()) spelling of each status code. */
const CODE_NAMES: Record<number, string> = {
  [grpc.status.OK]: 'OK',
  [grpc.status.CANCELLED]: 'Canceled',
  [grpc.status.UNKNOWN]: 'Unknown',
  [grpc.status.INVALID_ARGUMENT]: 'InvalidArgument',
  [grpc.status.DEADLINE_EXCEEDED]: 'DeadlineExceeded',
  [grpc.status.NOT_FOUND]: 'NotFound',
  [grpc.status.ALREADY_EXISTS]: 'AlreadyExists',
  [grpc.status.PERMISSION_DENIED]: 'PermissionDenied',
  [grpc.status.RESOURCE_EXHAUSTED]: 'ResourceExhausted',
  [grpc.status.FAILED_PRECONDITION]: 'FailedPrecondition',
  [grpc.status.ABORTED]: 'Aborted',
  [grpc.status.OUT_OF_RANGE]: 'OutOfRange',
  [grpc.status.UNIMPLEMENTED]: 'Unimplemented',
  [grpc.status.INTERNAL]: 'Internal',
  [grpc.status.UNAVAILABLE]: 'Unavailable',
  [grpc.status.DATA_LOSS]: 'DataLoss',
  [grpc.status.UNAUTHENTICATED]: 'Unauthenticated',
};

export function grpcCodeName(code: number): string {
  // Go prints an out-of-range code as Code(N); keep that rather than inventing a label.
  return CODE_NAMES[code] ?? `Code(${code})`;
}

/**
 * RPC latency buckets: prometheus.DefBuckets (5ms..10s, what go-grpc-prometheus uses) extended down to
 * 100us, because a state read of a paused vCPU takes tens to hundreds of microseconds.
 */
const RPC_SECONDS_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** One ioctl on a vCPU outside KVM_RUN costs 1us..10ms. */
const IOCTL_SECONDS_BUCKETS = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2];
/** Section sizes: 16-byte TSC up to multi-KiB xsave, cpuid and nested state. */
const STATE_BYTES_BUCKETS = [64, 256, 1024, 4096, 16384, 65536, 262144, 1048576];

const MIGRATION_DIRECTIONS = ['outgoing', 'incoming'] as const;
export type MigrationDirection = (typeof MIGRATION_DIRECTIONS)[number];
const OUTGOING_MIGRATION_RESULTS = ['succeeded', 'failed', 'cancelled'] as const;
export type OutgoingMigrationResult = (typeof OUTGOING_MIGRATION_RESULTS)[number];
const INCOMING_MIGRATION_RESULTS = ['succeeded', 'failed', 'abandoned'] as const;
export type IncomingMigrationResult = (typeof INCOMING_MIGRATION_RESULTS)[number];

/** A counter by `result`, every result present from the start (a rate over a series that appears late misses its first increase). */
function resultCounter(name: string, help: string, results: readonly string[], registers: Registry[]): Counter<'result'> {
  const c = new Counter({ name, help, labelNames: ['result'], registers });
  for (const result of results) c.inc({ result }, 0);
  return c;
}

/**
 * How often the event-loop lag histogram (nodejs_eventloop_lag_*) samples the loop. prom-client's
 * default, 10 ms, wakes an idle vcpud 100 times a second: 5 of its 7.5 ms of CPU per second idle on
 * this host, on every node of a cluster. At 100 ms a stall of 100 ms or more (what is worth an alert)
 * still delays a sample, and an idle vcpud costs 3.5 ms per second.
 */
const EVENT_LOOP_SAMPLE_MS = 100;

export class Metrics {
  readonly registry = new Registry();
  private sources?: MetricSources;

  private readonly started: Counter<keyof RpcLabels>;
  private readonly handled: Counter<keyof RpcLabels | 'grpc_code'>;
  private readonly handlingSeconds: Histogram<keyof RpcLabels>;
  private readonly msgReceived: Counter<keyof RpcLabels>;
  private readonly msgSent: Counter<keyof RpcLabels>;
  private readonly ioctlSeconds: Histogram<'ioctl'>;
  private readonly ioctlErrors: Counter<'ioctl' | 'errno'>;
  private readonly negotiationRetries: Counter<'ioctl'>;
  private readonly stateBytes: Histogram<'section'>;
  private readonly capability: Gauge<'capability'>;
  private readonly connectionsOpen: Gauge<'listener'>;
  private readonly connectionsAccepted: Counter<'listener'>;
  private readonly connectionsRefused: Counter<'listener'>;
  private readonly connectionLimit: Gauge<'listener'>;
  private readonly migrations: Counter<'result'>;
  private readonly migrationBytes: Counter;
  private readonly migrationPasses: Histogram;
  private readonly migrationDowntime: Histogram;
  private readonly migrationDirtyRate: Gauge;
  private readonly migrationTransferRate: Gauge;
  private readonly migrationRemaining: Gauge;
  private readonly migrationTornPages: Counter;
  private readonly migrationsInProgress: Gauge<'direction'>;
  private readonly incomingMigrations: Counter<'result'>;
  // Per-call observations through bound observers (bound-histogram.ts): the labels are fixed per ioctl, section, method.
  private readonly ioctlDuration: (ioctl: string) => Observe;
  private readonly sectionBytes: (section: string) => Observe;
  /** By the labels object (the interceptors keep one per method). */
  private readonly rpcSeries = new WeakMap<RpcLabels, RpcSeries>();
  private readonly handoverVms: Counter<'result'>;
  private readonly handoverRestoreSeconds: Gauge;

  constructor(options: MetricsOptions = {}) {
    const registers = [this.registry];
    const rpc = ['grpc_type', 'grpc_service', 'grpc_method'] as const;
    this.started = new Counter({ name: 'grpc_server_started_total', help: 'Total number of RPCs started on the server.', labelNames: rpc, registers });
    this.handled = new Counter({
      name: 'grpc_server_handled_total',
      help: 'Total number of RPCs completed on the server, regardless of success or failure.',
      labelNames: [...rpc, 'grpc_code'],
      registers,
    });
    this.handlingSeconds = new Histogram({
      name: 'grpc_server_handling_seconds',
      help: 'Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.',
      labelNames: rpc,
      buckets: RPC_SECONDS_BUCKETS,
      registers,
    });
    this.msgReceived = new Counter({
      name: 'grpc_server_msg_received_total',
      help: 'Total number of RPC stream messages received on the server.',
      labelNames: rpc,
      registers,
    });
    this.msgSent = new Counter({
      name: 'grpc_server_msg_sent_total',
      help: 'Total number of gRPC stream messages sent by the server.',
      labelNames: rpc,
      registers,
    });

    this.ioctlSeconds = new Histogram({
      name: 'vcpud_ioctl_duration_seconds',
      help: 'Duration of KVM ioctls issued by vcpud.',
      labelNames: ['ioctl'],
      buckets: IOCTL_SECONDS_BUCKETS,
      registers,
    });
    this.ioctlErrors = new Counter({ name: 'vcpud_ioctl_errors_total', help: 'KVM ioctls that failed, by errno.', labelNames: ['ioctl', 'errno'], registers });
    this.negotiationRetries = new Counter({
      name: 'vcpud_size_negotiation_retries_total',
      help: 'Retries of list/size ioctls after E2BIG (buffer grown to the size the kernel asked for).',
      labelNames: ['ioctl'],
      registers,
    });
    this.stateBytes = new Histogram({
      name: 'vcpud_state_bytes',
      help: 'Size in bytes of each vCPU state section served (sum: bytes served per section).',
      labelNames: ['section'],
      buckets: STATE_BYTES_BUCKETS,
      registers,
    });
    this.ioctlDuration = boundObservers(this.ioctlSeconds, 'ioctl');
    this.sectionBytes = boundObservers(this.stateBytes, 'section');
    this.capability = new Gauge({
      name: 'vcpud_capability',
      help: 'Host KVM capabilities (KVM_CHECK_EXTENSION values) as probed at start.',
      labelNames: ['capability'],
      registers,
    });

    const listener = ['listener'] as const;
    this.connectionsOpen = new Gauge({
      name: 'vcpud_connections_open',
      help: 'Connections open, by listener (api, health, metrics).',
      labelNames: listener,
      registers,
    });
    this.connectionsAccepted = new Counter({
      name: 'vcpud_connections_accepted_total',
      help: 'Connections accepted, by listener.',
      labelNames: listener,
      registers,
    });
    this.connectionsRefused = new Counter({
      name: 'vcpud_connections_refused_total',
      help: 'Connections closed at accept because the listener was at its connection limit.',
      labelNames: listener,
      registers,
    });
    this.connectionLimit = new Gauge({
      name: 'vcpud_connection_limit',
      help: 'Connection limit of each listener (alert on open/limit).',
      labelNames: listener,
      registers,
    });
    // Live migration, modelled on KubeVirt's kubevirt_vmi_migration_* (source side).
    this.migrations = resultCounter(
      'vcpud_migrations_total',
      'Outgoing migrations by result (succeeded, failed, cancelled).',
      OUTGOING_MIGRATION_RESULTS,
      registers,
    );
    this.migrationBytes = new Counter({
      name: 'vcpud_migration_data_bytes_total',
      help: 'Data-plane bytes sent by outgoing migrations (pages, state, control).',
      registers,
    });
    this.migrationPasses = new Histogram({
      name: 'vcpud_migration_passes',
      help: 'Memory passes of each successful migration (the paused last pass included).',
      buckets: [1, 2, 3, 4, 5, 8, 12, 20, 30],
      registers,
    });
    this.migrationDowntime = new Histogram({
      name: 'vcpud_migration_downtime_seconds',
      help: 'How long each successful migration had the VM paused.',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers,
    });
    this.migrationDirtyRate = new Gauge({
      name: 'vcpud_migration_dirty_rate_bytes',
      help: 'Bytes per second the guest of the latest migration dirtied, measured over its last pass.',
      registers,
    });
    this.migrationTransferRate = new Gauge({
      name: 'vcpud_migration_transfer_rate_bytes',
      help: 'Bytes per second the latest migration sent, measured over its last pass.',
      registers,
    });
    this.migrationRemaining = new Gauge({
      name: 'vcpud_migration_data_remaining_bytes',
      help: 'Bytes the latest migration still had to send at its last progress report.',
      registers,
    });
    this.migrationTornPages = new Counter({
      name: 'vcpud_migration_torn_pages_total',
      help: 'Page copies of successful outgoing migrations that the guest rewrote while they were on their way, sent again in a later pass.',
      registers,
    });
    // Both sides: an operator of the destination node sees what arrives, and what failed there.
    this.migrationsInProgress = new Gauge({
      name: 'vcpud_migrations_in_progress',
      help: 'Migrations under way: outgoing (MigrateVm calls) and incoming (prepared, not yet committed or discarded).',
      labelNames: ['direction'],
      registers,
    });
    for (const direction of MIGRATION_DIRECTIONS) this.migrationsInProgress.set({ direction }, 0);
    this.incomingMigrations = resultCounter(
      'vcpud_incoming_migrations_total',
      'Incoming migrations by result: succeeded (committed here), failed (refused here: bad data, resources, a failed commit), abandoned (the source aborted, went away or stopped sending).',
      INCOMING_MIGRATION_RESULTS,
      registers,
    );

    // The restart handover (--state-dir), as this process's start found it.
    this.handoverVms = resultCounter(
      'vcpud_handover_vms_total',
      'VMs found at start in the state directory, by result: restored, failed (files kept aside), lost (memory files without a manifest: the previous process was killed).',
      ['restored', 'failed', 'lost'],
      registers,
    );
    this.handoverRestoreSeconds = new Gauge({
      name: 'vcpud_handover_restore_seconds',
      help: 'How long the start took to restore the handed-over VMs.',
      registers,
    });

    // Gauges and counters read from the runtime when scraped, so they are never stale or double-kept.
    const read = <T>(f: (s: MetricSources) => T, fallback: T): T => {
      try {
        return this.sources ? f(this.sources) : fallback;
      } catch {
        return fallback; // a failing source must not fail the whole scrape
      }
    };
    const vms: Gauge = new Gauge({ name: 'vcpud_vms', help: 'VMs currently owned by vcpud.', registers, collect: () => vms.set(read((s) => s.vms(), 0)) });
    const vcpus: Gauge = new Gauge({
      name: 'vcpud_vcpus',
      help: 'vCPUs currently owned by vcpud.',
      registers,
      collect: () => vcpus.set(read((s) => s.vcpus(), 0)),
    });
    const exits: Counter<'reason'> = new Counter({
      name: 'vcpud_vcpu_exits_total',
      help: 'vCPU exits from KVM_RUN handled by vcpud, by exit reason.',
      labelNames: ['reason'],
      registers,
      collect: () => {
        // The runtime keeps the cumulative counts; mirror them (a counter has no set(), so reset + inc).
        exits.reset();
        for (const [reason, n] of Object.entries(read((s) => s.exitsByReason(), {}))) if (n >= 0) exits.inc({ reason }, n);
      },
    });

    const buildInfo = new Gauge({
      name: 'vcpud_build_info',
      help: 'vcpud version and Node.js version; always 1.',
      labelNames: ['version', 'node_version'],
      registers,
    });
    buildInfo.set({ version: options.version ?? packageVersion(), node_version: process.version }, 1);

    if (options.defaultMetrics ?? true) {
      collectDefaultMetrics({ register: this.registry, eventLoopMonitoringPrecision: EVENT_LOOP_SAMPLE_MS });
      // prom-client also exports these totals as gauges named like counters, which `promtool check metrics`
      // rejects; each is sum() of its per-type gauge (nodejs_active_handles{type} and so on), which stays.
      for (const name of GAUGES_NAMED_LIKE_COUNTERS) this.registry.removeSingleMetric(name);
    }
  }

  // --- gRPC (called by the metrics interceptor)

  /** Creates the series of a method with zeros, as go-grpc-prometheus does, so rate() works from the first scrape. */
  initializeMethod(labels: RpcLabels): void {
    this.started.inc(labels, 0);
    this.msgReceived.inc(labels, 0);
    this.msgSent.inc(labels, 0);
    for (const code of Object.values(CODE_NAMES)) this.handled.inc({ ...labels, grpc_code: code }, 0);
  }

  rpcStarted(labels: RpcLabels): void {
    this.rpc(labels).started();
  }

  rpcHandled(labels: RpcLabels, code: number, seconds: number): void {
    const series = this.rpc(labels);
    let handled = series.handled.get(code);
    if (!handled) series.handled.set(code, (handled = boundIncrement(this.handled, { ...labels, grpc_code: grpcCodeName(code) })));
    handled();
    series.handlingSeconds(seconds);
  }

  rpcMessageReceived(labels: RpcLabels): void {
    this.rpc(labels).msgReceived();
  }

  rpcMessageSent(labels: RpcLabels): void {
    this.rpc(labels).msgSent();
  }

  /** The bound series of one method's labels (bound-histogram.ts), made on its first call. */
  private rpc(labels: RpcLabels): RpcSeries {
    let series = this.rpcSeries.get(labels);
    if (!series) {
      series = {
        started: boundIncrement(this.started, labels),
        msgReceived: boundIncrement(this.msgReceived, labels),
        msgSent: boundIncrement(this.msgSent, labels),
        handled: new Map(),
        handlingSeconds: boundObserver(this.handlingSeconds, labels),
      };
      this.rpcSeries.set(labels, series);
    }
    return series;
  }

  // --- domain

  /** What the start found in the state directory. */
  recordHandover(restored: number, failed: number, lost: number, seconds: number): void {
    this.handoverVms.inc({ result: 'restored' }, restored);
    this.handoverVms.inc({ result: 'failed' }, failed);
    this.handoverVms.inc({ result: 'lost' }, lost);
    this.handoverRestoreSeconds.set(seconds);
  }

  /** For setIoctlObserver (src/ffi/observe.ts). */
  ioctlObserver(): IoctlObserver {
    return {
      onIoctl: (ioctl, seconds, errorCode) => {
        this.ioctlDuration(ioctl)(seconds);
        if (errorCode) this.ioctlErrors.inc({ ioctl, errno: errorCode });
      },
      durationRecorder: (ioctl) => this.ioctlDuration(ioctl),
      onNegotiationRetry: (ioctl) => this.negotiationRetries.inc({ ioctl }),
    };
  }

  /** The observer of one state section's bytes served (vcpud_state_bytes{section}): bound once, called per read. */
  stateBytesRecorder(section: string): Observe {
    return this.sectionBytes(section);
  }

  recordMigrationProgress(p: { dirtyRate: number; transferRate: number; bytesRemaining: number }): void {
    if (p.dirtyRate) this.migrationDirtyRate.set(p.dirtyRate);
    if (p.transferRate) this.migrationTransferRate.set(p.transferRate);
    this.migrationRemaining.set(p.bytesRemaining);
  }

  /** One outgoing migration ended; a successful one brings its report. */
  recordMigration(m: { result: OutgoingMigrationResult; report?: { bytesSent: number; passes: number; downtimeMs: number; tornPages: number } }): void {
    this.migrations.inc({ result: m.result });
    if (!m.report) return;
    this.migrationBytes.inc(m.report.bytesSent);
    this.migrationPasses.observe(m.report.passes);
    this.migrationDowntime.observe(m.report.downtimeMs / 1000);
    this.migrationTornPages.inc(m.report.tornPages);
  }

  /** A migration began (+1) or ended (-1), whatever its result. */
  migrationInProgress(direction: MigrationDirection, delta: 1 | -1): void {
    this.migrationsInProgress.inc({ direction }, delta);
  }

  /** One incoming migration ended. */
  recordIncomingMigration(result: IncomingMigrationResult): void {
    this.incomingMigrations.inc({ result });
  }

  /** Replaces the capability gauge with `caps` (capability name → KVM_CHECK_EXTENSION value). */
  setCapabilities(caps: Record<string, number>): void {
    this.capability.reset();
    for (const [capability, value] of Object.entries(caps)) this.capability.set({ capability }, value);
  }

  /** For ConnectionGate (src/server/connections.ts): its cap, then every connection it admits or refuses. */
  connectionEvents(listener: ListenerName, limit: number): ConnectionEvents {
    this.connectionLimit.set({ listener }, limit);
    this.connectionsOpen.set({ listener }, 0);
    this.connectionsRefused.inc({ listener }, 0);
    this.connectionsAccepted.inc({ listener }, 0);
    return {
      opened: () => {
        this.connectionsAccepted.inc({ listener });
        this.connectionsOpen.inc({ listener });
      },
      closed: () => this.connectionsOpen.dec({ listener }),
      refused: () => this.connectionsRefused.inc({ listener }),
    };
  }

  setSources(sources: MetricSources): void {
    this.sources = sources;
  }

  /** The exposition text (what GET /metrics returns). */
  scrape(): Promise<string> {
    return this.registry.metrics();
  }

  /**
   * Serves GET /metrics on exactly `hostPort` (no wildcard fallback); everything else is 404.
   * `gate` caps its connections; a connection that sends no complete request within `idleMs` is closed.
   */
  async serve(hostPort: string, guard?: { gate: ConnectionGate; idleMs: number }): Promise<http.Server> {
    const { host, port } = parseHostPort(hostPort);
    const timeouts = guard && {
      headersTimeout: guard.idleMs,
      requestTimeout: guard.idleMs,
      keepAliveTimeout: Math.min(5000, guard.idleMs),
      connectionsCheckingInterval: Math.min(1000, guard.idleMs),
    };
    const server = http.createServer({ ...timeouts }, (req, res) => {
      const url = new URL(req.url ?? '/', 'http://metrics');
      if (url.pathname !== '/metrics') {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
        return;
      }
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain' }).end('method not allowed\n');
        return;
      }
      this.scrape().then(
        (body) => res.writeHead(200, { 'content-type': this.registry.contentType }).end(req.method === 'HEAD' ? undefined : body),
        (e: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`collecting metrics failed: ${e.message}\n`),
      );
    });
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host, port, exclusive: true }, () => {
        server.off('error', reject);
        guard?.gate.guard(server);
        resolve(server);
      });
    });
  }
}
