/**
 * Live migration between two real vcpud processes, against floors measured in the same run:
 * - throughput of pass 1 (a guest with random memory, every page sent) beside a plain unix socket
 *   between two Node processes moving the same bytes (UDS), and beside Node's TLS over TCP loopback
 *   (mTLS between vcpuds on 127.0.0.1); target >= 0.8;
 * - an idle guest's whole migration time beside bytes sent / the UDS floor; target <= 1.3;
 * - downtime of a guest with random memory while dirty64 dirties 64 MiB/s (target <= 50 ms), with
 *   its parts (last pass, state, restore, resume) and the passes it took;
 * - the same downtime on a larger guest (4 GiB) beside the base size, rounds alternating
 *   (base, large, base, large): downtime should not grow with guest size (target <= 1.2x).
 *
 * Beside each pass-1 rate and floor, the CPU each side spent per GiB (load-independent: on a shared
 * 2-core host the rates follow the scheduler; the CPU says where the per-byte cost sits).
 *
 * Information beside the targets: the same transports when the receiver keeps the bytes in memory it
 * has just mapped, as a migration's destination must (bench/c/socket_into_memory for the unix socket,
 * reading in place; the Node TLS receiver copying into a new buffer of the guest's size). The issue's
 * floors receive into a reused buffer; these say what fresh memory costs on this host. And the same
 * idle migrations, over UDS and mTLS, with the destination's memory committed before pass 1
 * (preallocateDestinationMemory): what the data plane moves when that cost is not in the pass.
 *
 * BENCH_MIGRATION_MIB (default 1024) sets the guest size; BENCH_MIGRATION_DIRTY_MIBS the dirty rate;
 * BENCH_MIGRATION_LARGE_MIB (default 4096, 0 skips) the larger guest; BENCH_MIGRATION_SIZE_ROUNDS its rounds
 * (a guest of each size filled per round) and BENCH_MIGRATION_SIZE_HOPS the migrations of each guest.
 */
import { fork } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import type * as grpc from '@grpc/grpc-js';
import { issueClients, MIGRATOR, localhostTarget, migrationDialArgs, mtlsServeArgs } from '../test/support/mtls';
import { reserveHugepagePool } from '../test/support/hugepage-pool';
import { makePki, type Pki } from '../test/support/pki';
import { call, startVcpud, type VcpudProcess } from '../test/support/vcpud-process';
import { DIRTY64, dirty64Control, GUEST_ABI } from '../test/guests/guests';
import { MiB, cFloor, cpuSeconds, fatal, guestBin, knob, median, ratioRow, table, targetVerdict, type BenchResult, type BenchRow } from './floors';

type Client = grpc.Client & Record<string, Function>;
const SIZE = Number(knob('BENCH_MIGRATION_MIB', '1024', 'migration: guest size in MiB')) * MiB;
const DIRTY_RATE = Number(knob('BENCH_MIGRATION_DIRTY_MIBS', '64', 'migration: dirty64 rate in MiB/s for the downtime figure')) * MiB;
const LARGE = Number(knob('BENCH_MIGRATION_LARGE_MIB', '4096', 'migration: larger guest in MiB for the downtime-vs-size figure, 0 skips')) * MiB;
const SIZE_ROUNDS = Number(
  knob('BENCH_MIGRATION_SIZE_ROUNDS', '2', 'migration: rounds of each size for the downtime-vs-size figure (a guest filled per round)'),
);
const IDLE_ROUNDS = Number(
  knob('BENCH_MIGRATION_IDLE_ROUNDS', '3', 'migration: idle 1-GiB migrations over UDS (each after its own floor run); their medians are compared'),
);
const SIZE_HOPS = Number(knob('BENCH_MIGRATION_SIZE_HOPS', '3', 'migration: migrations of each guest of the downtime-vs-size figure, back and forth'));
const SIZE_TARGET = { op: '<=', ratio: 1.2 } as const;
const THROUGHPUT_TARGET = { op: '>=', ratio: 0.8 } as const;
const IDLE_TARGET = { op: '<=', ratio: 1.3 } as const;
const DOWNTIME_TARGET_MS = 50;
const FILL_FROM = 2 * MiB;
const DIRTY_RANGE = { start: 16 * MiB, pages: 65536 };
const CHUNK = 8 * MiB;
/** Node flags for the vcpud processes, e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof" to profile both sides. */
const VCPUD_NODE_ARGS = (process.env.BENCH_MIGRATION_NODE_ARGS ?? '').split(' ').filter(Boolean);

