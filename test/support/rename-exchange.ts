/**
 * The rename-exchange adversary (rename-exchange.c, compiled once per process with the host's cc):
 * a child process swapping two paths with renameat2(RENAME_EXCHANGE) for a bounded time.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

let binary: string | undefined;

function compiled(): string {
  if (!binary) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-rename-exchange-'));
    binary = path.join(dir, 'rename-exchange');
    execFileSync('cc', ['-O2', '-o', binary, path.join(__dirname, 'rename-exchange.c')]);
  }
  return binary;
}

/**
 * Starts swapping `a` and `b` for `seconds`: `done` resolves to the number of swaps (an even count
 * leaves them as they were), `running()` is false once it has.
 */
export function swapLoop(a: string, b: string, seconds: number): { done: Promise<number>; running(): boolean } {
  const child = spawn(compiled(), [a, b, String(seconds)], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (out += d));
  const done = new Promise<number>((resolve, reject) =>
    child.on('exit', (code) => (code === 0 ? resolve(Number(out.trim())) : reject(new Error(`rename-exchange exited ${code}: ${out}`)))),
  );
  let finished = false;
  void done.then(
    () => (finished = true),
    () => (finished = true),
  );
  return { done, running: () => !finished };
}

export const VICTIM = 'victim.snap';
const VICTIM_TEXT = 'not yours';

/**
 * The arena of the escape race: `parent/sub` (a real directory holding VICTIM) and `parent/link`, a
 * symbolic link to `outside` (holding its own VICTIM). `putBack` recreates the inside victim through
 * a handle on the real subdirectory that no swap moves; `outsideEntries` and `outsideVictim` tell
 * whether anything outside was touched.
 */
export function escapeArena(parent: string, outside: string, victimBytes: string) {
  fs.mkdirSync(outside);
  fs.writeFileSync(path.join(outside, VICTIM), VICTIM_TEXT);
  const sub = path.join(parent, 'sub');
  const link = path.join(parent, 'link');
  fs.mkdirSync(sub, { recursive: true });
  fs.symlinkSync(outside, link);
  const realSub = fs.openSync(sub, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  const putBack = () => fs.writeFileSync(`/proc/self/fd/${realSub}/${VICTIM}`, victimBytes);
  putBack();
  return {
    sub,
    link,
    putBack,
    close: () => fs.closeSync(realSub),
    outsideEntries: () => fs.readdirSync(outside),
    outsideVictimIntact: () => fs.readFileSync(path.join(outside, VICTIM), 'utf8') === VICTIM_TEXT,
  };
}
