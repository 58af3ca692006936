/**
 * GetState under load on two vcpud builds side by side, with the trivial same-bytes handler, the three
 * measured alternately for BENCH_ROUNDS rounds: server CPU per call, calls/s, p50 and peak RSS, and the
 * ratios after / before within each round. On a shared host, comparing two builds in separate runs
 * minutes apart measures the host more than the change.
 *
 *   mkdir DIR && git archive OLD_COMMIT | tar -x -C DIR
 *   ln -s $PWD/node_modules DIR/node_modules; mkdir -p DIR/build; ln -s $PWD/build/Release DIR/build/Release
 *   (cd DIR && npx tsc -p tsconfig.json)      # the addon and guests are this tree's (unchanged native code)
 *   VCPUD_BEFORE=DIR/dist/src/server/main.js node dist/bench/compare-builds.js
 */
import { pausedCounterVm, cpuSeconds, EMPTY_METHOD, fatal, knob, MiB, rssBytes, startEmptyServer } from './floors';
import { rawGetState, runLoad, type LoadOptions } from './loadgen';
import { startVcpud, VCPUD_MAIN } from '../test/support/vcpud-process';

const BEFORE = knob('VCPUD_BEFORE', '', 'compare-builds: main.js of the build to compare this one with (required)');
const ROUNDS = Number(knob('BENCH_ROUNDS', '3', 'compare-builds: rounds of the three measures, alternating'));
const SECONDS = Number(knob('BENCH_SECONDS', '4', 'compare-builds: seconds per measure, after 1 s of warm-up'));

interface Figures {
  callsPerSecond: number;
  cpuUs: number;
  p50Ms: number;
  peakMiB: number;
  ok: boolean;
}

async function measure(pid: number, opts: Omit<LoadOptions, 'clients'>): Promise<Figures> {
  let peak = rssBytes(pid);
  const timer = setInterval(() => (peak = Math.max(peak, rssBytes(pid))), 100);
  let cpu0 = 0;
  try {
    const r = await runLoad({
      ...opts,
      clients: 64,
      inFlight: 1,
      durationSeconds: SECONDS,
      warmupSeconds: 1,
      onMeasuring: () => void (cpu0 = cpuSeconds(pid)),
    });
    return {
      callsPerSecond: r.callsPerSecond,
      cpuUs: ((cpuSeconds(pid) - cpu0) / r.calls) * 1e6,
      p50Ms: r.latencyMs.p50,
      peakMiB: peak / MiB,
      ok: r.codes.OK === r.calls,
    };
  } finally {
    clearInterval(timer);
  }
}

const line = (name: string, f: Figures) =>
  `${name.padEnd(8)} ${f.callsPerSecond.toFixed(0).padStart(6)} calls/s ${f.cpuUs.toFixed(0).padStart(6)} us CPU/call  p50 ${f.p50Ms.toFixed(1).padStart(6)} ms  peak RSS ${f.peakMiB.toFixed(0)} MiB${f.ok ? '' : '  (calls failed)'}`;

async function main(): Promise<void> {
  if (!BEFORE) throw new Error('set VCPUD_BEFORE to the main.js of the build to compare with');
  const before = await startVcpud([], {}, [], { main: BEFORE });
  const after = await startVcpud();
  try {
    const vb = await pausedCounterVm(before.client('VmService'));
    const va = await pausedCounterVm(after.client('VmService'));
    const trivial = await startEmptyServer(await rawGetState(after.serving.api, va.id));
    try {
      console.log(`before: ${BEFORE}\nafter:  ${VCPUD_MAIN}\n64 clients, ${SECONDS} s per measure, ${ROUNDS} rounds\n`);
      for (let r = 0; r < ROUNDS; r++) {
        const t = await measure(trivial.pid, { target: trivial.target, method: EMPTY_METHOD });
        const b = await measure(before.proc.pid!, { target: before.serving.api, vmId: vb.id, vcpuId: 0 });
        const a = await measure(after.proc.pid!, { target: after.serving.api, vmId: va.id, vcpuId: 0 });
        console.log(`round ${r + 1}\n  ${line('trivial', t)}\n  ${line('before', b)}\n  ${line('after', a)}`);
        console.log(
          `  after / before: CPU per call ${(a.cpuUs / b.cpuUs).toFixed(2)}, peak RSS ${(a.peakMiB / b.peakMiB).toFixed(2)}; calls/s against the trivial handler ${(b.callsPerSecond / t.callsPerSecond).toFixed(2)} -> ${(a.callsPerSecond / t.callsPerSecond).toFixed(2)}`,
        );
      }
    } finally {
      await trivial.stop();
    }
  } finally {
    await before.stop();
    await after.stop();
  }
}

if (require.main === module) main().catch(fatal);