const now = () => Number(process.hrtime.bigint()) / 1e6;
export const ms = (d: { seconds: string; nanos: number } | undefined) => (d ? Number(d.seconds) * 1000 + d.nanos / 1e6 : 0);

// ---------------------------------------------------------------------------------------------
// Floors: the same bytes between two Node processes

/** The receiving process: counts bytes (m.keep: copies them into a new buffer of that size) until the sender closes, then reports. */
const RECEIVER = `
const net = require('node:net'), tls = require('node:tls'), fs = require('node:fs');
process.on('message', (m) => {
  const onConn = (s) => { const c = process.cpuUsage(); const kept = m.keep ? Buffer.allocUnsafeSlow(m.keep) : null; let n = 0; s.on('data', (d) => { if (kept) d.copy(kept, n); n += d.length; }); s.on('end', () => { const u = process.cpuUsage(c); process.send({ received: n, cpuMs: (u.user + u.system) / 1000 }); s.end(); }); };
  const server = m.tls
    ? tls.createServer({ key: fs.readFileSync(m.tls.key), cert: fs.readFileSync(m.tls.cert), ca: fs.readFileSync(m.tls.ca), requestCert: true, rejectUnauthorized: true }, onConn)
    : net.createServer(onConn);
  server.listen(m.tls ? { host: '127.0.0.1', port: 0 } : { path: m.path }, () => process.send({ listening: m.tls ? server.address().port : m.path }));
});
`;

/** CPU ms per GiB moved of each side of a transfer: where a migration's per-byte cost sits beside the floor's. */
export interface SideCpu {
  sendMs: number;
  receiveMs: number;
}

const GiB = 1024 * MiB;
const cpuText = (c: SideCpu, send: string, receive: string) => `CPU per GiB: ${send} ${c.sendMs.toFixed(0)} ms + ${receive} ${c.receiveMs.toFixed(0)} ms`;

/** A floor's line in the detail table: the time SIZE takes at `rate`, the rate, and each side's CPU. */
const floorTableRow = (label: string, rate: number, cpu: SideCpu) => [
  label,
  ((SIZE / MiB / rate) * 1000).toFixed(0),
  rate.toFixed(0),
  cpuText(cpu, 'sender', 'receiver'),
];

/**
 * MiB/s of `bytes` written in CHUNK buffers to a receiver in another process (unix socket, or mTLS over
 * TCP), and the CPU each side spent (the sender is this process, otherwise idle meanwhile).
 */
export async function floorRate(bytes: number, dir: string, pki?: Pki, how: { keep?: boolean } = {}): Promise<{ rate: number; cpu: SideCpu }> {
  const script = path.join(dir, 'receiver.js');
  fs.writeFileSync(script, RECEIVER);
  const child = fork(script, [], { stdio: 'inherit' });
  try {
    const next = () => new Promise<Record<string, any>>((r) => child.once('message', (m) => r(m as Record<string, any>)));
    const sock = path.join(dir, 'floor.sock');
    fs.rmSync(sock, { force: true });
    const keep = how.keep ? Math.ceil(bytes / CHUNK) * CHUNK : 0;
    child.send(pki ? { keep, tls: { key: pki.file('server.key'), cert: pki.file('server.crt'), ca: pki.file('ca.crt') } } : { keep, path: sock });
    const { listening } = await next();
    const s: net.Socket = pki
      ? tls.connect({
          host: '127.0.0.1',
          port: listening,
          ca: pki.pem('ca.crt'),
          cert: pki.pem('migrator.crt'),
          key: pki.pem('migrator.key'),
          servername: 'localhost',
        })
      : net.connect({ path: listening });
    await new Promise((r) => s.once(pki ? 'secureConnect' : 'connect', r));
    const buf = crypto.randomBytes(CHUNK);
    const done = next();
    const t = now();
    const cpu0 = process.cpuUsage();
    for (let sent = 0; sent < bytes; sent += CHUNK) if (!s.write(buf)) await new Promise((r) => s.once('drain', r));
    s.end();
    const { received, cpuMs } = await done;
    const elapsed = now() - t;
    const cpu = process.cpuUsage(cpu0);
    if (received !== Math.ceil(bytes / CHUNK) * CHUNK) throw new Error(`the floor's receiver got ${received} bytes`);
    const perGiB = GiB / received;
    return { rate: received / MiB / (elapsed / 1000), cpu: { sendMs: ((cpu.user + cpu.system) / 1000) * perGiB, receiveMs: cpuMs * perGiB } };
  } finally {
    child.kill();
  }
}

