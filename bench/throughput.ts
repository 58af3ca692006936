/**
 * GetState throughput with 64 concurrent clients (separate connections, one call in flight each)
 * against the same load on an empty grpc-js handler, both over a Unix socket, in one run.
 * Target: GetState calls/s >= 0.7 x the empty handler's. Also vcpud's RSS idle and under that load,
 * against the target RSS <= 80 MiB + guest memory.
 *
 * BENCH_SECONDS (default 5) per measurement, after 1 s of warm-up; BENCH_CLIENTS (default 64).
 * vcpud runs with its default configuration (info level: one log line per call).
 */
import { rawGetState, runLoad, type LoadOptions, type LoadResult } from './loadgen';
import { EMPTY_METHOD, MiB, cpuSeconds, fatal, knob, pausedCounterVm, ratioRow, rowsTable, rssBytes, startEmptyServer, table, type BenchResult, type BenchRow } from './floors';
import { startVcpud } from '../test/support/vcpud-process';

const SECONDS = Number(knob('BENCH_SECONDS', '5', 'throughput: seconds per measurement, after 1 s of warm-up'));
const CLIENTS = Number(knob('BENCH_CLIENTS', '64', 'throughput: concurrent clients (one connection, one call in flight each)'));
const TARGET = { op: '>=', ratio: 0.7 } as const;
const RSS_ALLOWANCE = 80 * MiB;

/** A load run and the CPU seconds its server process spent meanwhile (warm-up included). */
export interface Measured {
  load: LoadResult;
  serverCpuSeconds: number;
}

export interface ThroughputFigures extends BenchResult {
  empty: Measured;
  /** A trivial handler sending GetState's own response bytes: the floor for a response that size. */
  sameBytes: Measured & { bytes: number; peakRss: number };
  getState: Measured;
  rss: { idle: number; peak: number; end: number; guestMemory: number };
}

export interface ThroughputOptions {
  seconds?: number;
  clients?: number;
}

/**
 * Runs `opts` against server process `pid`: the CPU seconds it spent during the measured calls,
 * and its RSS sampled every 100 ms.
 */
async function measure(pid: number, opts: LoadOptions): Promise<Measured & { peakRss: number }> {
  let peakRss = rssBytes(pid);
  const timer = setInterval(() => (peakRss = Math.max(peakRss, rssBytes(pid))), 100);
  let cpu0 = 0;
  try {
    const load = await runLoad({ ...opts, onMeasuring: () => void (cpu0 = cpuSeconds(pid)) });
    return { load, serverCpuSeconds: cpuSeconds(pid) - cpu0, peakRss };
  } finally {
    clearInterval(timer);
  }
}

