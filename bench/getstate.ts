/**
 * GetState (all sections, one paused vCPU) over the Unix socket of a real vcpud process: p50 / p99
 * latency and throughput, against a trivial grpc-js handler (in its own process, same socket kind)
 * answering GetState's own response bytes, and the raw ioctl sum (bench/c/ioctl_floor), all in the same
 * run. Target (issue 17): p50 <= 1.15 x (trivial same-bytes p50 + raw ioctl sum). The empty-call
 * ratio is kept as information.
 */
import * as grpc from '@grpc/grpc-js';
import type { ServiceDefinition } from '@grpc/proto-loader';
import { vcpudPackageDefinition } from '../src/api/proto';
import { startVcpud } from '../test/support/vcpud-process';
import { GET_STATE_PATH, getStateRequest, rawGetState } from './loadgen';
import { EMPTY_METHOD, cFloor, fatal, guestBin, knob, pausedCounterVm, percentile, ratioRow, startEmptyServer, table, type BenchResult } from './floors';

const N = Number(knob('BENCH_CALLS', '2000', 'getstate: sequential calls timed (GetState and the empty call each)'));
const ROUNDS = Number(knob('BENCH_ROUNDS_GETSTATE', '4', 'getstate: blocks the calls of each measure are split into, alternating'));
/**
 * Untimed calls to each server first. V8 compiles a call path's functions with its optimizing tiers only
 * after thousands of calls, and vcpud's path is longer than a trivial handler's: after 200 calls vcpud's
 * p50 was still 15-20% above its own steady state (624 against 505 us), the handlers' 5-15%.
 */
const WARMUP = Number(knob('BENCH_WARMUP_GETSTATE', '3000', 'getstate: untimed calls to each server before the timed ones'));
const TARGET = { op: '<=', ratio: 1.15 } as const;
/**
 * The GET ioctls a full GetState makes: every section's, less KVM_GET_SREGS, which a batch with
 * KVM_GET_SREGS2 and KVM_GET_VCPU_EVENTS answers from them (src/ffi/sregs-from-sregs2.ts). The floor
 * counts what vcpud makes, so the figure it leaves out is not a head start.
 */
const SECTION_IOCTLS = [
  'KVM_GET_MP_STATE',
  'KVM_GET_VCPU_EVENTS',
  'KVM_GET_REGS',
  'KVM_GET_FPU',
  'KVM_GET_XSAVE2',
  'KVM_GET_XCRS',
  'KVM_GET_SREGS2',
  'KVM_GET_LAPIC',
  'KVM_GET_MSRS',
  'KVM_GET_DEBUGREGS',
  'KVM_GET_CPUID2',
  'KVM_GET_TSC_KHZ',
];

/** The GET ioctls of a full GetState (SECTION_IOCTLS) in C (bench/c/ioctl_floor, `calls` each), summed: microseconds. */
export function rawIoctlSumUs(calls = 5000): number {
  const floor = cFloor('ioctl_floor', [String(calls), guestBin('counter64')]) as Record<string, number>;
  return SECTION_IOCTLS.reduce((a, k) => a + (floor[k] ?? 0), 0) / 1000;
}

interface Timed {
  p50: number;
  p99: number;
  perSecond: number;
}

/**
 * Times `n` sequential calls of each function, alternating between them in ROUNDS blocks, so that
 * the load other processes put on a shared host falls on every measure alike.
 */
async function timeAlternating(fns: (() => Promise<unknown>)[], n: number): Promise<Timed[]> {
  for (const fn of fns) for (let i = 0; i < WARMUP; i++) await fn();
  const lat = fns.map(() => [] as number[]);
  const seconds = fns.map(() => 0);
  for (let r = 0; r < ROUNDS; r++) {
    for (const [f, fn] of fns.entries()) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < Math.ceil(n / ROUNDS); i++) {
        const t = process.hrtime.bigint();
        await fn();
        lat[f].push(Number(process.hrtime.bigint() - t) / 1000);
      }
      seconds[f] += Number(process.hrtime.bigint() - t0) / 1e9;
    }
  }
  return lat.map((l, f) => ({ p50: percentile(l, 50), p99: percentile(l, 99), perSecond: l.length / seconds[f] }));
}

/** One sequential caller of `method` on `target`: every server measured here is called the same way. */
interface Caller {
  once: () => Promise<unknown>;
  close: () => Promise<void>;
}

/**
 * A grpc-js client making the same unary call again and again, with no deadline and no metadata, the
 * response decoded by `decode`: vcpud and the trivial handlers get the same client, so a difference in
 * p50 is the servers' (a stub with a deadline per call costs the client timers and the server a
 * deadline timer and a grpc-timeout header of its own, 20-60 us of p50 here).
 */