interface IntoMemoryMode {
  mibs: number;
  sendMsPerGiB: number;
  receiveMsPerGiB: number;
}

/** bench/c/socket_into_memory: a unix socket whose receiver reads into a reused buffer, fresh memory, or fresh memory populated per MiB. */
function socketIntoMemory(bytes: number): Record<'reused' | 'fresh' | 'populated', IntoMemoryMode> {
  return cFloor('socket_into_memory', [String(bytes), '3']) as unknown as Record<'reused' | 'fresh' | 'populated', IntoMemoryMode>;
}

const modeCpu = (m: IntoMemoryMode): SideCpu => ({ sendMs: m.sendMsPerGiB, receiveMs: m.receiveMsPerGiB });

// ---------------------------------------------------------------------------------------------
// Migrations

export async function randomVm(vms: Client, size: number): Promise<string> {
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(size), vcpuCount: 1, name: 'bench' });
  const chunk = crypto.randomBytes(16 * MiB);
  for (let gpa = FILL_FROM; gpa < size; gpa += chunk.length)
    await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: chunk.subarray(0, Math.min(chunk.length, size - gpa)) });
  return vm.id;
}

export interface Moved {
  id: string;
  done: Record<string, any>;
  /** Pass 1's transfer rate as the engine measured it, MiB/s. */
  pass1MiBs: number;
}

/**
 * `migrate` from `from` to `to`, with the CPU both vcpuds spent per GiB of guest memory (the whole
 * migration: pass 1 is most of it for an idle guest; 10 ms clock ticks).
 */
export async function migrateMeasured(from: VcpudProcess, to: VcpudProcess, req: object, bytes: number): Promise<Moved & { cpu: SideCpu }> {
  const pids = [from.proc.pid as number, to.proc.pid as number];
  const before = pids.map(cpuSeconds);
  const moved = await migrate(from.client('SnapshotService'), req);
  const [sendMs, receiveMs] = pids.map((p, i) => ((cpuSeconds(p) - before[i]) * 1000 * GiB) / bytes);
  return { ...moved, cpu: { sendMs, receiveMs } };
}

export function migrate(snap: Client, req: object): Promise<Moved> {
  return new Promise((resolve, reject) => {
    let pass1 = 0;
    let done: Record<string, any> | undefined;
    const s = snap.MigrateVm(req) as grpc.ClientReadableStream<Record<string, any>>;
    s.on('data', (m) => {
      const p = m.progress?.migration;
      // The report at the end of pass 1 carries the pass's measured rate.
      if (p && p.pass === 1 && Number(p.transferRateBytesPerSecond) > 0) pass1 = Number(p.transferRateBytesPerSecond) / MiB;
      if (m.done) done = m.done;
    });
    s.on('error', reject);
    s.on('end', () => (done ? resolve({ id: done.destinationVm.id, done, pass1MiBs: pass1 }) : reject(new Error('no done message'))));
  });
}

async function tscKhz(state: Client, vmId: string): Promise<number> {
  const r = await call<{ state: { tscKhz: { khz: number } } }>(state, 'GetState', { vmId, vcpuId: 0, sections: ['STATE_SECTION_TSC_KHZ'] });
  return r.state.tscKhz.khz;
}

