/**
 * Snapshot and restore of 256 MiB and 1 GiB guests (memory filled with random, non-zero bytes,
 * counter64 running) through a real vcpud process, against `cp` of a file of the same size in the
 * same run and directory (cp alone, and cp followed by `sync FILE`, since a snapshot is fsynced
 * before it is renamed into place). Also: from the RestoreSnapshot call to the guest's next console
 * output, with memory mapped lazily (the default) and read eagerly (no_lazy_memory).
 *
 * Targets: snapshot at least 0.8 x the speed of cp; a 256 MiB VM running again within 50 ms of the
 * restore call. BENCH_SIZES (MiB, comma-separated) and BENCH_RUNS override the defaults.
 *
 * The speed ratios compare the fastest run of each (CreateSnapshot, cp, cp + sync), not the medians:
 * at 256 MiB cp is a ~100 ms page-cache copy, and on a shared 2-core host one descheduling makes it
 * several times slower (107-491 ms in eight back-to-back runs), so a median floor swung the ratio from
 * 0.76 to 3.86 between full runs with CreateSnapshot itself within 8%. The fastest run is what each
 * can do undisturbed; the medians and the spread stay in the detail table.
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

/** A VM of `size` bytes whose memory above 2 MiB is `fill` repeated (nothing to skip), counter64 running. */
export async function randomCounterVm(vms: Client, size: number, fill: Buffer, name: string): Promise<string> {
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(size), vcpuCount: 1, name });
  for (let gpa = 2 * MiB; gpa < size; gpa += fill.length)
    await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: fill.subarray(0, Math.min(fill.length, size - gpa)) });
  await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(guestBin('counter64')), loadAddress: '4096' });
  await call(vms, 'RunVm', { vmId: vm.id });
  return vm.id;
}

/** The cp floor's source: `size` bytes of `fill` repeated, fsynced. */
export function writeFloorSource(file: string, size: number, fill: Buffer): void {
  const fd = fs.openSync(file, 'w');
  for (let off = 0; off < size; off += fill.length) fs.writeSync(fd, fill, 0, Math.min(fill.length, size - off), off);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

/** ms of `cp src dst` (with `sync`: followed by `sync dst`), starting with no writeback pending; dst is removed after. */
export function timeCp(src: string, dst: string, opts: { sync?: boolean } = {}): number {
  fs.rmSync(dst, { force: true });
  execFileSync('sync');
  const ms = timeMs(() => (opts.sync ? execFileSync('sh', ['-c', 'cp "$1" "$2" && sync "$2"', 'sh', src, dst]) : execFileSync('cp', [src, dst])));
  fs.rmSync(dst, { force: true });
  return ms;
}

/**
 * ms of CreateSnapshot of `vmId` under `name`, starting with no writeback pending. Like cp's target,
 * the previous snapshot is removed before the clock starts (replacing it by rename would free its
 * blocks inside the timed call).
 */
export async function timeCreateSnapshot(snaps: Client, vmId: string, name: string): Promise<{ ms: number; sizeBytes: number }> {
  await call(snaps, 'DeleteSnapshot', { name }).catch(() => {});
  execFileSync('sync');
  const t = now();
  const msgs = await stream(snaps, 'CreateSnapshot', { vmId, name });
  const ms = now() - t;
  return { ms, sizeBytes: Number(msgs.find((m) => m.done)?.done.sizeBytes ?? 0) };
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
      const fill = crypto.randomBytes(32 * MiB);
      const vm = await randomCounterVm(vms, size, fill, `bench-${label}`);
      // The floor: a file of the same size (same bytes), copied in the same directory.
      const src = path.join(dir, 'floor.src');
      writeFloorSource(src, size, fill);
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
        cp.push(timeCp(src, dst));
        cpSync.push(timeCp(src, dst, { sync: true }));
        const created = await timeCreateSnapshot(snaps, vm, `bench-${size}.snap`);
        snap.push(created.ms);
        if (VERBOSE) console.error(`run ${run} cp ${cp[run].toFixed(0)} cp+sync ${cpSync[run].toFixed(0)} snapshot ${snap[run].toFixed(0)} ms`);
        fileBytes = created.sizeBytes;

        // The source VM (a busy vCPU thread) is paused while restores are timed: on a small host it
        // would take a core from them.
        await call(vms, 'PauseVm', { vmId: vm });
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
        await call(vms, 'ResumeVm', { vmId: vm });
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
      const fastest = { cp: Math.min(...cp), cpSync: Math.min(...cpSync), snap: Math.min(...snap) };
      const spread = (xs: number[]) => `${Math.min(...xs).toFixed(0)}-${Math.max(...xs).toFixed(0)} ms`;
      rows.push(
        [`${label}: cp`, m.cp, speed(m.cp), `runs ${spread(cp)}`],
        [`${label}: cp + sync FILE`, m.cpSync, speed(m.cpSync), `runs ${spread(cpSync)}`],
        [`${label}: CreateSnapshot (fsync, rename)`, m.snap, speed(m.snap), `runs ${spread(snap)}; ${(fileBytes / MiB).toFixed(0)} MiB file`],
        [`${label}: RestoreSnapshot, lazy map`, m.rl, speed(m.rl), `next console output at ${m.ol.toFixed(1)} ms`],
        [`${label}: RestoreSnapshot, read (no_lazy_memory)`, m.re, speed(m.re), `next console output at ${m.oe.toFixed(1)} ms`],
      );
      const best = `fastest of ${RUNS}`;
      const vsCp = ratioRow(`${label}: CreateSnapshot speed`, speed(fastest.snap), speed(fastest.cp), 'MiB/s', `cp of the same bytes, ${best}`, SPEED_TARGET);
      const vsCpSync = ratioRow(
        `${label}: CreateSnapshot speed (durable floor)`,
        speed(fastest.snap),
        speed(fastest.cpSync),
        'MiB/s',
        `cp + sync FILE, ${best}`,
      );
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
        `${label}: snapshot speed / cp speed = ${vsCp.ratio!.toFixed(2)} (fastest runs; target ${vsCp.target}: ${verdict(vsCp)}); / (cp + sync) = ${vsCpSync.ratio!.toFixed(2)}; medians: ${(m.cp / m.snap).toFixed(2)}, ${(m.cpSync / m.snap).toFixed(2)}`,
      );
      if (restoreTarget)
        verdicts.push(`${label}: RestoreSnapshot call to next console output ${m.ol.toFixed(1)} ms (target ${restore.target}: ${verdict(restore)})`);
      await call(vms, 'DeleteVm', { vmId: vm });
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
