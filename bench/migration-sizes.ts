/**
 * Switch-over downtime at two guest sizes, quicker than bench/migration.ts's step 2b and with more
 * samples per fill: two vcpuds on unix sockets, a guest of each size with random memory running
 * dirty64 (BENCH_MIGRATION_DIRTY_MIBS, default 64 MiB/s), migrated back and forth HOPS times, sizes
 * alternating round by round so both see the same host load. Prints every migration's downtime
 * parts and the load average, then the median downtime of each size and their ratio (issue 14:
 * downtime at 4 GiB <= 1.2x that at 1 GiB).
 *
 * Knobs: BENCH_SIZES_MIB (default "1024,4096"), BENCH_SIZES_ROUNDS (default 2), BENCH_SIZES_HOPS
 * (default 3). VCPUD_MAIN runs another build's vcpud (before/after comparisons, alternating runs).
 * Reproduce: `bash scripts/build-guests.sh && npx tsc -p tsconfig.json && node dist/bench/migration-sizes.js`.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startVcpud } from '../test/support/vcpud-process';
import { MiB, fatal, knob, median } from './floors';
import { downtimeParts, downtimeSamples } from './migration';

const SIZES = knob('BENCH_SIZES_MIB', '1024,4096', 'migration-sizes: guest sizes in MiB, comma-separated')
  .split(',')
  .map((s) => Number(s) * MiB);
const ROUNDS = Number(knob('BENCH_SIZES_ROUNDS', '2', 'migration-sizes: rounds (a fresh guest of each size per round)'));
const HOPS = Number(knob('BENCH_SIZES_HOPS', '3', 'migration-sizes: migrations per guest, back and forth'));

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-bench-sizes-'));
  const limit = ['--max-memory-per-vm', `${Math.max(...SIZES) / MiB}Mi`];
  const daemons = await Promise.all(['a', 'b'].map((side) => startVcpud(['--snapshot-dir', path.join(dir, side), ...limit])));
  let downtimes: Map<number, number[]>;
  try {
    downtimes = await downtimeSamples([daemons[0], daemons[1]], SIZES, ROUNDS, HOPS, ({ round, size, hop, moved }) =>
      console.log(`round ${round}, ${size / MiB} MiB, migration ${hop + 1}: ${downtimeParts(moved.done)}; load ${os.loadavg()[0].toFixed(2)}`),
    );
  } finally {
    await Promise.all(daemons.map((d) => d.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const medians = SIZES.map((s) => median(downtimes.get(s)!));
  for (const [i, s] of SIZES.entries())
    console.log(
      `${s / MiB} MiB: median downtime ${medians[i].toFixed(1)} ms of ${downtimes
        .get(s)!
        .map((d) => d.toFixed(1))
        .join(', ')}`,
    );
  console.log(`${SIZES.at(-1)! / MiB} MiB / ${SIZES[0] / MiB} MiB: ${(medians.at(-1)! / medians[0]).toFixed(2)} (target <= 1.2)`);
}

if (require.main === module) main().catch(fatal);
