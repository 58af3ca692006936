/**
 * GetState under load on two vcpud builds side by side, with the trivial same-bytes handler, the three
 * measured alternately for BENCH_ROUNDS rounds: server CPU per call, calls/s, p50 and peak RSS, and the
 * ratios after / before within each round. On a shared host, comparing two builds in separate runs
 * minutes apart measures the host more than the change.
 *
 * Then (BENCH_SNAPSHOT_MIB, 0 to skip) CreateSnapshot of a paused guest of that size filled with random
 * bytes on both builds, alternating which goes first, beside cp and cp + sync of a file of the same bytes
 * in the same round (bench/snapshot.ts's floors): wall time and the vcpud process's CPU time compare the
 * builds with each other, the cp figures show how far the floor itself moved between rounds.
 *
 *   mkdir DIR && git archive OLD_COMMIT | tar -x -C DIR
 *   ln -s $PWD/node_modules DIR/node_modules; mkdir -p DIR/build; ln -s $PWD/build/Release DIR/build/Release
 *   (cd DIR && npx tsc -p tsconfig.json)      # the addon and guests are this tree's (unchanged native code)
 *   VCPUD_BEFORE=DIR/dist/src/server/main.js node dist/bench/compare-builds.js
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pausedCounterVm, cpuSeconds, EMPTY_METHOD, fatal, knob, median, MiB, rssBytes, startEmptyServer } from './floors';
import { rawGetState, runLoad, type LoadOptions } from './loadgen';
import { randomCounterVm, timeCp, timeCreateSnapshot, writeFloorSource } from './snapshot';
import { call, startVcpud, VCPUD_MAIN, type VcpudProcess } from '../test/support/vcpud-process';

const BEFORE = knob('VCPUD_BEFORE', '', 'compare-builds: main.js of the build to compare this one with (required)');
const ROUNDS = Number(knob('BENCH_ROUNDS', '3', 'compare-builds: rounds of the three measures, alternating'));
const SECONDS = Number(knob('BENCH_SECONDS', '4', 'compare-builds: seconds per measure, after 1 s of warm-up'));
const SNAPSHOT_MIB = Number(knob('BENCH_SNAPSHOT_MIB', '256', 'compare-builds: guest size of the CreateSnapshot comparison in MiB (0: skip it)'));
const SNAPSHOT_ROUNDS = Number(knob('BENCH_SNAPSHOT_ROUNDS', '6', 'compare-builds: rounds of the CreateSnapshot comparison'));

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

async function compareGetState(before: VcpudProcess, after: VcpudProcess): Promise<void> {
  const vb = await pausedCounterVm(before.client('VmService'));
  const va = await pausedCounterVm(after.client('VmService'));
  const trivial = await startEmptyServer(await rawGetState(after.serving.api, va.id));
  try {
    console.log(`GetState: 64 clients, ${SECONDS} s per measure, ${ROUNDS} rounds\n`);
    for (let r = 0; r < ROUNDS; r++) {
      const t = await measure(trivial.pid, { target: trivial.target, method: EMPTY_METHOD });
      // Which build goes first alternates, so neither always runs on the host as the other left it.
      const measureBuild = (p: VcpudProcess, vmId: string) => measure(p.proc.pid!, { target: p.serving.api, vmId, vcpuId: 0 });
      let a: Figures;
      let b: Figures;
      if (r % 2) {
        a = await measureBuild(after, va.id);
        b = await measureBuild(before, vb.id);
      } else {
        b = await measureBuild(before, vb.id);
        a = await measureBuild(after, va.id);
      }
      console.log(`round ${r + 1}\n  ${line('trivial', t)}\n  ${line('before', b)}\n  ${line('after', a)}`);
      console.log(
        `  after / before: CPU per call ${(a.cpuUs / b.cpuUs).toFixed(2)}, peak RSS ${(a.peakMiB / b.peakMiB).toFixed(2)}; calls/s against the trivial handler ${(b.callsPerSecond / t.callsPerSecond).toFixed(2)} -> ${(a.callsPerSecond / t.callsPerSecond).toFixed(2)}`,
      );
    }
  } finally {
    await trivial.stop();
  }
}

async function compareCreateSnapshot(builds: { name: string; vcpud: VcpudProcess }[], dir: string): Promise<void> {
  const size = SNAPSHOT_MIB * MiB;
  const fill = crypto.randomBytes(32 * MiB);
  const vms = await Promise.all(builds.map((b) => randomCounterVm(b.vcpud.client('VmService'), size, fill, 'compare')));
  // Paused: a running guest's vCPU thread would count in its vcpud's CPU time and load the host besides.
  await Promise.all(builds.map((b, i) => call(b.vcpud.client('VmService'), 'PauseVm', { vmId: vms[i] })));
  const src = path.join(dir, 'floor.src');
  const dst = path.join(dir, 'floor.dst');
  writeFloorSource(src, size, fill);
  const speed = (ms: number) => (SNAPSHOT_MIB / (ms / 1000)).toFixed(0).padStart(5);
  const ms: Record<string, number[]> = { cp: [], 'cp + sync': [], ...Object.fromEntries(builds.map((b) => [b.name, []])) };
  // The vcpud process's CPU time per CreateSnapshot (all its threads): less moved by the host's load than the wall time.
  const cpuMs: Record<string, number[]> = Object.fromEntries(builds.map((b) => [b.name, []]));
  console.log(`\nCreateSnapshot of ${SNAPSHOT_MIB} MiB (random bytes, counter64 paused), ${SNAPSHOT_ROUNDS} rounds, ${dir}; MiB/s`);
  for (let r = 0; r < SNAPSHOT_ROUNDS; r++) {
    ms.cp.push(timeCp(src, dst));
    ms['cp + sync'].push(timeCp(src, dst, { sync: true }));
    // Which build goes first alternates: the second one runs right after the first one's writeback.
    const order = r % 2 ? [1, 0] : [0, 1];
    for (const i of order) {
      const pid = builds[i].vcpud.proc.pid!;
      const cpu0 = cpuSeconds(pid);
      ms[builds[i].name].push((await timeCreateSnapshot(builds[i].vcpud.client('SnapshotService'), vms[i], 'compare.snap')).ms);
      cpuMs[builds[i].name].push((cpuSeconds(pid) - cpu0) * 1000);
    }
    const cells = Object.entries(ms).map(([name, xs]) => `${name} ${speed(xs[r])}`);
    const [b, a] = builds.map((x) => ms[x.name][r]);
    const [cb, ca] = builds.map((x) => cpuMs[x.name][r]);
    console.log(
      `round ${r + 1}: ${cells.join('  ')}  after / before ${(b / a).toFixed(2)}, before / cp ${(ms.cp[r] / b).toFixed(2)}, after / cp ${(ms.cp[r] / a).toFixed(2)}; vcpud CPU ${cb.toFixed(0)} -> ${ca.toFixed(0)} ms`,
    );
  }
  const med = Object.fromEntries(Object.entries(ms).map(([name, xs]) => [name, median(xs)]));
  console.log(
    `medians: ${Object.entries(med)
      .map(([name, m]) => `${name} ${speed(m)}`)
      .join('  ')}  after / before ${(med.before / med.after).toFixed(2)}; cp ranged ${speed(Math.max(...ms.cp))}-${speed(Math.min(...ms.cp))}`,
  );
  console.log(`vcpud CPU per CreateSnapshot, medians: ${builds.map((b) => `${b.name} ${median(cpuMs[b.name]).toFixed(0)} ms`).join(', ')}`);
}

async function main(): Promise<void> {
  if (!BEFORE) throw new Error('set VCPUD_BEFORE to the main.js of the build to compare with');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-compare-'));
  const args = (name: string) => ['--snapshot-dir', path.join(dir, name), '--max-memory-per-vm', '2Gi'];
  const before = await startVcpud(args('before'), {}, [], { main: BEFORE });
  const after = await startVcpud(args('after'));
  try {
    console.log(`before: ${BEFORE}\nafter:  ${VCPUD_MAIN}\n`);
    if (ROUNDS > 0) await compareGetState(before, after);
    if (SNAPSHOT_MIB > 0)
      await compareCreateSnapshot(
        [
          { name: 'before', vcpud: before },
          { name: 'after', vcpud: after },
        ],
        dir,
      );
  } finally {
    await before.stop();
    await after.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module) main().catch(fatal);
