/** Runs the raw C floors (bench/c) in the same run as the measured code, and small stats helpers. */
import { execFileSync } from 'node:child_process';
import path from 'node:path';

const ROOT = path.basename(path.join(__dirname, '..')) === 'dist' ? path.join(__dirname, '..', '..') : path.join(__dirname, '..');

export function cFloor(program: string, args: string[]): Record<string, unknown> {
  execFileSync('make', ['-s', '-C', path.join(ROOT, 'bench', 'c')], { stdio: 'inherit' });
  const out = execFileSync(path.join(ROOT, 'bench', 'c', 'build', program), args, { encoding: 'utf8' });
  return JSON.parse(out) as Record<string, unknown>;
}

export const guestBin = (name: string) => path.join(ROOT, 'test', 'guests', 'build', `${name}.bin`);

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
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
  return cells.map((r) => r.map((c, i) => String(c).padEnd(widths[i])).join('  ')).join('\n');
}

