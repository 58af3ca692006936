/**
 * The pure parts of `npm run bench`'s report: the table's verdicts (met, NOT met, '-' without a
 * target), the machine description, and BENCHMARKS.md's Notes section surviving a rewrite (on a
 * temp file, never the repository's BENCHMARKS.md).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ratioRow, rowsTable, type BenchRow } from '../../bench/floors';
import { cpuModel, kvmModules, machineEntries, readMachine, renderReport, withNotes, writeReport, type Machine, type ReportInput } from '../../bench/report';

const LE2 = { op: '<=', ratio: 2 } as const;
const GE07 = { op: '>=', ratio: 0.7 } as const;

const rows: BenchRow[] = [
  ratioRow('cost within target', 150, 100, 'ns', 'raw C', LE2),
  ratioRow('cost over target', 250, 100, 'ns', 'raw C', LE2),
  ratioRow('rate under target', 600, 1000, 'calls/s', 'empty handler', GE07),
  ratioRow('reported only', 50_000, 66_000, 'exits/s', 'C loop'),
  { name: 'absolute', value: 28.1, unit: 'ms', floor: null, floorName: '-', ratio: null, target: '<= 50 ms', met: true },
];

const machine: Machine = {
  cpu: 'Test CPU',
  cpus: 2,
  memoryBytes: 8 * 2 ** 30,
  kernel: '6.1.0-test',
  kvm: 'kvm_intel, kvm',
  node: 'v20.0.0',
  grpcJs: '1.2.3',
  loadAverage: 1.5,
  date: '2026-01-02T03:04:05.000Z',
};

const input: ReportInput = {
  machine,
  rows,
  sections: [
    { name: 'ffi-ioctl', detail: 'ffi detail table' },
    { name: 'snapshot', detail: 'snapshot detail table' },
  ],
  knobs: [
    { name: 'BENCH_N', fallback: '20000', value: '20000', what: 'ffi-ioctl: calls' },
    { name: 'BENCH_CALLS', fallback: '2000', value: '500', what: 'getstate: calls' },
  ],
};

/** The last column of each line of a text table, header excluded. */
const metColumn = (text: string) =>
  text
    .split('\n')
    .slice(1)
    .map((l) => l.trim().split(/ {2,}/).pop());

describe('the results table', () => {
  test('ratioRow: value / floor against the bound, no target gives "-" and met null', () => {
    expect(rows.map((r) => [r.ratio, r.target, r.met])).toEqual([
      [1.5, '<= 2', true],
      [2.5, '<= 2', false],
      [0.6, '>= 0.7', false],
      [50_000 / 66_000, '-', null],
      [null, '<= 50 ms', true],
    ]);
  });

  test('shows met, NOT met and "-" for no target; "-" for an absolute target\'s floor and ratio', () => {
    const text = rowsTable(rows);
    expect(text.split('\n')[0]).toMatch(/^measure\s+value\s+floor\s+ratio\s+target\s+met$/);
    expect(metColumn(text)).toEqual(['met', 'NOT met', 'NOT met', '-', 'met']);
    expect(text).toMatch(/cost within target\s+150 ns\s+100 ns \(raw C\)\s+1\.50\s+<= 2\s+met/);
    expect(text).toMatch(/reported only\s+50000 exits\/s\s+66000 exits\/s \(C loop\)\s+0\.76\s+-\s+-/);
    expect(text).toMatch(/absolute\s+28\.10 ms\s+-\s+-\s+<= 50 ms\s+met/);
  });

  test('BENCHMARKS.md has the same rows as a markdown table', () => {
    const md = renderReport(input);
    expect(md).toContain('| measure | value | floor | ratio | target | met |');
    expect(md).toContain('| cost over target | 250 ns | 100 ns (raw C) | 2.50 | <= 2 | NOT met |');
    expect(md).toContain('| reported only | 50000 exits/s | 66000 exits/s (C loop) | 0.76 | - | - |');
    expect(md).toContain('| absolute | 28.10 ms | - | - | <= 50 ms | met |');
  });

  test('a "|" in a cell does not break the markdown table', () => {
    const md = renderReport({ ...input, rows: [{ ...rows[0], name: 'a | b' }] });
    expect(md).toContain('| a \\| b | 150 ns |');
  });
});