/** Loads dirty64 into the VM, sets it to dirty DIRTY_RATE, runs it, and lets it settle 500 ms. */
export async function runDirty64(d: VcpudProcess, vmId: string): Promise<void> {
  const vms = d.client('VmService');
  await call(vms, 'LoadProgram', { vmId, image: fs.readFileSync(guestBin('dirty64')), loadAddress: String(GUEST_ABI.loadAddress) });
  const khz = await tscKhz(d.client('VcpuStateService'), vmId);
  await call(vms, 'WriteMemory', {
    vmId,
    guestPhysicalAddress: String(DIRTY64.control),
    data: dirty64Control({ rangeStart: DIRTY_RANGE.start, rangePages: DIRTY_RANGE.pages, bytesPerSecond: DIRTY_RATE, tscKhz: khz }),
  });
  await call(vms, 'RunVm', { vmId });
  await new Promise((r) => setTimeout(r, 500));
}

/** A downtime against the issue's absolute target. */
function downtimeRow(name: string, value: number): BenchRow {
  return { name, value, unit: 'ms', floor: null, floorName: '-', ratio: null, target: `<= ${DOWNTIME_TARGET_MS} ms`, met: value <= DOWNTIME_TARGET_MS };
}

/** "prepare X + connect Y + pre-copy Z + downtime W, then deleting the source V": the whole migration's phases (0 from a vcpud that does not report them). */
function phases(d: Record<string, any>): string {
  return `prepare ${ms(d.setupPrepare).toFixed(1)} + connect ${ms(d.setupConnect).toFixed(1)} + pre-copy ${ms(d.preCopy).toFixed(1)} + downtime ${ms(d.downtime).toFixed(1)} ms, then deleting the source ${ms(d.deleteSource).toFixed(1)} ms`;
}

/** "N passes, downtime X ms = last pass + state + restore + resume". */
export function downtimeParts(d: Record<string, any>): string {
  return `${d.passes} passes, downtime ${ms(d.downtime).toFixed(1)} ms = last pass ${ms(d.downtimeLastPass).toFixed(1)} + state ${ms(d.downtimeState).toFixed(1)} + restore ${ms(d.downtimeRestore).toFixed(1)} + resume ${ms(d.downtimeResume).toFixed(1)}`;
}

/**
 * Downtime of dirty64 at DIRTY_RATE on a guest of SIZE and of LARGE with random memory, moved from
 * `from` to `to`, rounds alternating so both sizes see the same host load; medians compared.
 */
/**
 * Downtime samples at each size: per round a guest of each size with random memory running dirty64,
 * migrated back and forth `hops` times between the two vcpuds (sizes alternating round by round, so
 * both see the same host load), then deleted. `onMigration` sees each migration's report.
 */
export async function downtimeSamples(
  daemons: [VcpudProcess, VcpudProcess],
  sizes: number[],
  rounds: number,
  hops: number,
  onMigration: (m: { round: number; size: number; hop: number; moved: Moved }) => void,
): Promise<Map<number, number[]>> {
  const downtimes = new Map<number, number[]>(sizes.map((s) => [s, []]));
  for (let round = 1; round <= rounds; round++)
    for (const size of sizes) {
      let id = await randomVm(daemons[0].client('VmService'), size);
      await runDirty64(daemons[0], id);
      for (let hop = 0; hop < hops; hop++) {
        const [from, to] = hop % 2 ? [daemons[1], daemons[0]] : [daemons[0], daemons[1]];
        const moved = await migrate(from.client('SnapshotService'), { vmId: id, destination: to.serving.api });
        id = moved.id;
        downtimes.get(size)!.push(ms(moved.done.downtime));
        onMigration({ round, size, hop, moved });
      }
      await call(daemons[hops % 2].client('VmService'), 'DeleteVm', { vmId: id });
    }
  return downtimes;
}

