/**
 * Runs the floors in the same run as the measured code (the raw C programs of bench/c, an empty
 * grpc-js handler in its own process), and the helpers every benchmark shares: stats, the table,
 * the paused counter64 VM, RSS, and BenchRow, the shape of one figure beside its floor.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { call } from '../test/support/vcpud-process';

export const ROOT = path.basename(path.join(__dirname, '..')) === 'dist' ? path.join(__dirname, '..', '..') : path.join(__dirname, '..');

export function cFloor(program: string, args: string[]): Record<string, unknown> {
  execFileSync('make', ['-s', '-C', path.join(ROOT, 'bench', 'c')], { stdio: 'inherit' });
  const out = execFileSync(path.join(ROOT, 'bench', 'c', 'build', program), args, { encoding: 'utf8' });
  return JSON.parse(out) as Record<string, unknown>;
}

export const guestBin = (name: string) => path.join(ROOT, 'test', 'guests', 'build', `${name}.bin`);

/**
 * One benchmark figure beside its floor measured in the same run: what `npm run bench` collects
 * into its table. `ratio` is value / floor when the target is a ratio; null when the target is
 * absolute (e.g. RSS <= 80 MiB + guest memory, where `floor` is the guest memory).
 */
export interface BenchRow {
  name: string;
  value: number;
  unit: string;
  floor: number | null;
  floorName: string;
  ratio: number | null;
  /** The target as text, e.g. ">= 0.7" or "<= 82 MiB"; "-" when the issue sets none. */
  target: string;
  /** null: no target, the figure is reported only. */
  met: boolean | null;
}

/** What each benchmark's measure...() returns: its rows for the one table, and its own text table. */
export interface BenchResult {
  rows: BenchRow[];
  detail: string;
}

/** A bound on value / floor: "<=" for costs (time per call), ">=" for rates. */
export interface RatioTarget {
  op: '<=' | '>=';
  ratio: number;
}

export function meets(ratio: number, target: RatioTarget): boolean {
  return target.op === '<=' ? ratio <= target.ratio : ratio >= target.ratio;
}

/** A row whose figure is compared to its floor as value / floor; no `target`: reported only. */
export function ratioRow(name: string, value: number, floor: number, unit: string, floorName: string, target?: RatioTarget): BenchRow {
  const ratio = value / floor;
  return {
    name,
    value,
    unit,
    floor,
    floorName,
    ratio,
    target: target ? `${target.op} ${target.ratio}` : '-',
    met: target ? meets(ratio, target) : null,
  };
}

/** An environment variable a benchmark reads, recorded so BENCHMARKS.md can list them all. */
export interface Knob {
  name: string;
  fallback: string;
  /** What this run used. */
  value: string;
  what: string;
}

export const knobs: Knob[] = [];

/** process.env[name], or `fallback` when unset or empty; recorded in `knobs` for the report. */
export function knob(name: string, fallback: string, what: string): string {
  const value = process.env[name] || fallback;
  knobs.push({ name, fallback, value, what });
  return value;
}

/** The end of a benchmark's main() run directly: the error, exit status 1. */
export function fatal(e: unknown): never {
  console.error(e);
  process.exit(1);
}

/** The median: the middle value, or the mean of the two middle values of an even count. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}

/** The p-th percentile (0..100, nearest rank) of values already sorted ascending. */
export function percentileSorted(sorted: ArrayLike<number>, p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

export function percentile(xs: number[], p: number): number {
  return percentileSorted(
    [...xs].sort((a, b) => a - b),
    p,
  );
}

/** ns per call of `fn`: median of `batches` batches of `n` calls. */
export function nsPerCall(fn: () => unknown, n: number, batches = 5): number {
  const per: number[] = [];
  for (let b = 0; b < batches; b++) {
    const t = process.hrtime.bigint();
    for (let i = 0; i < n; i++) fn();
    per.push(Number(process.hrtime.bigint() - t) / n);
  }
  return median(per);
}

export async function nsPerCallAsync(fn: () => Promise<unknown>, n: number, batches = 5): Promise<number> {
  const per: number[] = [];
  for (let b = 0; b < batches; b++) {
    const t = process.hrtime.bigint();
    for (let i = 0; i < n; i++) await fn();
    per.push(Number(process.hrtime.bigint() - t) / n);
  }
  return median(per);
}

export function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map((c) => (typeof c === 'number' ? c.toFixed(c < 10 ? 2 : 0) : c)))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => String(r[i]).length)));
  // trimEnd: no padding after the last column (trailing blanks in BENCHMARKS.md).
  return cells
    .map((r) =>
      r
        .map((c, i) => String(c).padEnd(widths[i]))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

export const MiB = 1024 * 1024;

export { rssBytes } from '../test/support/proc-resources';

/** CPU time (user + system) a process has used so far, in seconds (/proc/PID/stat, 100 ticks/s). */
export function cpuSeconds(pid: number): number {
  // Fields after the ")" closing the command name: utime and stime are the 12th and 13th.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/**
 * A 1-vCPU VM (2 MiB) that ran counter64 briefly and is now paused: GetState reads it without
 * the implicit pause/resume of a running vCPU. Returns its id. `vms` is a VmService client.
 */
export async function pausedCounterVm(vms: Parameters<typeof call>[0]): Promise<{ id: string; memoryBytes: number }> {
  const memoryBytes = 2 << 20;
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(memoryBytes), vcpuCount: 1 });
  await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(guestBin('counter64')), loadAddress: '4096' });
  await call(vms, 'RunVm', { vmId: vm.id });
  await new Promise((r) => setTimeout(r, 50));
  await call(vms, 'PauseVm', { vmId: vm.id });
  return { id: vm.id, memoryBytes };
}

