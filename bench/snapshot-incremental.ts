/**
 * Incremental snapshots of a 1 GiB guest (memory filled with random bytes, counter64 running), 16
 * MiB dirtied (by WriteMemory, 64 KiB at random places) since the parent, through a real vcpud:
 * - CreateSnapshot with `parent` beside a full CreateSnapshot of the same VM (target <= 0.1x);
 * - the child's file beside the bytes dirtied plus the state records (target <= 1.1x);
 * - RestoreSnapshot (lazy) of chains of depth 2 and 8 to the guest's next console output, beside
 *   the full snapshot's (target <= 1.2x).
 * BENCH_INC_SIZE (MiB) and BENCH_INC_RUNS override the defaults.
 */
import crypto from 'node:crypto';
import type * as grpc from '@grpc/grpc-js';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { call, startVcpud } from '../test/support/vcpud-process';
import { decodePreamble, decodeRecordHeader, nextRecordOffset, PREAMBLE_SIZE, RECORD_HEADER_SIZE, RecordKind } from '../src/vm/snapshot-format';
import { MiB, fatal, knob, median, ratioRow, table, type BenchResult, type BenchRow } from './floors';
import { firstOutput, now, randomCounterVm, stream } from './snapshot';

const SIZE = Number(knob('BENCH_INC_SIZE', '1024', 'incremental snapshot: guest size in MiB')) * MiB;
const RUNS = Number(knob('BENCH_INC_RUNS', '3', 'incremental snapshot: runs (the figures are medians)'));
const DIRTY = 16 * MiB;
const WRITE = 64 * 1024;
const DEPTHS = [2, 8];

/** Bytes of a snapshot file before its first memory record: the preamble, header and state records. */
function stateBytes(file: string): number {
  const buf = fs.readFileSync(file);
  decodePreamble(buf);
  let at = PREAMBLE_SIZE;
  for (let seq = 0; ; seq++) {
    const h = decodeRecordHeader(buf.subarray(at, at + RECORD_HEADER_SIZE), at, seq);
    if (h.kind === RecordKind.MemoryMap) return at;
    at = nextRecordOffset(h);
  }
}

type Client = grpc.Client & Record<string, Function>;

/** 16 MiB of random bytes written at random 64 KiB-aligned places above 2 MiB (distinct). */
export async function dirtyMemory(vms: Client, vmId: string, size: number): Promise<void> {
  const slots = new Set<number>();
  while (slots.size < DIRTY / WRITE) slots.add(2 * MiB + crypto.randomInt((size - 2 * MiB) / WRITE) * WRITE);
  for (const gpa of slots) await call(vms, 'WriteMemory', { vmId, guestPhysicalAddress: String(gpa), data: crypto.randomBytes(WRITE) });
}

/** RestoreSnapshot (run) of `name` to the restored VM's first console output, ms; the VM is deleted after. */
export async function restoreToFirstOutput(vms: Client, snaps: Client, name: string): Promise<number> {
  const t0 = now();
  const r = await call<{ vm: { id: string } }>(snaps, 'RestoreSnapshot', { name, run: true });
  const ms = (await firstOutput(vms, r.vm.id)) - t0;
  await call(vms, 'DeleteVm', { vmId: r.vm.id });
  return ms;
}