async function downtimeBySize(from: VcpudProcess, to: VcpudProcess, rows: string[][]): Promise<BenchRow[]> {
  const downtimes = await downtimeSamples([from, to], [SIZE, LARGE], SIZE_ROUNDS, SIZE_HOPS, ({ round, size, hop, moved }) =>
    rows.push([
      `round ${round}, migration ${hop + 1}: ${size / MiB} MiB guest, dirty64 at ${DIRTY_RATE / MiB} MiB/s`,
      ms(moved.done.duration).toFixed(0),
      moved.pass1MiBs.toFixed(0),
      downtimeParts(moved.done),
    ]),
  );
  const [base, large] = [median(downtimes.get(SIZE)!), median(downtimes.get(LARGE)!)];
  const what = `downtime, dirty64 at ${DIRTY_RATE / MiB} MiB/s, median of ${SIZE_ROUNDS * SIZE_HOPS}`;
  return [
    downtimeRow(`${SIZE / MiB} MiB: ${what}`, base),
    downtimeRow(`${LARGE / MiB} MiB: ${what}`, large),
    ratioRow(`${LARGE / MiB} MiB / ${SIZE / MiB} MiB: ${what}`, large, base, 'ms', `${SIZE / MiB} MiB guest, same run`, SIZE_TARGET),
  ];
}

/** A migration and the floor run made just before it. */
interface FloorAndMove {
  floor: Awaited<ReturnType<typeof floorRate>>;
  moved: Awaited<ReturnType<typeof migrateMeasured>>;
}

/** IDLE_ROUNDS idle migrations from `a` to `b` and the floor run before each: their medians, and the last copy (left at `b`). */
interface IdleRuns {
  /** Names the memory the rows are about ('' for vcpud's default, anonymous memory). */
  memory: string;
  udsFloor: number;
  idleMs: number;
  pass1MiBs: number;
  sent: number;
  last: Moved;
}

/** Idle guests with random memory moved from `a` to `b` over UDS, each after a floor run of its own; every run's rows go into `rows`. */
async function idleMigrations(a: VcpudProcess, b: VcpudProcess, dir: string, memory: string, rows: string[][]): Promise<IdleRuns> {
  const runs: (FloorAndMove & { ms: number })[] = [];
  const suffix = memory ? `, ${memory}` : '';
  for (let r = 0; r < IDLE_ROUNDS; r++) {
    const id = await randomVm(a.client('VmService'), SIZE);
    const floor = await floorRate(SIZE, dir);
    const t = now();
    const moved = await migrateMeasured(a, b, { vmId: id, destination: b.serving.api }, SIZE);
    runs.push({ floor, moved, ms: now() - t });
    if (r < IDLE_ROUNDS - 1) await call(b.client('VmService'), 'DeleteVm', { vmId: moved.id });
    rows.push(floorTableRow(`UDS floor: unix socket between two Node processes (round ${r + 1}${suffix})`, floor.rate, floor.cpu));
    rows.push([
      `idle guest, pre-copy over UDS (round ${r + 1}${suffix})`,
      runs[r].ms.toFixed(0),
      moved.pass1MiBs.toFixed(0),
      `${downtimeParts(moved.done)}; ${phases(moved.done)}; ${(Number(moved.done.bytesSent) / MiB).toFixed(0)} MiB sent; ${cpuText(moved.cpu, 'source', 'destination')}`,
    ]);
  }
  return {
    memory,
    udsFloor: median(runs.map((r) => r.floor.rate)),
    idleMs: median(runs.map((r) => r.ms)),
    pass1MiBs: median(runs.map((r) => r.moved.pass1MiBs)),
    sent: median(runs.map((r) => Number(r.moved.done.bytesSent))),
    last: runs[runs.length - 1].moved,
  };
}

/** Pass 1 against the UDS floor and the whole idle migration against bytes / floor: the targets for default memory, information otherwise. */
function idleRatioRows(runs: IdleRuns, label: string): BenchRow[] {
  const targets = !runs.memory;
  const how = `median of ${IDLE_ROUNDS}, each run after a floor run of its own${runs.memory ? `; ${runs.memory}` : ''}`;
  const info = targets ? '' : ' (information)';
  return [
    ratioRow(
      `${label}: migration pass-1 throughput, UDS (${how})${info}`,
      runs.pass1MiBs,
      runs.udsFloor,
      'MiB/s',
      'unix socket between two Node processes',
      targets ? THROUGHPUT_TARGET : undefined,
    ),
    ratioRow(
      `${label}: idle guest, whole migration time (${how})${info}`,
      runs.idleMs,
      (runs.sent / MiB / runs.udsFloor) * 1000,
      'ms',
      'bytes sent / UDS floor',
      targets ? IDLE_TARGET : undefined,
    ),
  ];
}