describe('the machine description', () => {
  test('cpuModel reads the first "model name" of /proc/cpuinfo', () => {
    expect(cpuModel('processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: other\n')).toBe('AMD EPYC 7B13');
    expect(cpuModel('processor : 0\nCPU part : 0xd0c\n')).toBeUndefined();
  });

  test('kvmModules: /proc/modules first, else built-in modules from /sys/module', () => {
    const proc = 'kvm_intel 401408 0 - Live 0x0000000000000000\nkvm 1134592 1 kvm_intel, Live 0x0\nkvmgt 1 0 - Live 0x0\nxfs 1 0 - Live 0x0\n';
    expect(kvmModules(proc, ['kvm', 'kvm_intel'])).toBe('kvm_intel, kvm');
    expect(kvmModules(null, ['ext4', 'kvm_pvm', 'kvm'])).toBe('kvm, kvm_pvm (built in: /sys/module, no /proc/modules)');
    expect(kvmModules('xfs 1 0 - Live 0x0\n', ['kvm', 'kvm_amd'])).toBe('kvm, kvm_amd (built in: /sys/module)');
    expect(kvmModules(null, [])).toMatch(/^none found/);
  });

  test('this host: every field filled in', () => {
    const m = readMachine();
    expect(m.cpu).not.toBe('');
    expect(m.cpus).toBeGreaterThan(0);
    expect(m.memoryBytes).toBeGreaterThan(0);
    expect(m.kernel).toBe(os.release());
    expect(m.kvm).not.toBe('');
    expect(m.node).toBe(process.version);
    expect(m.grpcJs).toMatch(/^\d+\.\d+\.\d+/);
    expect(Number.isFinite(m.loadAverage)).toBe(true);
    expect(new Date(m.date).toISOString()).toBe(m.date);
  });

  test('the report names every field', () => {
    expect(machineEntries(machine).map(([k]) => k)).toEqual([
      'CPU',
      'logical CPUs',
      'memory',
      'kernel (uname -r)',
      'KVM modules',
      'Node.js',
      '@grpc/grpc-js',
      'load average (1 min) at start',
      'date (start of the run)',
    ]);
    const md = renderReport(input);
    for (const line of [
      '- CPU: Test CPU',
      '- logical CPUs: 2',
      '- memory: 8.0 GiB',
      '- kernel (uname -r): 6.1.0-test',
      '- KVM modules: kvm_intel, kvm',
      '- Node.js: v20.0.0',
      '- @grpc/grpc-js: 1.2.3',
      '- date (start of the run): 2026-01-02T03:04:05.000Z',
    ])
      expect(md).toContain(line);
  });

  test('the report has how to reproduce, the knobs and each detail section', () => {
    const md = renderReport(input);
    expect(md).toMatch(/^# Benchmarks\n/);
    expect(md).toContain('npm run bench -- --no-write');
    expect(md).toContain('| `BENCH_CALLS` | 2000 | 500 | getstate: calls |');
    expect(md.indexOf('`BENCH_CALLS`')).toBeLessThan(md.indexOf('`BENCH_N`')); // sorted by name
    expect(md).toContain('### ffi-ioctl (`bench/ffi-ioctl.ts`)\n\n```text\nffi detail table\n```');
    expect(md).toContain('### snapshot (`bench/snapshot.ts`)');
    expect(md).not.toMatch(/^## Notes/m); // withNotes adds it
  });
});

describe('the Notes section', () => {
  let dir: string;
  let file: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-report-'));
    file = path.join(dir, 'BENCHMARKS.md');
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  test('a new file gets a Notes placeholder after the generated part', () => {
    writeReport(file, renderReport(input));
    const text = fs.readFileSync(file, 'utf8');
    expect(text.startsWith(renderReport(input))).toBe(true);
    expect(text).toMatch(/\n## Notes\n\n<!-- Written by hand/);
  });

  test('a rewrite replaces everything above Notes and keeps Notes to the end of the file, verbatim', () => {
    const notes = '## Notes\n\nGetState misses 1.3x: grpc-js costs 480 us here.\n\n### Snapshot\n\n| a | b |\n|---|---|\n| 1 | 2 |\n';
    fs.writeFileSync(file, `# Benchmarks\n\nold table, old date\n\n${notes}`);
    const generated = renderReport({ ...input, machine: { ...machine, date: '2027-01-01T00:00:00.000Z' } });
    writeReport(file, generated);
    const text = fs.readFileSync(file, 'utf8');
    expect(text).toBe(`${generated}\n${notes}`);
    expect(text).not.toContain('old table');
    writeReport(file, generated); // and again: nothing added, nothing lost
    expect(fs.readFileSync(file, 'utf8')).toBe(text);
    expect(fs.readdirSync(dir)).toEqual(['BENCHMARKS.md']); // no temp file left
  });

  test('withNotes: "## Notes" only as a heading at the start of a line', () => {
    expect(withNotes('gen\n', 'text mentioning ## Notes inline\n')).toMatch(/^gen\n\n## Notes\n\n<!--/);
    expect(withNotes('gen\n', 'x\n## Notes (perf)\nkept\n')).toBe('gen\n\n## Notes (perf)\nkept\n');
  });
});
