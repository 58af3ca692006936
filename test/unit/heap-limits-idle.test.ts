/**
 * heap-limits.ts holds the young generation at its cap across idle periods. V8 shrinks the young
 * generation when a collection sees little allocation; under the next load it must grow back to the
 * cap. With growth stopped for good once the cap was first reached, it stayed at 1-2 MiB after an
 * idle vcpud's shrink: 7x the scavenges and 20-40 us more server CPU per GetState (BENCHMARKS.md).
 * Run in a child process: heap-limits.ts sets V8 flags of the process that imports it.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { YOUNG_GENERATION_CAP } from '../../src/server/heap-limit-values';
import { packageRoot } from '../../src/package';

const HEAP_LIMITS = path.join(packageRoot(), 'dist', 'src', 'server', 'heap-limits.js');

/** Load (short-lived garbage) for 1.5 s, then idle until a scavenge shrinks the young generation (at most 20 s), then load again. */
const CHILD = `
const v8 = require('node:v8');
require(${JSON.stringify(HEAP_LIMITS)});
const young = () => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space').space_size;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let keep = [];
const load = (ms) => new Promise((done) => {
  const end = Date.now() + ms;
  const step = () => {
    for (let i = 0; i < 20000; i++) { keep.push({ a: i, b: [i, i + 1], c: 'x' + i }); if (keep.length > 2000) keep = []; }
    if (Date.now() < end) setImmediate(step); else done();
  };
  step();
});
(async () => {
  await load(1500);
  const loaded = young();
  let idle = young();
  for (let s = 0; s < 20 && idle >= loaded; s++) {
    await sleep(1000);
    gc({ type: 'minor' });
    idle = young();
  }
  await load(1500);
  console.log(JSON.stringify({ loaded, idle, reloaded: young() }));
})();
`;

test('after an idle shrink the young generation grows back to its cap under load', () => {
  if (!fs.existsSync(HEAP_LIMITS)) throw new Error(`${HEAP_LIMITS} is missing: run the build (npm test runs tsc first)`);
  const out = execFileSync(process.execPath, ['--expose-gc', '-e', CHILD], { encoding: 'utf8', timeout: 40_000 });
  const { loaded, idle, reloaded } = JSON.parse(out) as { loaded: number; idle: number; reloaded: number };
  const mib = (b: number) => `${b / 2 ** 20} MiB`;
  console.log(`young generation: ${mib(loaded)} under load, ${mib(idle)} after idling, ${mib(reloaded)} under load again`);
  expect(loaded).toBe(YOUNG_GENERATION_CAP);
  // The premise: V8 did shrink it while idle (else this test would check nothing).
  expect(idle).toBeLessThan(YOUNG_GENERATION_CAP);
  expect(reloaded).toBe(YOUNG_GENERATION_CAP);
}, 60_000);
