/**
 * SetState from one sequential client: the server's main-thread CPU per call and p50, as
 * bench/getstate-one-client.ts measures GetState, for this build, optionally another build (VCPUD_BEFORE,
 * built as bench/compare-builds.ts says), and the trivial grpc-js handler receiving the same request
 * bytes, measured alternately for BENCH_ROUNDS rounds. The request writes every section of a paused
 * counter64 vCPU with the values GetState answered for it, so every call succeeds and changes nothing.
 *
 *   [VCPUD_BEFORE=DIR/dist/src/server/main.js] node dist/bench/setstate-one-client.js
 *
 * DIR as bench/compare-builds.ts says, plus the descriptor set the server's reflection loads:
 *   cp dist/src/descriptor-set.binpb DIR/dist/src/
 */
import { messageType } from '../src/cli/vcpuctl/client';
import { EMPTY_METHOD, fatal, knob, pausedCounterVm, startEmptyServer } from './floors';
import { printRounds, type Target } from './getstate-one-client';
import { rawGetState } from './loadgen';
import { startVcpud, VCPUD_MAIN, type VcpudProcess } from '../test/support/vcpud-process';

const BEFORE = knob('VCPUD_BEFORE', '', 'setstate-one-client: main.js of a build to compare this one with (optional)');
const ROUNDS = Number(knob('BENCH_ROUNDS', '4', 'setstate-one-client: rounds, the servers measured alternately'));
/** Node flags for the vcpuds, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof" (then bench/cpuprofile-shares.ts). */
const NODE_ARGS = knob('BENCH_NODE_ARGS', '', 'setstate-one-client: node flags for the vcpuds').split(' ').filter(Boolean);
const SET_STATE_PATH = '/vcpud.v1.VcpuStateService/SetState';

/** A SetStateRequest writing back every section GetState answers for the VM's vCPU 0. */
async function setStateRequest(address: string, vmId: string): Promise<Buffer> {
  const got = messageType('vcpud.v1.GetStateResponse').decode(await rawGetState(address, vmId)) as unknown as { state: object };
  const T = messageType('vcpud.v1.SetStateRequest');
  return Buffer.from(T.encode(T.fromObject({ vmId, vcpuId: 0, state: got.state })).finish());
}

async function vcpudTarget(name: string, p: VcpudProcess): Promise<Target> {
  const vm = await pausedCounterVm(p.client('VmService'));
  return { name, pid: p.proc.pid!, address: p.serving.api, method: SET_STATE_PATH, request: await setStateRequest(p.serving.api, vm.id), vmId: vm.id };
}

async function main(): Promise<void> {
  const builds = [await startVcpud([], {}, NODE_ARGS, { main: VCPUD_MAIN }), ...(BEFORE ? [await startVcpud([], {}, NODE_ARGS, { main: BEFORE })] : [])];
  const targets = [await vcpudTarget('this build', builds[0]), ...(builds[1] ? [await vcpudTarget('before', builds[1])] : [])];
  const trivial = await startEmptyServer(Buffer.alloc(0));
  targets.push({ name: 'trivial', pid: trivial.pid, address: trivial.target, method: EMPTY_METHOD, request: targets[0].request });
  try {
    console.log(`SetState (every section, one paused vCPU, ${targets[0].request.length}-byte request), one sequential client, ${ROUNDS} rounds`);
    console.log('main-thread CPU per call (us) and p50 (us) per server\n');
    await printRounds(targets, ROUNDS);
  } finally {
    await trivial.stop();
    for (const b of builds) await b.stop();
  }
}

if (require.main === module) main().catch(fatal);
