/**
 * Snapshot and restore of 256 MiB and 1 GiB guests (memory filled with random, non-zero bytes,
 * counter64 running) through a real vcpud process, against `cp` of a file of the same size in the
 * same run and directory (cp alone, and cp followed by `sync FILE`, since a snapshot is fsynced
 * before it is renamed into place). Also: from the RestoreSnapshot call to the guest's next console
 * output, with memory mapped lazily (the default) and read eagerly (no_lazy_memory).
 *
 * Targets: snapshot at least 0.8 x the speed of cp; a 256 MiB VM running again within 50 ms of the
 * restore call. BENCH_SIZES (MiB, comma-separated) and BENCH_RUNS override the defaults.
 */
import { execFileSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { call, startVcpud } from '../test/support/vcpud-process';
import { MiB, fatal, guestBin, knob, median, ratioRow, table, type BenchResult, type BenchRow } from './floors';

type Client = grpc.Client & Record<string, Function>;
const SIZES = knob('BENCH_SIZES', '256,1024', 'snapshot: guest sizes in MiB, comma-separated')
  .split(',')
  .map((s) => Number(s) * MiB);
const RUNS = Number(knob('BENCH_RUNS', '5', 'snapshot: runs per size (the figures are medians)'));
const VERBOSE = knob('BENCH_VERBOSE', '', 'snapshot: set to print every run on stderr') !== '';
const SPEED_TARGET = { op: '>=', ratio: 0.8 } as const;
/** The restore target is for a 256 MiB VM; other sizes are reported only. */
const RESTORE_TARGET = { bytes: 256 * MiB, ms: 50 };

export const now = () => Number(process.hrtime.bigint()) / 1e6;

function timeMs(fn: () => void): number {
  const t = now();
  fn();
  return now() - t;
}

export function stream(client: Client, method: string, req: object): Promise<Record<string, any>[]> {
  return new Promise((resolve, reject) => {
    const out: Record<string, any>[] = [];
    const s = client[method](req) as grpc.ClientReadableStream<Record<string, any>>;
    s.on('data', (m) => out.push(m));
    s.on('error', reject);
    s.on('end', () => resolve(out));
  });
}

/** Resolves at the first console output of a VM (the stream replays from the start). */
export function firstOutput(vms: Client, vmId: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = vms.StreamConsole({ vmId, fromStart: true }) as grpc.ClientReadableStream<Record<string, any>>;
    s.on('data', (m) => {
      if (m.event !== 'output') return;
      resolve(now());
      s.cancel();
    });
    s.on('error', (e: grpc.ServiceError) => e.code !== 1 && reject(e));
  });
}

/**
 * Per size: snapshot speed beside cp's (the target) and beside cp + sync's (the durable floor), and
 * the time from RestoreSnapshot to the next console output with lazily mapped memory.
 */