/** An idle guest with random memory moved over mTLS from `src` to `dst`, after a Node TLS floor run of its own. */
async function mtlsMigration(src: VcpudProcess, dst: VcpudProcess, dir: string, pki: Pki, preallocate = false): Promise<FloorAndMove> {
  const id = await randomVm(src.client('VmService'), SIZE);
  const floor = await floorRate(SIZE, dir, pki);
  const moved = await migrateMeasured(src, dst, { vmId: id, destination: localhostTarget(dst), preallocateDestinationMemory: preallocate }, SIZE);
  return { floor, moved };
}

/** The run's floor and migration lines of the detail table (`suffix` names the memory). */
function mtlsTableRows(run: FloorAndMove, suffix: string): string[][] {
  const { floor, moved } = run;
  return [
    floorTableRow(`TLS floor: Node TLS over TCP loopback, two processes${suffix}`, floor.rate, floor.cpu),
    [
      `idle guest, pre-copy over mTLS${suffix}`,
      ms(moved.done.duration).toFixed(0),
      moved.pass1MiBs.toFixed(0),
      `${downtimeParts(moved.done)}; ${cpuText(moved.cpu, 'source', 'destination')}`,
    ],
  ];
}

/** Pass 1 against Node's TLS: the target for default memory (`memory` ''), information otherwise. */
function mtlsRatioRow(run: FloorAndMove, label: string, memory: string): BenchRow {
  return ratioRow(
    `${label}: migration pass-1 throughput, mTLS${memory ? `, ${memory} (information)` : ''}`,
    run.moved.pass1MiBs,
    run.floor.rate,
    'MiB/s',
    'Node TLS over TCP between two processes',
    memory ? undefined : THROUGHPUT_TARGET,
  );
}

/**
 * Section 4 of measureMigration: idle migrations between vcpuds whose guest memory is in a hugetlbfs
 * state directory over a pool reserved (and first touched, bench/c/hugepage_warm) for them, undone after.
 */
async function onHugepages(pki: Pki, dir: string, limit: string[], rows: string[][]): Promise<BenchRow[]> {
  const label = `${SIZE / MiB} MiB`;
  const memory = 'guest memory on hugetlbfs (a warm 2 MiB page pool)';
  // Source and destination copies of one guest at a time, and room for rounding.
  const pool = reserveHugepagePool(2 * Math.ceil(SIZE / (2 * MiB)) + 16);
  if ('unavailable' in pool) {
    rows.push([`${memory}: skipped`, '-', '-', pool.unavailable]);
    return [];
  }
  const daemons: VcpudProcess[] = [];
  try {
    const warm = cFloor('hugepage_warm', [String(pool.pages)]) as { ms: number };
    rows.push([`${memory}: first touch of the ${pool.pages}-page pool`, warm.ms.toFixed(0), '-', 'once, before these rows: the host backs the pages again']);
    const stateDir = (name: string) => ['--state-dir', fs.mkdtempSync(path.join(pool.mount, `${name}-`))];
    const start = (name: string, args: string[]) =>
      startVcpud([...args, '--snapshot-dir', path.join(dir, `huge-${name}`), ...limit, ...stateDir(name)], {}, VCPUD_NODE_ARGS);
    const [a, b] = await Promise.all([start('a', []), start('b', [])]);
    daemons.push(a, b);
    const uds = await idleMigrations(a, b, dir, memory, rows);
    await call(b.client('VmService'), 'DeleteVm', { vmId: uds.last.id });
    const dst = await start('mtls-dst', mtlsServeArgs(pki, [MIGRATOR]));
    daemons.push(dst);
    const src = await start('mtls-src', migrationDialArgs(pki, MIGRATOR));
    daemons.push(src);
    const overTls = await mtlsMigration(src, dst, dir, pki);
    rows.push(...mtlsTableRows(overTls, ' (hugetlbfs)'));
    return [...idleRatioRows(uds, label), mtlsRatioRow(overTls, label, memory)];
  } finally {
    // SIGINT destroys the VMs (SIGTERM would save them in their state directories for a restart).
    await Promise.all(daemons.map((d) => d.stop('SIGINT')));
    pool.release();
  }
}

