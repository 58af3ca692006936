/**
 * GetState from one sequential client: the server's main-thread CPU per call (its schedstat run time,
 * so the other threads and the client are left out) and p50, for this build, optionally another build
 * (VCPUD_BEFORE, built as bench/compare-builds.ts says), and the trivial grpc-js handler answering the
 * same bytes, measured alternately for BENCH_ROUNDS rounds. One client shows a call's own cost, without
 * the queueing and batching of the 64-client load. The trivial handler making the same ioctls on a vCPU
 * of its own (bench/ioctl-handler-server.ts) is measured beside them.
 *
 *   [VCPUD_BEFORE=DIR/dist/src/server/main.js] node dist/bench/getstate-one-client.js
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { EMPTY_METHOD, fatal, knob, pausedCounterVm, startEmptyServer } from './floors';
import { GET_STATE_PATH, getStateRequest, rawGetState } from './loadgen';
import { startVcpud, VCPUD_MAIN, type VcpudProcess } from '../test/support/vcpud-process';

const BEFORE = knob('VCPUD_BEFORE', '', 'getstate-one-client: main.js of a build to compare this one with (optional)');
const ROUNDS = Number(knob('BENCH_ROUNDS', '4', 'getstate-one-client: rounds, the servers measured alternately'));
const CALLS = Number(knob('BENCH_CALLS', '3000', 'getstate-one-client: calls per measure, after 300 of warm-up'));
/** Node flags for the vcpuds, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof" (then bench/cpuprofile-shares.ts). */
const NODE_ARGS = knob('BENCH_NODE_ARGS', '', 'getstate-one-client: node flags for the vcpuds').split(' ').filter(Boolean);

/** CPU time the process's main thread has run, in ns (/proc/PID/task/PID/schedstat). */
export const mainThreadNs = (pid: number) => Number(fs.readFileSync(`/proc/${pid}/task/${pid}/schedstat`, 'utf8').split(' ')[0]);

export interface Target {
  name: string;
  pid: number;
  address: string;
  method: string;
  request: Buffer;
  /** The VM a GetState target reads. */
  vmId?: string;
}

/** Main-thread CPU per call and p50 of `t` served CALLS times (after 300 of warm-up) to one sequential client. */
export async function measure(t: Target): Promise<{ cpuUs: number; p50Us: number }> {
  const id = (b: Buffer) => b;
  const client = new grpc.Client(t.address, grpc.credentials.createInsecure());
  const one = () => new Promise<void>((resolve, reject) => client.makeUnaryRequest(t.method, id, id, t.request, (e) => (e ? reject(e) : resolve())));
  try {
    for (let i = 0; i < 300; i++) await one();
    const latencies = new Float64Array(CALLS);
    const start = mainThreadNs(t.pid);
    for (let i = 0; i < CALLS; i++) {
      const t0 = process.hrtime.bigint();
      await one();
      latencies[i] = Number(process.hrtime.bigint() - t0) / 1e3;
    }
    const cpuUs = (mainThreadNs(t.pid) - start) / 1e3 / CALLS;
    return { cpuUs, p50Us: latencies.sort()[CALLS >> 1] };
  } finally {
    client.close();
  }
}

async function vcpudTarget(name: string, p: VcpudProcess): Promise<Target> {
  const vm = await pausedCounterVm(p.client('VmService'));
  return { name, pid: p.proc.pid!, address: p.serving.api, method: GET_STATE_PATH, request: getStateRequest(vm.id, 0), vmId: vm.id };
}

/**
 * Measures every target in each of `rounds` rounds and prints a line per round, with this build / before
 * when a before build is among them. The order alternates, so no server always runs on the host as
 * another left it.
 */
export async function printRounds(targets: Target[], rounds: number): Promise<void> {
  for (let r = 0; r < rounds; r++) {
    const order = r % 2 ? [...targets].reverse() : targets;
    const figures = new Map<string, { cpuUs: number; p50Us: number }>();
    for (const t of order) figures.set(t.name, await measure(t));
    const cells = targets.map((t) => `${t.name} ${figures.get(t.name)!.cpuUs.toFixed(0)} us (p50 ${figures.get(t.name)!.p50Us.toFixed(0)})`);
    const before = figures.get('before');
    const ratio = before ? `; this build / before ${(figures.get('this build')!.cpuUs / before.cpuUs).toFixed(2)}` : '';
    console.log(`round ${r + 1}: ${cells.join(', ')}${ratio}`);
  }
}

async function main(): Promise<void> {
  const builds = [await startVcpud([], {}, NODE_ARGS, { main: VCPUD_MAIN }), ...(BEFORE ? [await startVcpud([], {}, NODE_ARGS, { main: BEFORE })] : [])];
  const targets = [await vcpudTarget('this build', builds[0]), ...(builds[1] ? [await vcpudTarget('before', builds[1])] : [])];
  const reply = await rawGetState(targets[0].address, targets[0].vmId!);
  const trivial = await startEmptyServer(reply);
  // The trivial handler that also makes the 12 GET ioctls on a paused vCPU of its own (ioctl-handler-server.ts).
  const withIoctls = await startEmptyServer(reply, { ioctls: true });
  targets.push({ name: 'trivial', pid: trivial.pid, address: trivial.target, method: EMPTY_METHOD, request: Buffer.alloc(0) });
  targets.push({ name: 'trivial+ioctls', pid: withIoctls.pid, address: withIoctls.target, method: EMPTY_METHOD, request: Buffer.alloc(0) });
  try {
    console.log(`GetState (all sections, one paused vCPU), one sequential client: ${CALLS} calls per measure, ${ROUNDS} rounds`);
    console.log('main-thread CPU per call (us) and p50 (us) per server\n');
    await printRounds(targets, ROUNDS);
  } finally {
    await trivial.stop();
    await withIoctls.stop();
    for (const b of builds) await b.stop();
  }
}

if (require.main === module) main().catch(fatal);
