/**
 * GetState (all sections, one paused vCPU) over the Unix socket of a real vcpud process: p50 / p99
 * latency and throughput, against an empty grpc-js unary call (a trivial handler in its own process,
 * same socket kind) and the raw ioctl sum (bench/c/ioctl_floor), all in the same run.
 * Target: p50 <= 1.3 x (empty-call p50 + raw ioctl sum).
 */
import * as grpc from '@grpc/grpc-js';
import type { ServiceDefinition } from '@grpc/proto-loader';
import { vcpudPackageDefinition } from '../src/server/proto';
import { call, startVcpud } from '../test/support/vcpud-process';
import { rawGetState } from './loadgen';
import { EMPTY_METHOD, cFloor, fatal, guestBin, knob, pausedCounterVm, percentile, ratioRow, startEmptyServer, table, type BenchResult } from './floors';

const N = Number(knob('BENCH_CALLS', '2000', 'getstate: sequential calls timed (GetState and the empty call each)'));
const TARGET = { op: '<=', ratio: 1.3 } as const;
const SECTION_IOCTLS = [
  'KVM_GET_MP_STATE', 'KVM_GET_VCPU_EVENTS', 'KVM_GET_REGS', 'KVM_GET_FPU', 'KVM_GET_XSAVE2', 'KVM_GET_XCRS', 'KVM_GET_SREGS',
  'KVM_GET_SREGS2', 'KVM_GET_LAPIC', 'KVM_GET_MSRS', 'KVM_GET_DEBUGREGS', 'KVM_GET_CPUID2', 'KVM_GET_TSC_KHZ',
];

async function timeCalls(fn: () => Promise<unknown>, n: number): Promise<{ p50: number; p99: number; perSecond: number }> {
  for (let i = 0; i < Math.min(200, n); i++) await fn(); // warm-up
  const lat: number[] = [];
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    await fn();
    lat.push(Number(process.hrtime.bigint() - t) / 1000);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { p50: percentile(lat, 50), p99: percentile(lat, 99), perSecond: n / seconds };
}

/**
 * Sequential calls to a trivial handler: an empty reply, or `reply` (GetState's own response bytes) decoded by
 * the client exactly as vcpud's answer is, so the difference to GetState is what vcpud itself spends.
 */
async function trivialFloor(reply?: Buffer): Promise<{ p50: number; p99: number; perSecond: number }> {
  const server = await startEmptyServer(reply);
  const id = (x: Buffer) => x;
  const decode = reply ? getStateMethod().responseDeserialize : id;
  const client = new grpc.Client(server.target, grpc.credentials.createInsecure());
  const once = () =>
    new Promise((resolve, reject) => client.makeUnaryRequest(EMPTY_METHOD, id, decode, Buffer.alloc(0), (e, r) => (e ? reject(e) : resolve(r))));
  const r = await timeCalls(once, N);
  client.close();
  await server.stop();
  return r;
}

const getStateMethod = () => (vcpudPackageDefinition()['vcpud.v1.VcpuStateService'] as ServiceDefinition).GetState;

/** One row: GetState p50 beside (empty-call p50 + raw ioctl sum). */
export async function measureGetState(): Promise<BenchResult> {
  const floor = cFloor('ioctl_floor', ['5000', guestBin('counter64')]) as Record<string, number>;
  const rawSumUs = SECTION_IOCTLS.reduce((a, k) => a + (floor[k] ?? 0), 0) / 1000;
  const d = await startVcpud();
  try {
    const vms = d.client('VmService');
    const state = d.client('VcpuStateService');
    const vm = await pausedCounterVm(vms);
    const reply = await rawGetState(d.serving.api, vm.id);
    const empty = await trivialFloor();
    const same = await trivialFloor(reply);
    const req = { vmId: vm.id, vcpuId: 0 };
    const get = await timeCalls(() => call(state, 'GetState', req), N);
    const row = ratioRow('GetState p50, all sections, 1 paused vCPU (UDS)', get.p50, empty.p50 + rawSumUs, 'us', 'empty grpc-js call p50 + raw ioctl sum', TARGET);
    const sameRow = ratioRow(
      'GetState p50 against its own response from a trivial handler',
      get.p50,
      same.p50 + rawSumUs,
      'us',
      `the same ${reply.length}-byte reply, client decode included, + raw ioctl sum`,
    );
    const limit = TARGET.ratio * row.floor!;
    const detail = [
      `GetState, all 13 sections of one paused vCPU, over the Unix socket (${N} sequential calls; microseconds)\n`,
      table(
        ['measure', 'p50 us', 'p99 us', 'calls/s'],
        [
          ['raw ioctl sum (C, 13 GET ioctls)', rawSumUs, rawSumUs, 1e6 / rawSumUs],
          ['empty grpc-js unary call (UDS)', empty.p50, empty.p99, empty.perSecond],
          [`trivial handler sending GetState's ${reply.length} bytes, decoded by the client`, same.p50, same.p99, same.perSecond],
          ['GetState through vcpud', get.p50, get.p99, get.perSecond],
        ],
      ),
      `\nratio p50 / (empty p50 + raw sum) = ${row.ratio!.toFixed(2)} (target <= ${TARGET.ratio}, i.e. p50 <= ${limit.toFixed(0)} us): ${row.met ? 'met' : 'NOT met'}`,
    ].join('\n');
    return { rows: [row, sameRow], detail };
  } finally {
    await d.stop();
  }
}

async function main(): Promise<void> {
  console.log((await measureGetState()).detail);
}

if (require.main === module) main().catch(fatal);
