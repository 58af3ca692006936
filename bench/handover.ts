/**
 * The restart handover (--state-dir on /dev/shm), one vcpud process replaced by the next as a
 * container restart would (the new one spawned when the old has exited):
 * - downtime: SIGTERM to the old process until the new one has resumed the guest (its "handover
 *   restored" log line, written after the vCPUs resumed), beside the new process's own
 *   start-to-serving time (spawn to its "vcpud serving" line); target <= that + 50 ms;
 * - the same downtime at a larger guest (4 GiB of random memory) beside the base size (1 GiB),
 *   rounds alternating: downtime should not grow with guest size (target <= 1.2x);
 * with its parts: the old process's save, its exit, the new one's restore.
 *
 * The state directory is a tmpfs of its own mounted with huge=within_size (2 MiB pages: unmapping a
 * guest at exit then costs next to nothing; with 4 KiB pages it costs ~0.1 s per GiB the guest
 * touched, which no handover can hide because the new process starts after the old one exited);
 * BENCH_HANDOVER_HUGE=never measures 4 KiB pages (a default emptyDir medium: Memory).
 *
 * BENCH_HANDOVER_MIB (default 1024) sets the base size, BENCH_HANDOVER_LARGE_MIB (default 4096) the
 * larger one, BENCH_HANDOVER_ROUNDS (default 3) the rounds of each.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type * as grpc from '@grpc/grpc-js';
import { GUEST_ABI } from '../test/guests/guests';
import { mountTmpfs } from '../test/support/tmpfs';
import { call, startVcpud, type VcpudProcess } from '../test/support/vcpud-process';
import { MiB, fatal, guestBin, knob, median, ratioRow, table, targetVerdict, type BenchResult, type BenchRow } from './floors';

type Client = grpc.Client & Record<string, Function>;
const SIZE = Number(knob('BENCH_HANDOVER_MIB', '1024', 'handover: base guest size in MiB')) * MiB;
const LARGE = Number(knob('BENCH_HANDOVER_LARGE_MIB', '4096', 'handover: larger guest size in MiB')) * MiB;
const ROUNDS = Number(knob('BENCH_HANDOVER_ROUNDS', '3', 'handover: rounds of each size'));
const HUGE = knob('BENCH_HANDOVER_HUGE', 'within_size', "handover: the state tmpfs's huge= mount option (never: 4 KiB pages)");
const OVER_START_MS = 50;
const SIZE_TARGET = { op: '<=', ratio: 1.2 } as const;
const FILL_FROM = 2 * MiB;

/** The first log line with `msg`, parsed. */
function logLine(p: VcpudProcess, msg: string): Record<string, any> {
  const line = p
    .logs()
    .split('\n')
    .find((l) => l.includes(`"msg":"${msg}"`));
  if (!line) throw new Error(`no "${msg}" line in the log:\n${p.logs()}`);
  return JSON.parse(line) as Record<string, any>;
}

/** A counter64 VM of `size` with random memory above 2 MiB, running. */
async function counterWithRandomMemory(vms: Client, size: number): Promise<string> {
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(size), vcpuCount: 1, name: 'bench' });
  const chunk = crypto.randomBytes(16 * MiB);
  for (let gpa = FILL_FROM; gpa < size; gpa += chunk.length)
    await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: chunk.subarray(0, Math.min(chunk.length, size - gpa)) });
  await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(guestBin('counter64')), loadAddress: String(GUEST_ABI.loadAddress) });
  await call(vms, 'RunVm', { vmId: vm.id });
  return vm.id;
}

interface Restart {
  downtimeMs: number;
  startToServingMs: number;
  saveMs: number;
  exitMs: number;
  restoreMs: number;
}

/** One graceful restart of `old` on `stateDir`; returns the new process and the times. */
async function restart(old: VcpudProcess, args: string[]): Promise<{ next: VcpudProcess; t: Restart }> {
  const exited = new Promise<void>((r) => old.proc.once('exit', () => r()));
  const sigterm = Date.now();
  old.proc.kill('SIGTERM');
  await exited;
  const exitAt = Date.now();
  if (old.proc.exitCode !== 0) throw new Error(`the old vcpud exited with ${old.proc.exitCode}:\n${old.logs()}`);
  const spawnAt = Date.now();
  const next = await startVcpud(args);
  const servingAt = Date.now();
  const restored = logLine(next, 'handover restored');
  if (restored.vms !== 1 || restored.failed !== 0) throw new Error(`the handover did not restore the VM: ${JSON.stringify(restored)}`);
  const saved = logLine(old, 'handover saved');
  await old.stop(); // its socket directory (the process is gone)
  return {
    next,
    t: {
      downtimeMs: Date.parse(restored.time) - sigterm,
      startToServingMs: servingAt - spawnAt,
      saveMs: saved.ms,
      exitMs: exitAt - sigterm,
      restoreMs: restored.ms,
    },
  };
}

