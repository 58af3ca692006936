/**
 * BENCHMARKS.md: the one table of `npm run bench`, the machine it ran on, each benchmark's own
 * table, and a `## Notes` section the engineer writes by hand, carried over when the file is
 * rewritten. Everything here but readMachine() and writeReport() is pure (unit-tested).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROW_HEADER, rowCells, type BenchRow, type Knob } from './floors';

export interface Machine {
  cpu: string;
  cpus: number;
  memoryBytes: number;
  kernel: string;
  /** The KVM modules loaded and where that was read. */
  kvm: string;
  node: string;
  grpcJs: string;
  /** 1-minute load average when the run started: how much else the machine was doing. */
  loadAverage: number;
  /** ISO 8601, when the run started. */
  date: string;
}

/** The "model name" of the first processor in /proc/cpuinfo (x86; other architectures lack it). */
export function cpuModel(cpuinfo: string): string | undefined {
  return /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1].trim();
}

const isKvmModule = (name: string) => /^kvm(_\w+)?$/.test(name);

/**
 * The kvm and kvm_* modules: from /proc/modules (null when absent), else from /sys/module, where
 * built-in modules with parameters also appear (a kernel without loadable modules has no
 * /proc/modules, yet KVM works).
 */
export function kvmModules(procModules: string | null, sysModules: string[]): string {
  const loaded = (procModules ?? '')
    .split('\n')
    .map((l) => l.split(' ')[0])
    .filter(isKvmModule);
  if (loaded.length) return loaded.join(', ');
  const builtIn = sysModules.filter(isKvmModule).sort();
  if (builtIn.length) return `${builtIn.join(', ')} (built in: /sys/module${procModules === null ? ', no /proc/modules' : ''})`;
  return 'none found in /proc/modules or /sys/module';
}

function readOr<T extends string | null>(file: string, fallback: T): string | T {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return fallback;
  }
}

/** This host, now. */
export function readMachine(): Machine {
  let sysModules: string[] = [];
  try {
    sysModules = fs.readdirSync('/sys/module');
  } catch {
    // not Linux, or /sys not mounted: /proc/modules alone decides
  }
  const grpcPackage = JSON.parse(fs.readFileSync(require.resolve('@grpc/grpc-js/package.json'), 'utf8')) as { version: string };
  return {
    cpu: cpuModel(readOr('/proc/cpuinfo', '')) ?? os.cpus()[0]?.model ?? 'unknown',
    cpus: os.cpus().length,
    memoryBytes: os.totalmem(),
    kernel: os.release(), // uname -r
    kvm: kvmModules(readOr('/proc/modules', null), sysModules),
    node: process.version,
    grpcJs: grpcPackage.version,
    loadAverage: os.loadavg()[0],
    date: new Date().toISOString(),
  };
}

/** The machine as label / value pairs, for the printed table and the file alike. */
export function machineEntries(m: Machine): [string, string][] {
  return [
    ['CPU', m.cpu],
    ['logical CPUs', String(m.cpus)],
    ['memory', `${(m.memoryBytes / 2 ** 30).toFixed(1)} GiB`],
    ['kernel (uname -r)', m.kernel],
    ['KVM modules', m.kvm],
    ['Node.js', m.node],
    ['@grpc/grpc-js', m.grpcJs],
    ['load average (1 min) at start', m.loadAverage.toFixed(2)],
    ['date (start of the run)', m.date],
  ];
}

export function markdownTable(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.map((c) => c.replace(/\|/g, '\\|')).join(' | ')} |`;
  return [line(header), line(header.map(() => '---')), ...rows.map(line)].join('\n');
}

export interface ReportInput {
  machine: Machine;
  rows: BenchRow[];
  /** Each benchmark's own text table, in run order; `name` is its file under bench/. */
  sections: { name: string; detail: string }[];
  knobs: Knob[];
}

export const NOTES_HEADING = '## Notes';
const NOTES_PLACEHOLDER = `${NOTES_HEADING}

<!-- Written by hand and kept by \`npm run bench\`: everything from the "## Notes" heading to the
end of the file survives a re-run. Explain here, with numbers, each target not met and where the
floor is. -->
`;

/** BENCHMARKS.md up to (not including) its Notes section. */
export function renderReport(r: ReportInput): string {
  const fence = (text: string) => `\`\`\`text\n${text}\n\`\`\``;
  return `# Benchmarks

Written by \`npm run bench\` (bench/all.ts) on ${r.machine.date}. Everything above \`${NOTES_HEADING}\` is
rewritten on each run.

## Results

${markdownTable(ROW_HEADER, r.rows.map(rowCells))}

## How to read this

- Each figure is measured beside its floor in the same run on the same machine: the ratio
  (value / floor) is the result, the absolute figures are this machine's.
- Costs (ns, us, ms) are better lower, so their targets bound the ratio from above; rates (calls/s,
  exits/s, MiB/s) are better higher, bounded from below. The snapshot rows are speeds, so their
  ratio is cp time / snapshot time.
- target \`-\`: the issue sets none, the figure is reported. floor \`-\`: the target is absolute.
- The figures are medians (of batches, calls or runs, as each section below says), which a busy
  machine moves less than means; still, a shared machine moves them (see the load average below),
  and the ratios are meaningful only when both sides ran under the same conditions. Compare ratios
  across runs, not values. The CreateSnapshot speed ratios are the exception: they compare the fastest
  run of each side, since one descheduling makes the ~100 ms cp floor at 256 MiB several times slower.

## Machine

${machineEntries(r.machine)
  .map(([k, v]) => `- ${k}: ${v}`)
  .join('\n')}

## Reproduce

\`\`\`sh
npm run bench                 # builds, runs every benchmark, prints the table, rewrites this file
npm run bench -- --no-write   # or BENCH_WRITE=0: print only
node dist/bench/NAME.js       # one benchmark and its own table (after npm run bench or npx tsc -p tsconfig.json)
\`\`\`

NAME is one of ${r.sections.map((s) => `\`${s.name}\``).join(', ')}. Environment variables:

${markdownTable(
  ['variable', 'default', 'this run', 'sets'],
  [...r.knobs].sort((a, b) => a.name.localeCompare(b.name)).map((k) => [`\`${k.name}\``, k.fallback || '(unset)', k.value || '(unset)', k.what]),
)}

## Details

${r.sections.map((s) => `### ${s.name} (\`bench/${s.name}.ts\`)\n\n${fence(s.detail)}`).join('\n\n')}
`;
}

/** `generated` followed by the Notes section of `previous` (the old file), or a placeholder. */
export function withNotes(generated: string, previous: string | null): string {
  const at = previous?.search(/^## Notes\b/m) ?? -1;
  return `${generated}\n${at >= 0 ? previous!.slice(at) : NOTES_PLACEHOLDER}`;
}

/** Rewrites `file` with `generated` and its old Notes; through a rename, so a crash loses neither. */
export function writeReport(file: string, generated: string): void {
  const tmp = path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.tmp`);
  fs.writeFileSync(tmp, withNotes(generated, readOr(file, null)));
  fs.renameSync(tmp, file);
}