export async function measureMigration(): Promise<BenchResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-bench-migration-'));
  const pki = makePki(path.join(dir, 'pki'));
  issueClients(pki, MIGRATOR);
  const daemons: VcpudProcess[] = [];
  const rows: string[][] = [];
  const benchRows: BenchRow[] = [];
  const verdicts: string[] = [];
  const label = `${SIZE / MiB} MiB`;
  try {
    // The default per-VM limit is 4 GiB; a larger knob value needs it raised on both sides.
    const limit = ['--max-memory-per-vm', `${Math.max(SIZE, LARGE) / MiB}Mi`];
    const [a, b] = await Promise.all(['a', 'b'].map((side) => startVcpud(['--snapshot-dir', path.join(dir, side), ...limit], {}, VCPUD_NODE_ARGS)));
    daemons.push(a, b);
    const aVms = a.client('VmService');
    const bSnap = b.client('SnapshotService');

    // 1. An idle guest with random memory, UDS: throughput of pass 1 and the whole time. IDLE_ROUNDS
    // migrations, each after a floor measure of its own; the ratios compare medians (single runs
    // swung 0.68-0.83x against the floor from one full run to the next).
    const idleRuns = await idleMigrations(a, b, dir, '', rows);
    // The last one's copy stays at b: the dirty64 migration back starts from it (step 2).
    const idle = idleRuns.last;
    const { udsFloor, idleMs, pass1MiBs, sent } = idleRuns;
    benchRows.push(...idleRatioRows(idleRuns, label));

    // 1a. The same idle migration with the destination's memory preallocated (committed before
    // prepare answers; information): pass 1 then writes into committed memory, prepare pays for it.
    const preId = await randomVm(aVms, SIZE);
    const tPre = now();
    const pre = await migrateMeasured(a, b, { vmId: preId, destination: b.serving.api, preallocateDestinationMemory: true }, SIZE);
    const preMs = now() - tPre;
    await call(b.client('VmService'), 'DeleteVm', { vmId: pre.id });
    rows.push([
      'the same, destination memory preallocated',
      preMs.toFixed(0),
      pre.pass1MiBs.toFixed(0),
      `${downtimeParts(pre.done)}; ${phases(pre.done)}; ${cpuText(pre.cpu, 'source', 'destination')}`,
    ]);
    benchRows.push(
      ratioRow(
        `${label}: migration pass-1 throughput, UDS, destination memory preallocated (information)`,
        pre.pass1MiBs,
        udsFloor,
        'MiB/s',
        'unix socket between two Node processes',
      ),
      ratioRow(
        `${label}: idle guest, whole migration time, destination memory preallocated (information)`,
        preMs,
        (Number(pre.done.bytesSent) / MiB / udsFloor) * 1000,
        'ms',
        'bytes sent / UDS floor',
      ),
    );

    // 1b. What the same socket moves when the receiver keeps the bytes in fresh memory (information).
    const mem = socketIntoMemory(SIZE);
    const intoFresh = Math.max(mem.fresh.mibs, mem.populated.mibs);
    rows.push(floorTableRow('C unix socket, receiver reads into a reused 1 MiB buffer', mem.reused.mibs, modeCpu(mem.reused)));
    rows.push(floorTableRow('C unix socket, receiver reads into fresh memory', mem.fresh.mibs, modeCpu(mem.fresh)));
    rows.push(floorTableRow('the same, each MiB populated first (MADV_POPULATE_WRITE)', mem.populated.mibs, modeCpu(mem.populated)));
    const freshName = 'C unix socket whose receiver reads into memory it has just mapped (the faster of faulted by the copy and populated per MiB)';
    benchRows.push(
      ratioRow(
        `${label}: unix socket into fresh memory against the UDS floor (information)`,
        intoFresh,
        udsFloor,
        'MiB/s',
        'unix socket between two Node processes',
      ),
      ratioRow(`${label}: migration pass-1 throughput, UDS, against a socket into fresh memory (information)`, pass1MiBs, intoFresh, 'MiB/s', freshName),
      ratioRow(
        `${label}: idle guest, whole migration time against bytes / that socket (information)`,
        idleMs,
        (sent / MiB / intoFresh) * 1000,
        'ms',
        `bytes sent / ${freshName}`,
      ),
    );

    // 2. The same guest running dirty64 at DIRTY_RATE: downtime and its parts.
    await runDirty64(b, idle.id);
    const busy = await migrate(bSnap, { vmId: idle.id, destination: a.serving.api });
    const d = busy.done;
    const downtime = ms(d.downtime);
    rows.push([
      `dirty64 at ${DIRTY_RATE / MiB} MiB/s, pre-copy over UDS`,
      ms(d.duration).toFixed(0),
      busy.pass1MiBs.toFixed(0),
      `${downtimeParts(d)}; throttle max ${d.maxThrottlePercent}%`,
    ]);
    benchRows.push(downtimeRow(`${label}: downtime, dirty64 at ${DIRTY_RATE / MiB} MiB/s`, downtime));
    await call(aVms, 'DeleteVm', { vmId: busy.id });

    // 2b. Downtime vs guest size: the same dirtying guest at SIZE and at LARGE, alternating.
    if (LARGE > 0) benchRows.push(...(await downtimeBySize(a, b, rows)));

    // 3. mTLS over TCP on 127.0.0.1: an idle guest again, against Node's TLS.
    const dst = await startVcpud(mtlsServeArgs(pki, [MIGRATOR]), {}, VCPUD_NODE_ARGS);
    daemons.push(dst);
    const src = await startVcpud(migrationDialArgs(pki, MIGRATOR), {}, VCPUD_NODE_ARGS);
    daemons.push(src);
    const overTls = await mtlsMigration(src, dst, dir, pki);
    const tlsFloor = overTls.floor.rate;
    const { rate: tlsKeep, cpu: tlsKeepCpu } = await floorRate(SIZE, dir, pki, { keep: true });
    const [tlsFloorRow, tlsMigrationRow] = mtlsTableRows(overTls, '');
    rows.push(tlsFloorRow, floorTableRow('the same, the receiver copying into a new buffer of that size', tlsKeep, tlsKeepCpu), tlsMigrationRow);
    // 3a. The same with the destination's memory committed before pass 1, as in 1a: what the data
    // plane moves over TLS when the destination's first touch is not in the pass.
    await call(dst.client('VmService', pki.clientCreds(MIGRATOR), localhostTarget(dst)), 'DeleteVm', { vmId: overTls.moved.id });
    const preTls = await mtlsMigration(src, dst, dir, pki, true);
    rows.push(...mtlsTableRows(preTls, ' (destination memory preallocated)'));
    benchRows.push(
      mtlsRatioRow(overTls, label, ''),
      mtlsRatioRow(preTls, label, 'destination memory preallocated'),
      ratioRow(
        `${label}: Node TLS into fresh memory against the TLS floor (information)`,
        tlsKeep,
        tlsFloor,
        'MiB/s',
        'Node TLS over TCP between two processes',
      ),
      ratioRow(
        `${label}: migration pass-1 throughput, mTLS, against TLS into fresh memory (information)`,
        overTls.moved.pass1MiBs,
        tlsKeep,
        'MiB/s',
        'Node TLS over TCP, the receiver copying into a new buffer of the guest size',
      ),
    );

    // 4. Guest memory from a warm pool of 2 MiB pages (information): both sides' --state-dir on
    // hugetlbfs, as an operator gives a pod `medium: HugePages-2Mi`. The same idle migrations, over
    // UDS and mTLS: what the data plane moves when the destination's memory costs only its zeroing.
    benchRows.push(...(await onHugepages(pki, dir, limit, rows)));
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  }
  for (const r of benchRows)
    verdicts.push(`${r.name}: ${r.value.toFixed(1)} ${r.unit}${r.ratio !== null ? ` = ${r.ratio.toFixed(2)} x ${r.floorName}` : ''} ${targetVerdict(r)}`);
  const detail = [
    `Live migration between two vcpud processes, ${label} guest with random memory\n`,
    table(['measure', 'ms', 'MiB/s', 'notes'], rows),
    '',
    ...verdicts,
  ].join('\n');
  return { rows: benchRows, detail };
}

async function main(): Promise<void> {
  console.log((await measureMigration()).detail);
}

if (require.main === module) main().catch(fatal);