export async function measureHandover(): Promise<BenchResult> {
  const tmpfs = mountTmpfs(`${Math.ceil((SIZE + LARGE) / MiB) + 64}m`, `huge=${HUGE}`);
  if (typeof tmpfs === 'string') throw new Error(`the handover benchmark needs its own tmpfs: ${tmpfs}`);
  const stateDir = tmpfs.dir;
  const args = ['--state-dir', stateDir, '--max-memory-per-vm', `${Math.max(SIZE, LARGE)}`, '--max-memory-total', `${2 * Math.max(SIZE, LARGE)}`];
  const rows: (string | number)[][] = [];
  const bySize = new Map<number, Restart[]>([
    [SIZE, []],
    [LARGE, []],
  ]);
  let p: VcpudProcess | undefined;
  try {
    for (let round = 0; round < ROUNDS; round++) {
      for (const size of [SIZE, LARGE]) {
        p = await startVcpud(args);
        const vms = p.client('VmService');
        await counterWithRandomMemory(vms, size);
        const { next, t } = await restart(p, args);
        p = next;
        // The guest runs on in the new process: its counter keeps moving.
        const { vm } = await call<{ vm: Record<string, any> }>(p.client('VmService'), 'GetVm', {
          vmId: (await call<{ vms: { id: string }[] }>(p.client('VmService'), 'ListVms', {})).vms[0].id,
        });
        if (vm.vcpus[0].runState !== 'VCPU_RUN_STATE_RUNNING') throw new Error(`the guest is ${vm.vcpus[0].runState} after the restart`);
        bySize.get(size)!.push(t);
        rows.push([`${size / MiB} MiB, round ${round + 1}`, t.downtimeMs, t.startToServingMs, t.saveMs, t.exitMs, t.restoreMs]);
        await call(p.client('VmService'), 'DeleteVm', { vmId: vm.id });
        await p.stop('SIGINT');
        p = undefined;
      }
    }
  } finally {
    await p?.stop('SIGKILL');
    tmpfs.unmount();
  }
  const med = (size: number, k: keyof Restart) => median(bySize.get(size)!.map((t) => t[k]));
  const benchRows: BenchRow[] = [];
  for (const size of [SIZE, LARGE]) {
    const floor = med(size, 'startToServingMs');
    const row = ratioRow(
      `handover ${size / MiB} MiB: restart downtime`,
      med(size, 'downtimeMs'),
      floor + OVER_START_MS,
      'ms',
      `new process start-to-serving (${floor.toFixed(0)} ms) + ${OVER_START_MS} ms`,
      { op: '<=', ratio: 1 },
    );
    benchRows.push(row);
  }
  benchRows.push(
    ratioRow(
      `handover: downtime at ${LARGE / MiB} MiB vs ${SIZE / MiB} MiB`,
      med(LARGE, 'downtimeMs'),
      med(SIZE, 'downtimeMs'),
      'ms',
      `downtime at ${SIZE / MiB} MiB`,
      SIZE_TARGET,
    ),
  );
  const verdicts = benchRows.map((r) => `${r.name}: ${r.value.toFixed(1)} ${r.unit} = ${r.ratio?.toFixed(2)} x ${r.floorName} ${targetVerdict(r)}`);
  // On a shared host the medians of a few rounds move with the load; the best rounds show the cost itself.
  const best = (size: number) => Math.min(...bySize.get(size)!.map((t) => t.downtimeMs));
  verdicts.push(
    `best rounds: downtime ${best(SIZE).toFixed(0)} ms at ${SIZE / MiB} MiB, ${best(LARGE).toFixed(0)} ms at ${LARGE / MiB} MiB (${(best(LARGE) / best(SIZE)).toFixed(2)}x)`,
  );
  const detail = [
    `Graceful restart with --state-dir on a tmpfs mounted huge=${HUGE}: counter64 with random memory, SIGTERM to the guest resumed in the new process (medians of ${ROUNDS} rounds)\n`,
    table(['round', 'downtime ms', 'start-to-serving ms', 'save ms', 'SIGTERM-to-exit ms', 'restore ms'], rows),
    '',
    ...verdicts,
  ].join('\n');
  return { rows: benchRows, detail };
}

async function main(): Promise<void> {
  console.log((await measureHandover()).detail);
}

if (require.main === module) main().catch(fatal);