/** The empty-call floor: grpc-js serving one no-op unary method on a Unix socket, in its own process. */
const EMPTY_SERVER = `
const grpc = require('@grpc/grpc-js');
const reply = process.argv[2] ? require('fs').readFileSync(process.argv[2]) : Buffer.alloc(0);
const s = new grpc.Server();
const id = (x) => x;
s.addService({ Empty: { path: '/bench.Empty/Call', requestStream: false, responseStream: false,
  requestSerialize: id, requestDeserialize: id, responseSerialize: id, responseDeserialize: id } },
  { Empty: (call, cb) => cb(null, reply) });
s.bindAsync('unix:' + process.argv[1], grpc.ServerCredentials.createInsecure(), () => console.log('ready'));
`;

export const EMPTY_METHOD = '/bench.Empty/Call';

export interface EmptyServer {
  /** grpc-js target: unix:/path. */
  target: string;
  pid: number;
  stop(): Promise<void>;
}

/**
 * A trivial grpc-js handler in its own process. It answers with an empty message, or with `reply`'s bytes
 * as they are (already serialized: the floor of sending a response of that size, without producing it);
 * with `how.ioctls`, after making GetState's ioctls on its own paused vCPU (bench/ioctl-handler-server.ts).
 */
export async function startEmptyServer(reply?: Buffer, how: { ioctls?: boolean } = {}): Promise<EmptyServer> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-empty-'));
  const sock = path.join(dir, 'e.sock');
  // how.ioctls: the handler also makes GetState's 12 GET ioctls per call on a vCPU of its own (ioctl-handler-server.ts).
  const args = how.ioctls ? [path.join(__dirname, 'ioctl-handler-server.js'), sock] : ['-e', EMPTY_SERVER, sock];
  if (how.ioctls && !reply) throw new Error('startEmptyServer: the ioctl handler answers GetState bytes: pass them');
  if (reply) {
    fs.writeFileSync(path.join(dir, 'reply.bin'), reply);
    args.push(path.join(dir, 'reply.bin'));
  }
  const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'], cwd: ROOT });
  await new Promise((resolve, reject) => {
    proc.stdout!.once('data', resolve);
    proc.once('exit', (code) => reject(new Error(`the empty grpc-js server exited with ${code}`)));
  });
  return {
    target: `unix:${sock}`,
    pid: proc.pid!,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill();
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

export const ROW_HEADER = ['measure', 'value', 'floor', 'ratio', 'target', 'met'];

/** "(target >= 0.8: met)", "(target <= 1.3: NOT met)", or "(information)" for a row without a target. */
export const targetVerdict = (r: BenchRow) => (r.met === null ? '(information)' : `(target ${r.target}: ${r.met ? 'met' : 'NOT met'})`);

/** One BenchRow as the cells of ROW_HEADER (shared by the text table and BENCHMARKS.md's). */
export function rowCells(r: BenchRow): string[] {
  const num = (v: number) => (Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2));
  return [
    r.name,
    `${num(r.value)} ${r.unit}`,
    r.floor === null ? '-' : `${num(r.floor)} ${r.unit} (${r.floorName})`,
    r.ratio === null ? '-' : r.ratio.toFixed(2),
    r.target,
    r.met === null ? '-' : r.met ? 'met' : 'NOT met',
  ];
}

/** BenchRows as the table `npm run bench` prints: figure, floor, ratio, target, verdict. */
export function rowsTable(rows: BenchRow[]): string {
  return table(ROW_HEADER, rows.map(rowCells));
}