export async function measureSnapshot(): Promise<BenchResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-snapshot-'));
  const snapDir = path.join(dir, 'snapshots');
  const d = await startVcpud(['--snapshot-dir', snapDir, '--max-memory-per-vm', '2Gi']);
  const rows: (string | number)[][] = [];
  const verdicts: string[] = [];
  const benchRows: BenchRow[] = [];
  try {
    const vms = d.client('VmService');
    const snaps = d.client('SnapshotService');
    for (const size of SIZES) {
      const label = size >= 1 << 30 ? `${size / (1 << 30)} GiB` : `${size / MiB} MiB`;
      // The guest: memory full of random bytes (nothing to skip), counter64 running.
      const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(size), vcpuCount: 1, name: `bench-${label}` });
      const fill = crypto.randomBytes(32 * MiB);
      for (let gpa = 2 * MiB; gpa < size; gpa += fill.length)
        await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: fill.subarray(0, Math.min(fill.length, size - gpa)) });
      await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(guestBin('counter64')), loadAddress: '4096' });
      await call(vms, 'RunVm', { vmId: vm.id });

      // The floor: a file of the same size (same bytes), copied in the same directory.
      const src = path.join(dir, 'floor.src');
      const fd = fs.openSync(src, 'w');
      for (let off = 0; off < size; off += fill.length) fs.writeSync(fd, fill, 0, Math.min(fill.length, size - off), off);
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      const cp: number[] = [];
      const cpSync: number[] = [];
      const snap: number[] = [];
      const restoreLazy: number[] = [];
      const outputLazy: number[] = [];
      const restoreEager: number[] = [];
      const outputEager: number[] = [];
      let fileBytes = 0;
      for (let run = 0; run < RUNS; run++) {
        const dst = path.join(dir, 'floor.dst');
        fs.rmSync(dst, { force: true });
        // Every timed operation starts with no writeback pending from the one before.
        execFileSync('sync');
        cp.push(timeMs(() => execFileSync('cp', [src, dst])));
        fs.rmSync(dst, { force: true });
        execFileSync('sync');
        cpSync.push(timeMs(() => execFileSync('sh', ['-c', 'cp "$1" "$2" && sync "$2"', 'sh', src, dst])));
        fs.rmSync(dst, { force: true });

        // Like cp's target, the previous snapshot is removed before the clock starts (replacing it by
        // rename would free its blocks inside the timed call).
        await call(snaps, 'DeleteSnapshot', { name: `bench-${size}.snap` }).catch(() => {});
        execFileSync('sync');
        const t = now();
        const msgs = await stream(snaps, 'CreateSnapshot', { vmId: vm.id, name: `bench-${size}.snap` });
        snap.push(now() - t);
        if (VERBOSE) console.error(`run ${run} cp ${cp[run].toFixed(0)} cp+sync ${cpSync[run].toFixed(0)} snapshot ${snap[run].toFixed(0)} ms`);
        fileBytes = Number(msgs.find((m) => m.done)?.done.sizeBytes ?? 0);

        // The source VM (a busy vCPU thread) is paused while restores are timed: on a small host it
        // would take a core from them.
        await call(vms, 'PauseVm', { vmId: vm.id });
        for (const [lazy, times, outputs] of [
          [true, restoreLazy, outputLazy],
          [false, restoreEager, outputEager],
        ] as const) {
          const t0 = now();
          const r = await call<{ vm: { id: string } }>(snaps, 'RestoreSnapshot', { name: `bench-${size}.snap`, run: true, noLazyMemory: !lazy });
          times.push(now() - t0);
          if (VERBOSE) console.error(`run ${run} ${lazy ? 'lazy' : 'eager'} restore ${(now() - t0).toFixed(1)} ms`);
          outputs.push((await firstOutput(vms, r.vm.id)) - t0);
          await call(vms, 'DeleteVm', { vmId: r.vm.id });
        }
        await call(vms, 'ResumeVm', { vmId: vm.id });
      }
      // MiB of guest memory per second: as speeds, value / floor is cp_time / snapshot_time.
      const speed = (ms: number) => size / MiB / (ms / 1000);
      const m = {
        cp: median(cp),
        cpSync: median(cpSync),
        snap: median(snap),
        rl: median(restoreLazy),
        ol: median(outputLazy),
        re: median(restoreEager),
        oe: median(outputEager),
      };
      rows.push(
        [`${label}: cp`, m.cp, speed(m.cp), ''],
        [`${label}: cp + sync FILE`, m.cpSync, speed(m.cpSync), ''],
        [`${label}: CreateSnapshot (fsync, rename)`, m.snap, speed(m.snap), `${(fileBytes / MiB).toFixed(0)} MiB file`],
        [`${label}: RestoreSnapshot, lazy map`, m.rl, speed(m.rl), `next console output at ${m.ol.toFixed(1)} ms`],
        [`${label}: RestoreSnapshot, read (no_lazy_memory)`, m.re, speed(m.re), `next console output at ${m.oe.toFixed(1)} ms`],
      );
      const vsCp = ratioRow(`${label}: CreateSnapshot speed`, speed(m.snap), speed(m.cp), 'MiB/s', 'cp of the same bytes', SPEED_TARGET);
      const vsCpSync = ratioRow(`${label}: CreateSnapshot speed (durable floor)`, speed(m.snap), speed(m.cpSync), 'MiB/s', 'cp + sync FILE');
      const restoreTarget = size === RESTORE_TARGET.bytes;
      const restore: BenchRow = {
        name: `${label}: RestoreSnapshot to next console output (lazy)`,
        value: m.ol,
        unit: 'ms',
        floor: null,
        floorName: '-',
        ratio: null,
        target: restoreTarget ? `<= ${RESTORE_TARGET.ms} ms` : '-',
        met: restoreTarget ? m.ol <= RESTORE_TARGET.ms : null,
      };
      benchRows.push(vsCp, vsCpSync, restore);
      const verdict = (r: BenchRow) => (r.met ? 'met' : 'NOT met');
      verdicts.push(
        `${label}: snapshot speed / cp speed = ${vsCp.ratio!.toFixed(2)} (target ${vsCp.target}: ${verdict(vsCp)}); / (cp + sync) = ${vsCpSync.ratio!.toFixed(2)}`,
      );
      if (restoreTarget)
        verdicts.push(`${label}: RestoreSnapshot call to next console output ${m.ol.toFixed(1)} ms (target ${restore.target}: ${verdict(restore)})`);
      await call(vms, 'DeleteVm', { vmId: vm.id });
      fs.rmSync(src, { force: true });
      fs.rmSync(path.join(snapDir, `bench-${size}.snap`), { force: true });
    }
  } finally {
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const detail = [
    `Snapshot / restore through vcpud (UDS), memory filled with random bytes, median of ${RUNS} runs, ${os.tmpdir()}\n`,
    table(['measure', 'ms', 'MiB/s of guest memory', 'notes'], rows),
    '',
    ...verdicts,
  ].join('\n');
  return { rows: benchRows, detail };
}

async function main(): Promise<void> {
  console.log((await measureSnapshot()).detail);
}

if (require.main === module) main().catch(fatal);