export async function measureThroughput(opts: ThroughputOptions = {}): Promise<ThroughputFigures> {
  const seconds = opts.seconds ?? SECONDS;
  const clients = opts.clients ?? CLIENTS;
  const load = { clients, inFlight: 1, durationSeconds: seconds, warmupSeconds: 1 };

  const server = await startEmptyServer();
  let empty: Measured;
  try {
    empty = await measure(server.pid, { ...load, target: server.target, method: EMPTY_METHOD });
  } finally {
    await server.stop();
  }

  const d = await startVcpud();
  try {
    const pid = d.proc.pid!;
    const vm = await pausedCounterVm(d.client('VmService'));
    const reply = await rawGetState(d.serving.api, vm.id);
    const trivial = await startEmptyServer(reply);
    let sameBytes: ThroughputFigures['sameBytes'];
    try {
      sameBytes = { ...(await measure(trivial.pid, { ...load, target: trivial.target, method: EMPTY_METHOD })), bytes: reply.length };
    } finally {
      await trivial.stop();
    }
    await new Promise((r) => setTimeout(r, 500)); // let start-up garbage settle before "idle"
    const idle = rssBytes(pid);
    const { peakRss, ...getState } = await measure(pid, { ...load, target: d.serving.api, vmId: vm.id, vcpuId: 0, metricsUrl: d.serving.metrics });
    const end = rssBytes(pid);
    const peak = Math.max(peakRss, end);
    const g = getState.load;
    const guestMiB = vm.memoryBytes / MiB;
    const rssRow = (name: string, bytes: number): BenchRow => ({
      name,
      value: bytes / MiB,
      unit: 'MiB',
      floor: guestMiB,
      floorName: 'guest memory',
      ratio: null,
      target: `<= ${(RSS_ALLOWANCE + vm.memoryBytes) / MiB} MiB`,
      met: bytes <= RSS_ALLOWANCE + vm.memoryBytes,
    });
    const rate = ratioRow(`GetState throughput, ${clients} clients (UDS)`, g.callsPerSecond, empty.load.callsPerSecond, 'calls/s', 'empty grpc-js handler', TARGET);
    const rows: BenchRow[] = [
      // Failed calls would make it a throughput of errors: not met, whatever the rate.
      { ...rate, met: rate.met === true && g.calls === (g.codes.OK ?? 0) },
      ratioRow(`GetState throughput against its own response from a trivial handler`, g.callsPerSecond, sameBytes.load.callsPerSecond, 'calls/s', `the same ${sameBytes.bytes}-byte reply, ${clients} clients`),
      rssRow('vcpud RSS idle (1 VM)', idle),
      rssRow(`vcpud RSS under load (peak)`, peak),
      {
        name: `trivial grpc-js handler RSS under the same load (peak)`,
        value: sameBytes.peakRss / MiB,
        unit: 'MiB',
        floor: null,
        floorName: '',
        ratio: null,
        target: '-',
        met: null,
      },
    ];
    const figures = { empty, sameBytes, getState, rss: { idle, peak, end, guestMemory: vm.memoryBytes } };
    return { rows, detail: throughputDetail(figures), ...figures };
  } finally {
    await d.stop();
  }
}

function loadRow(name: string, m: Measured): string[] {
  const { load: r, serverCpuSeconds } = m;
  const l = r.latencyMs;
  const perCall = (s: number) => ((s / r.calls) * 1e6).toFixed(0);
  return [
    name,
    r.callsPerSecond.toFixed(0),
    l.p50.toFixed(2),
    l.p99.toFixed(2),
    String(r.calls),
    Object.entries(r.codes).map(([c, n]) => `${c} ${n}`).join(', '),
    perCall(serverCpuSeconds),
    perCall(r.clientCpuSeconds),
  ];
}

/** The text table of a run: both loads side by side, the server's cross-check, RSS. */
function throughputDetail(f: Omit<ThroughputFigures, keyof BenchResult>): string {
  const g = f.getState.load;
  const mib = (b: number) => `${(b / MiB).toFixed(1)} MiB`;
  return [
    `Throughput: ${g.clients} clients x ${g.inFlight} in flight, separate connections, Unix socket, ${g.seconds.toFixed(1)} s each after 1 s warm-up\n`,
    table(
      ['measure', 'calls/s', 'p50 ms', 'p99 ms', 'calls', 'codes', 'server CPU us/call', 'client CPU us/call'],
      [
        loadRow('empty grpc-js handler', f.empty),
        loadRow(`trivial handler sending GetState's ${f.sameBytes.bytes} bytes`, f.sameBytes),
        loadRow('GetState, all sections, 1 paused vCPU', f.getState),
      ],
    ),
    ...(g.server ? [`\nserver grpc_server_handled_total delta: ${g.server.calls} (${g.server.match ? 'agrees with the client' : 'MISMATCH with the client'})`] : []),
    "(CPU per call from /proc/PID/stat at 10 ms resolution; the client and the server share the machine's cores)",
    `vcpud RSS: idle ${mib(f.rss.idle)}, peak under load ${mib(f.rss.peak)}, at the end of load ${mib(f.rss.end)} (guest memory ${mib(f.rss.guestMemory)}); the trivial handler's peak under the same load ${mib(f.sameBytes.peakRss)}`,
  ].join('\n');
}

export async function main(): Promise<void> {
  const f = await measureThroughput();
  console.log(`${f.detail}\n\n${rowsTable(f.rows)}`);
}

if (require.main === module) main().catch(fatal);
