/**
 * Chain restores only, many times, optionally on two vcpud builds alternately (on a shared host two
 * builds measured minutes apart compare the host more than the change). One chain is made once: a
 * 1 GiB guest of random memory running counter64, a full snapshot and 8 children, each after 16 MiB
 * written (as bench/snapshot-incremental.ts). Then BENCH_CHAIN_ROUNDS rounds, each restoring (to the
 * next console output) the full snapshot and the chains of depth 2 and 8 in a rotated order on every
 * build, the same snapshot directory for both (BENCH_CHAIN_IDLE_VM=1: each vcpud also holding a paused
 * 1 GiB VM). Prints the medians and the ratios to the full
 * snapshot's restore, per build.
 *
 *   VCPUD_BEFORE=DIR/dist/src/server/main.js node dist/bench/snapshot-chain-restore.js
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { call, startVcpud, VCPUD_MAIN, type VcpudProcess } from '../test/support/vcpud-process';
import { fatal, guestBin, knob, median, MiB, table } from './floors';
import { randomCounterVm, stream } from './snapshot';
import { dirtyMemory, restoreToFirstOutput } from './snapshot-incremental';

export const SIZE = Number(knob('BENCH_INC_SIZE', '1024', 'incremental snapshot: guest size in MiB')) * MiB;
export const ROUNDS = Number(knob('BENCH_CHAIN_ROUNDS', '7', 'snapshot-chain-restore: rounds of the three restores per build'));
const BEFORE = knob('VCPUD_BEFORE', '', 'snapshot-chain-restore: main.js of a build to compare this one with (optional)');
const IDLE_VM = knob('BENCH_CHAIN_IDLE_VM', '0', 'snapshot-chain-restore: 1 = each vcpud holds a paused 1 GiB VM beside the restores') === '1';
export const DEPTH = 8;
const RESTORES: [string, string][] = [
  ['full', 'full'],
  ['depth 2', 'c2'],
  ['depth 8', `c${DEPTH}`],
];

/** The chain restored: `full` (1 GiB of random memory, counter64), then c1..c8, each after 16 MiB written; the VM is deleted after. */
export async function writeChain(d: VcpudProcess): Promise<void> {
  const [vms, snaps] = [d.client('VmService'), d.client('SnapshotService')];
  const vmId = await randomCounterVm(vms, SIZE, crypto.randomBytes(32 * MiB), 'bench-chain');
  await stream(snaps, 'CreateSnapshot', { vmId, name: 'full', trackDirty: true });
  for (let depth = 1; depth <= DEPTH; depth++) {
    await dirtyMemory(vms, vmId, SIZE);
    await stream(snaps, 'CreateSnapshot', { vmId, name: `c${depth}`, parent: depth === 1 ? 'full' : `c${depth - 1}` });
  }
  await call(vms, 'DeleteVm', { vmId });
}

const loadAverage = () =>
  os
    .loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-chain-'));
  const snapDir = path.join(dir, 'snapshots');
  const args = ['--snapshot-dir', snapDir, '--max-memory-per-vm', '2Gi'];
  const builds = [{ name: 'this', main: VCPUD_MAIN }, ...(BEFORE ? [{ name: 'before', main: BEFORE }] : [])];
  const daemons = [];
  try {
    for (const b of builds) daemons.push(await startVcpud(args, {}, [], { main: b.main }));
    await writeChain(daemons[0]);
    // The bench restores beside its (paused) source VM: with BENCH_CHAIN_IDLE_VM=1 each vcpud
    // holds a paused 1 GiB VM likewise (another KVM VM in the process slows chain restores, see BENCHMARKS.md).
    if (IDLE_VM)
      for (const d of daemons) {
        const other = d.client('VmService');
        const { vm: idle } = await call<{ vm: { id: string } }>(other, 'CreateVm', { memoryBytes: String(SIZE), vcpuCount: 1, name: 'bench-idle' });
        await call(other, 'LoadProgram', { vmId: idle.id, image: fs.readFileSync(guestBin('counter64')), loadAddress: '4096' });
        await call(other, 'RunVm', { vmId: idle.id });
        await call(other, 'PauseVm', { vmId: idle.id });
      }
    const load = loadAverage();
    const ms = builds.map(() => Object.fromEntries(RESTORES.map(([k]) => [k, [] as number[]])));
    for (let round = 0; round < ROUNDS; round++) {
      for (let b = 0; b < builds.length; b++) {
        const d = daemons[(b + round) % builds.length];
        const index = (b + round) % builds.length;
        const [v, s] = [d.client('VmService'), d.client('SnapshotService')];
        for (let i = 0; i < RESTORES.length; i++) {
          const [key, name] = RESTORES[(i + round) % RESTORES.length];
          ms[index][key].push(await restoreToFirstOutput(v, s, name));
        }
      }
    }
    // Medians, and the minima (the runs the other load on the host disturbed least).
    const rows = builds.flatMap((b, i) =>
      [median, (xs: number[]) => Math.min(...xs)].map((stat, j) => {
        const m = Object.fromEntries(RESTORES.map(([k]) => [k, stat(ms[i][k])]));
        const cells = [m.full, m['depth 2'], m['depth 8']].map((v) => v.toFixed(1));
        return [`${b.name} (${j ? 'min' : 'median'})`, ...cells, (m['depth 2'] / m.full).toFixed(2), (m['depth 8'] / m.full).toFixed(2)];
      }),
    );
    console.log(
      `RestoreSnapshot (lazy, run) to next console output, ${SIZE / MiB} MiB, ${ROUNDS} rounds, ms; load average before: ${load}, after: ${loadAverage()}`,
    );
    console.log(table(['build', 'full', 'depth 2', 'depth 8', 'depth 2 / full', 'depth 8 / full'], rows));
    if (process.env.BENCH_VERBOSE) console.log(JSON.stringify(ms));
  } finally {
    for (const d of daemons) await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module) main().catch(fatal);
