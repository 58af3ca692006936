/**
 * npm run bench: every benchmark in sequence, in this process, then one table of every figure
 * beside its floor, then each benchmark's own table; and the same into BENCHMARKS.md at the repo
 * root (its `## Notes` kept), unless `--no-write` or BENCH_WRITE=0.
 *
 * A benchmark that fails does not stop the others; the file is then not written (a partial table
 * would read as a complete one) and the exit status is 1. Targets not met do not fail the run.
 */
import path from 'node:path';
import { measureDirtyLog } from './dirty-log';
import { measureExitRate } from './exit-rate';
import { measureFfiIoctl } from './ffi-ioctl';
import { ROOT, fatal, knob, knobs, rowsTable, table, type BenchResult } from './floors';
import { measureGetState } from './getstate';
import { measureHandover } from './handover';
import { measureMigration } from './migration';
import { machineEntries, readMachine, renderReport, writeReport } from './report';
import { measureSnapshot } from './snapshot';
import { measureIncrementalSnapshot } from './snapshot-incremental';
import { measureSnapshotStream } from './snapshot-stream';
import { measureThroughput } from './throughput';

const BENCHMARKS: { name: string; measure: () => Promise<BenchResult> }[] = [
  { name: 'ffi-ioctl', measure: measureFfiIoctl },
  { name: 'exit-rate', measure: measureExitRate },
  { name: 'getstate', measure: measureGetState },
  { name: 'throughput', measure: () => measureThroughput() },
  { name: 'snapshot', measure: measureSnapshot },
  { name: 'dirty-log', measure: measureDirtyLog },
  { name: 'snapshot-stream', measure: measureSnapshotStream },
  { name: 'snapshot-incremental', measure: measureIncrementalSnapshot },
  { name: 'migration', measure: measureMigration },
  { name: 'handover', measure: measureHandover },
];

const USAGE = 'usage: node dist/bench/all.js [--no-write]   (BENCH_WRITE=0 = --no-write)';

function shouldWrite(args: string[]): boolean {
  const env = knob('BENCH_WRITE', '1', 'all: 0 prints the table without writing BENCHMARKS.md') !== '0';
  for (const a of args) {
    if (a === '--help' || a === '-h') {
      console.log(USAGE);
      process.exit(0);
    }
    if (a !== '--no-write') {
      console.error(`unknown argument ${a}\n${USAGE}`);
      process.exit(2);
    }
  }
  return env && !args.includes('--no-write');
}

async function main(): Promise<void> {
  const write = shouldWrite(process.argv.slice(2));
  const machine = readMachine(); // before the run adds its own load
  const sections: { name: string; detail: string }[] = [];
  const rows: BenchResult['rows'] = [];
  const failed: string[] = [];
  for (const [i, b] of BENCHMARKS.entries()) {
    // Progress on stderr: stdout carries only the results.
    console.error(`[${i + 1}/${BENCHMARKS.length}] ${b.name}...`);
    const t0 = Date.now();
    try {
      const r = await b.measure();
      rows.push(...r.rows);
      sections.push({ name: b.name, detail: r.detail });
      console.error(`[${i + 1}/${BENCHMARKS.length}] ${b.name}: ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    } catch (e) {
      console.error(`[${i + 1}/${BENCHMARKS.length}] ${b.name} FAILED:`, e);
      failed.push(b.name);
    }
  }

  console.log(`${table(['machine', ''], machineEntries(machine))}\n\n${rowsTable(rows)}`);
  for (const s of sections) console.log(`\n== ${s.name} ==\n${s.detail}`);
  if (failed.length) {
    console.error(`\nfailed: ${failed.join(', ')}${write ? ' (BENCHMARKS.md not written)' : ''}`);
    process.exitCode = 1;
  } else if (write) {
    const file = path.join(ROOT, 'BENCHMARKS.md');
    writeReport(file, renderReport({ machine, rows, sections, knobs }));
    console.log(`\nwrote ${path.relative(process.cwd(), file) || file}`);
  }
}

if (require.main === module) main().catch(fatal);