function rawCaller(target: string, method: string, request: Buffer, decode: (b: Buffer) => unknown, stop: () => Promise<void> = async () => {}): Caller {
  const id = (x: Buffer) => x;
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  const once = () => new Promise((resolve, reject) => client.makeUnaryRequest(method, id, decode, request, (e, r) => (e ? reject(e) : resolve(r))));
  return {
    once,
    async close() {
      client.close();
      await stop();
    },
  };
}

/**
 * A caller of a trivial handler: an empty reply, or `reply` (GetState's own response bytes) decoded by
 * the client exactly as vcpud's answer is, so the difference to GetState is what vcpud itself spends.
 */
async function trivialCaller(reply?: Buffer, how: { ioctls?: boolean } = {}): Promise<Caller> {
  const server = await startEmptyServer(reply, how);
  return rawCaller(server.target, EMPTY_METHOD, Buffer.alloc(0), reply ? getStateMethod().responseDeserialize : (x: Buffer) => x, () => server.stop());
}

const getStateMethod = () => (vcpudPackageDefinition()['vcpud.v1.VcpuStateService'] as ServiceDefinition).GetState;

/** One row: GetState p50 beside (empty-call p50 + raw ioctl sum). */
export async function measureGetState(): Promise<BenchResult> {
  const rawSumUs = rawIoctlSumUs();
  const d = await startVcpud();
  try {
    const vm = await pausedCounterVm(d.client('VmService'));
    const reply = await rawGetState(d.serving.api, vm.id);
    const callers = [
      await trivialCaller(),
      await trivialCaller(reply),
      await trivialCaller(reply, { ioctls: true }),
      rawCaller(d.serving.api, GET_STATE_PATH, getStateRequest(vm.id, 0), getStateMethod().responseDeserialize),
    ];
    let empty: Timed, same: Timed, withIoctls: Timed, get: Timed;
    try {
      [empty, same, withIoctls, get] = await timeAlternating(
        callers.map((c) => c.once),
        N,
      );
    } finally {
      for (const c of callers) await c.close();
    }
    const emptyRow = ratioRow(
      'GetState p50 against an empty call (information)',
      get.p50,
      empty.p50 + rawSumUs,
      'us',
      'empty grpc-js call p50 + raw ioctl sum',
    );
    const row = ratioRow(
      'GetState p50, all sections, 1 paused vCPU (UDS)',
      get.p50,
      same.p50 + rawSumUs,
      'us',
      `trivial handler p50 sending the same ${reply.length}-byte reply, client decode included, + raw ioctl sum`,
      TARGET,
    );
    const inContextRow = ratioRow(
      'GetState p50 against a trivial handler making the same ioctls (information)',
      get.p50,
      withIoctls.p50,
      'us',
      'trivial same-bytes handler p50 that first makes the 12 GET ioctls on its own paused vCPU, client decode included',
    );
    const limit = TARGET.ratio * row.floor!;
    const detail = [
      `GetState, all 13 sections of one paused vCPU, over the Unix socket (${N} sequential calls each, in ${ROUNDS} alternating blocks; microseconds)\n`,
      table(
        ['measure', 'p50 us', 'p99 us', 'calls/s'],
        [
          ['raw ioctl sum (C, 12 GET ioctls)', rawSumUs, rawSumUs, 1e6 / rawSumUs],
          ['empty grpc-js unary call (UDS)', empty.p50, empty.p99, empty.perSecond],
          [`trivial handler sending GetState's ${reply.length} bytes, decoded by the client`, same.p50, same.p99, same.perSecond],
          ['the same, making the 12 GET ioctls first (one native batch)', withIoctls.p50, withIoctls.p99, withIoctls.perSecond],
          ['GetState through vcpud', get.p50, get.p99, get.perSecond],
        ],
      ),
      `\nratio p50 / (trivial same-bytes p50 + raw sum) = ${row.ratio!.toFixed(2)} (target <= ${TARGET.ratio}, i.e. p50 <= ${limit.toFixed(0)} us): ${row.met ? 'met' : 'NOT met'}`,
      `ratio p50 / (empty p50 + raw sum) = ${emptyRow.ratio!.toFixed(2)} (information)`,
      `ratio p50 / p50 of the trivial handler making the ioctls = ${inContextRow.ratio!.toFixed(2)} (information: the ioctls as they cost between gRPC calls, ${(withIoctls.p50 - same.p50).toFixed(0)} us of p50 here against ${rawSumUs.toFixed(0)} us in the tight C loop)`,
    ].join('\n');
    return { rows: [row, emptyRow, inContextRow], detail };
  } finally {
    await d.stop();
  }
}

async function main(): Promise<void> {
  console.log((await measureGetState()).detail);
}

if (require.main === module) main().catch(fatal);