export async function measureIncrementalSnapshot(): Promise<BenchResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-incremental-'));
  const snapDir = path.join(dir, 'snapshots');
  const d = await startVcpud(['--snapshot-dir', snapDir, '--max-memory-per-vm', '2Gi']);
  const label = SIZE >= 1 << 30 ? `${SIZE / (1 << 30)} GiB` : `${SIZE / MiB} MiB`;
  const full: number[] = [];
  const inc: number[] = [];
  const restoreOut: Record<string, number[]> = { full: [], ...Object.fromEntries(DEPTHS.map((k) => [`depth ${k}`, []])) };
  let incFile = 0;
  let incState = 0;
  let incPages = 0;
  try {
    const vms = d.client('VmService');
    const snaps = d.client('SnapshotService');
    const vmId = await randomCounterVm(vms, SIZE, crypto.randomBytes(32 * MiB), 'bench-inc');
    const dirty = () => dirtyMemory(vms, vmId, SIZE);
    const snapshot = async (name: string, extra: object = {}) => {
      execFileSync('sync'); // no writeback pending from the one before
      const t = now();
      const msgs = await stream(snaps, 'CreateSnapshot', { vmId, name, ...extra });
      const ms = now() - t;
      return { ms, done: msgs.find((m) => m.done)?.done as Record<string, any> };
    };
    const restoreToOutput = (name: string) => restoreToFirstOutput(vms, snaps, name);

    for (let run = 0; run < RUNS; run++) {
      const base = `run${run}/full`;
      const f = await snapshot(base, { trackDirty: true });
      full.push(f.ms);
      let parent = base;
      for (let depth = 1; depth <= Math.max(...DEPTHS); depth++) {
        await dirty();
        const name = `run${run}/c${depth}`;
        const c = await snapshot(name, { parent });
        if (depth === 1) {
          inc.push(c.ms);
          incFile = Number(c.done.sizeBytes);
          incPages = Number(c.done.memoryPagesStored);
          incState = stateBytes(path.join(snapDir, name));
        }
        parent = name;
      }
      // The source's busy vCPU is paused while restores are timed (a core on a small host).
      await call(vms, 'PauseVm', { vmId });
      // In an order rotated per run: the first restore after the writes meets the busiest page cache.
      const restores: [string, string][] = [['full', base], ...DEPTHS.map((k): [string, string] => [`depth ${k}`, `run${run}/c${k}`])];
      for (let i = 0; i < restores.length; i++) {
        const [key, name] = restores[(i + run) % restores.length];
        restoreOut[key].push(await restoreToOutput(name));
      }
      await call(vms, 'ResumeVm', { vmId });
      fs.rmSync(path.join(snapDir, `run${run}`), { recursive: true, force: true });
    }
  } finally {
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const m = { full: median(full), inc: median(inc) };
  const rows: BenchRow[] = [
    ratioRow(`${label}: incremental CreateSnapshot (16 MiB dirtied)`, m.inc, m.full, 'ms', 'full CreateSnapshot of the same VM', { op: '<=', ratio: 0.1 }),
    ratioRow(`${label}: incremental snapshot file`, incFile, DIRTY + incState, 'bytes', '16 MiB dirtied + state records', { op: '<=', ratio: 1.1 }),
    ...DEPTHS.map((k) =>
      ratioRow(
        `${label}: RestoreSnapshot of a depth-${k} chain to next console output`,
        median(restoreOut[`depth ${k}`]),
        median(restoreOut.full),
        'ms',
        "the full snapshot's",
        { op: '<=', ratio: 1.2 },
      ),
    ),
  ];
  const detail = [
    `Incremental snapshots through vcpud (UDS), ${label} of random memory, counter64 running, 16 MiB dirtied by WriteMemory (64 KiB at random places) between snapshots; median of ${RUNS} runs, ${os.tmpdir()}\n`,
    table(
      ['measure', 'ms', 'notes'],
      [
        ['full CreateSnapshot (track_dirty)', m.full.toFixed(1), ''],
        [
          'incremental CreateSnapshot',
          m.inc.toFixed(1),
          `${(incFile / MiB).toFixed(2)} MiB file: ${incPages} pages stored (16 MiB = 4096 written by vcpud, the rest the guest's), ${incState} bytes of state`,
        ],
        ...Object.entries(restoreOut).map(([k, v]) => [
          `RestoreSnapshot (lazy) to next console output: ${k === 'full' ? 'full snapshot' : `chain of ${k}`}`,
          median(v).toFixed(1),
          '',
        ]),
      ],
    ),
    '',
    ...rows.map((r) => `${r.name}: ${r.ratio!.toFixed(3)} x ${r.floorName} (target ${r.target}: ${r.met ? 'met' : 'NOT met'})`),
  ].join('\n');
  return { rows, detail };
}

async function main(): Promise<void> {
  console.log((await measureIncrementalSnapshot()).detail);
}

if (require.main === module) main().catch(fatal);
