/**
 * `vcpuctl snapshot create|restore|list|delete|merge` and `vcpuctl migrate` (SnapshotService).
 *
 * Long operations report progress on stderr: a progress bar redrawn in place when stderr is a
 * terminal (human mode), one JSON object per progress message and line with --json (stdout keeps
 * the one JSON document of the result).
 */
import fs from 'node:fs';
import path from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import type { CreateSnapshotResponse__Output } from '../../../api/generated/vcpud/v1/CreateSnapshotResponse';
import type { MigrateVmResponse__Output } from '../../../api/generated/vcpud/v1/MigrateVmResponse';
import type { SnapshotInfo__Output } from '../../../api/generated/vcpud/v1/SnapshotInfo';
import type { SnapshotProgress__Output } from '../../../api/generated/vcpud/v1/SnapshotProgress';
import type { Duration__Output } from '../../../api/generated/google/protobuf/Duration';
import { withBulkHeap } from '../../../bulk-heap';
import { msToDuration } from '../../../duration';
import { UsageError } from '../args';
import { resolveTarget, type VcpudClient } from '../client';
import type { Command, Context } from '../command';
import { enumShort, formatSize, formatVm, keyValues, printable, table } from '../format';
import { openInputFile } from '../input-file';
import { uploadFile } from '../upload';

const BAR_WIDTH = 30;

const mib = (n: number) => `${(n / 1048576).toFixed(1)}`;

/** Bytes for humans, rounded: "62.1 MiB", "812 KiB", "96 bytes". */
export function humanSize(v: string | number): string {
  const n = Number(v);
  for (const [unit, size] of [
    ['GiB', 2 ** 30],
    ['MiB', 2 ** 20],
    ['KiB', 2 ** 10],
  ] as const)
    if (n >= size) return `${(n / size).toFixed(n / size >= 100 ? 0 : 1)} ${unit}`;
  return `${n} bytes`;
}
const seconds = (d: Duration__Output | null | undefined) => (d ? Number(d.seconds) + d.nanos / 1e9 : 0);

/** The progress display of one operation: a bar on a terminal, JSON lines with --json, else quiet. */
export function progressReporter(ctx: Context, label: string): { update(p: SnapshotProgress__Output): void; finish(): void } {
  const stderr = ctx.io.stderr as { write(s: string): unknown; isTTY?: boolean };
  const started = Date.now();
  let drawn = false;
  return {
    update(p) {
      const done = Number(p.memoryBytesDone);
      const total = Number(p.memoryBytesTotal);
      const phase = enumShort(p.phase, 'SNAPSHOT_PHASE_');
      const m = p.migration;
      if (ctx.json) {
        const migration = m
          ? {
              pass: m.pass,
              bytesTotal: Number(m.bytesTotal),
              bytesSent: Number(m.bytesSent),
              bytesRemaining: Number(m.bytesRemaining),
              dirtyRateBytesPerSecond: Number(m.dirtyRateBytesPerSecond),
              transferRateBytesPerSecond: Number(m.transferRateBytesPerSecond),
              expectedDowntimeMs: seconds(m.expectedDowntime) * 1000,
              throttlePercent: m.throttlePercent,
              switchingOver: m.switchingOver,
            }
          : undefined;
        stderr.write(
          `${JSON.stringify({ progress: { operation: label, phase, memoryBytesDone: done, memoryBytesTotal: total, bytesWritten: Number(p.bytesWritten), ...(migration ? { migration } : {}) } })}\n`,
        );
        return;
      }
      if (!stderr.isTTY) return;
      const frac = total > 0 ? Math.min(1, done / total) : 0;
      const filled = Math.round(frac * BAR_WIDTH);
      const rate = done / Math.max(0.001, (Date.now() - started) / 1000);
      // A migration's later passes: the rates and the expected downtime say more than the bar.
      const pass = m
        ? `  pass ${m.pass}${m.switchingOver ? ' (paused)' : ''}  left ${mib(Number(m.bytesRemaining))} MiB  dirty ${mib(Number(m.dirtyRateBytesPerSecond))} MiB/s  est. downtime ${(seconds(m.expectedDowntime) * 1000).toFixed(0)} ms${m.throttlePercent ? `  throttle ${m.throttlePercent}%` : ''}`
        : '';
      stderr.write(
        `\r${label} [${'#'.repeat(filled)}${'-'.repeat(BAR_WIDTH - filled)}] ${String(Math.round(frac * 100)).padStart(3)}%  ${mib(done)}/${mib(total)} MiB  ${phase.padEnd(6)} ${mib(m ? Number(m.transferRateBytesPerSecond) || rate : rate)} MiB/s${pass}\x1b[K`,
      );
      drawn = true;
    },
    finish() {
      if (drawn) stderr.write('\n');
    },
  };
}

/** Runs a server stream to its end, feeding each message to `onMessage`. */
function drain<T>(call: grpc.ClientReadableStream<T>, onMessage: (m: T) => void | Promise<void>): Promise<void> {
  return new Promise((resolve, reject) => {
    let chain = Promise.resolve();
    call.on('data', (m: T) => {
      chain = chain
        .then(() => onMessage(m))
        .catch((e) => {
          call.cancel();
          reject(e);
        });
    });
    call.on('error', reject);
    call.on('end', () => chain.then(resolve, reject));
  });
}

function infoLines(i: SnapshotInfo__Output): string {
  const rows: [string, string][] = [
    ['name', i.name || '(streamed)'],
    ['size', `${humanSize(i.sizeBytes)} (${i.sizeBytes} bytes)`],
    ['vm', `${i.vmId}${i.vmName ? ` (${i.vmName})` : ''}`],
    ['memory', `${formatSize(i.memoryBytes)}, ${i.memoryPagesStored} non-zero pages stored`],
    ['vcpus', String(i.vcpuCount)],
    ['source', `${i.sourceHost} (${i.vendor})`],
    ['format', `version ${i.formatVersion}`],
    ['chain', chainText(i)],
  ];
  if (i.duration) rows.push(['took', `${seconds(i.duration).toFixed(3)} s`]);
  return keyValues(rows).join('\n');
}

/** "full", or the parent and the chain's depth: "<- nightly/base (depth 2)". */
export const chainText = (i: Pick<SnapshotInfo__Output, 'parent' | 'chainDepth'>): string => (i.parent ? `<- ${i.parent} (depth ${i.chainDepth})` : 'full');

async function create(ctx: Context): Promise<void> {
  const [vmId, name] = ctx.positionals;
  const out = ctx.options.string('out');
  if (!name === !out)
    throw new UsageError("give NAME (stored under the server's snapshot directory) or --out FILE (streamed here), not both", 'snapshot create');
  const client = ctx.client();
  const replace = ctx.options.bool('replace');
  if (out && replace) throw new UsageError('--replace is for NAME on the server (--out FILE is always replaced whole)', 'snapshot create');
  const common = {
    vmId,
    leavePaused: ctx.options.bool('leave-paused'),
    parent: ctx.options.string('parent') ?? '',
    trackDirty: ctx.options.bool('track-dirty'),
  };
  const call = client.createSnapshot(out ? { ...common, stream: true } : { ...common, name, replace });
  const progress = progressReporter(ctx, 'snapshot');
  // --out: written under a temporary name, renamed on success, so FILE is whole or untouched.
  const file = out ? path.resolve(ctx.cwd, out) : undefined;
  const temp = file ? path.join(path.dirname(file), `.${path.basename(file)}.${process.pid}.vcpuctl-tmp`) : undefined;
  const fd = temp ? fs.openSync(temp, 'w', 0o600) : undefined;
  let done: SnapshotInfo__Output | undefined;
  let pos = 0;
  try {
    await withBulkHeap(() =>
      drain(call, (m: CreateSnapshotResponse__Output) => {
        if (m.progress) progress.update(m.progress);
        if (m.data && fd !== undefined) {
          let off = 0;
          while (off < m.data.length) off += fs.writeSync(fd, m.data, off, m.data.length - off, pos + off);
          pos += m.data.length;
        }
        if (m.done) done = m.done;
      }),
    );
    progress.finish();
    if (!done) throw new Error('the server ended CreateSnapshot without a done message');
    if (fd !== undefined) {
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      fs.renameSync(temp as string, file as string);
    }
  } catch (e) {
    progress.finish();
    if (fd !== undefined) {
      fs.closeSync(fd);
      fs.rmSync(temp as string, { force: true });
    }
    throw e;
  }
  if (ctx.json) ctx.printJson({ snapshot: done, ...(file ? { file } : {}) });
  else ctx.print(`${infoLines(done)}${file ? `\nfile  ${file}` : ''}`);
}

async function restore(ctx: Context): Promise<void> {
  const [name] = ctx.positionals;
  const inFile = ctx.options.string('in');
  if (!name === !inFile)
    throw new UsageError("give NAME (under the server's snapshot directory) or --in FILE (streamed from here), not both", 'snapshot restore');
  const client = ctx.client();
  const run = ctx.options.bool('run');
  const vmName = ctx.options.string('name') ?? '';
  let resp: Awaited<ReturnType<VcpudClient['restoreSnapshot']>>;
  if (name) {
    resp = await client.restoreSnapshot({ name, run, vmName, noLazyMemory: ctx.options.bool('no-lazy') });
  } else {
    const { fd, size } = openInputFile('--in', inFile as string, path.resolve(ctx.cwd, inFile as string), 'snapshot restore');
    const { stream, response } = client.restoreSnapshotStream();
    response.catch(() => {}); // awaited below
    const progress = progressReporter(ctx, 'upload');
    try {
      stream.write({ options: { run, vmName } });
      await withBulkHeap(() =>
        uploadFile(stream, fd, size, response, (pos) =>
          progress.update({
            phase: 'SNAPSHOT_PHASE_MEMORY',
            memoryBytesDone: String(pos),
            memoryBytesTotal: String(size),
            bytesWritten: String(pos),
          } as SnapshotProgress__Output),
        ),
      );
      stream.end();
      resp = await response;
    } finally {
      progress.finish();
      fs.closeSync(fd);
    }
  }
  if (ctx.json) ctx.printJson(resp);
  else {
    const lines = [resp.vm ? formatVm(resp.vm) : ''];
    const s = resp.stats;
    if (s)
      lines.push(
        `restored in ${(seconds(s.duration) * 1000).toFixed(1)} ms: ${humanSize(s.snapshotBytes)} snapshot, memory ${humanSize(s.memoryBytesMapped)} mapped lazily, ${humanSize(s.memoryBytesCopied)} copied`,
      );
    for (const n of resp.notes) lines.push(`note: ${printable(n)}`);
    ctx.print(lines.join('\n'));
  }
}

const ms = (d: Duration__Output | null | undefined) => `${(seconds(d) * 1000).toFixed(1)} ms`;

/** A duration option: "50ms", "0.3s", "2m", or a bare number of milliseconds. */
export function parseDurationMs(flag: string, text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$/.exec(text);
  if (!m) throw new UsageError(`bad value for --${flag}: '${text}' is not a duration (e.g. 50ms, 0.3s)`, 'migrate');
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000 }[(m[2] ?? 'ms') as 'ms' | 's' | 'm'];
}

/** The pre-copy knobs of `vcpuctl migrate` as MigrateVmRequest fields. */
function migrationTuning(o: Context['options']): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  const mode = o.string('mode');
  if (mode !== undefined) {
    const modes: Record<string, string> = { 'pre-copy': 'MIGRATION_MODE_PRE_COPY', 'stop-and-copy': 'MIGRATION_MODE_STOP_AND_COPY' };
    if (!modes[mode]) throw new UsageError(`bad value for --mode: '${mode}' (pre-copy or stop-and-copy)`, 'migrate');
    out.mode = modes[mode];
  }
  const maxDowntime = o.string('max-downtime');
  if (maxDowntime !== undefined) out.maxDowntime = msToDuration(parseDurationMs('max-downtime', maxDowntime));
  const bandwidth = o.big('bandwidth');
  if (bandwidth !== undefined) out.bandwidthBytesPerSecond = String(bandwidth);
  const perGiB = o.string('completion-timeout-per-gib');
  if (perGiB !== undefined) out.completionTimeoutPerGib = msToDuration(parseDurationMs('completion-timeout-per-gib', perGiB));
  if (o.bool('abort-on-no-progress')) out.abortOnNoProgress = true;
  if (o.bool('preallocate')) out.preallocateDestinationMemory = true;
  return out;
}

async function migrate(ctx: Context): Promise<void> {
  const [vmId] = ctx.positionals;
  const o = ctx.options;
  const file = (flag: string) => (o.string(flag) !== undefined ? ctx.readFile(`--${flag}`, o.string(flag) as string) : Buffer.alloc(0));
  const tls = { caPem: file('to-tls-ca'), certPem: file('to-tls-cert'), keyPem: file('to-tls-key'), serverName: o.string('to-tls-server-name') ?? '' };
  const anyTls = tls.caPem.length || tls.certPem.length || tls.keyPem.length || tls.serverName;
  const call = ctx.client().migrateVm({
    vmId,
    // a socket path is this directory's, not the server's: sent as unix:/abs/path
    destination: resolveTarget(o.string('to') as string, ctx.cwd, '--to').address,
    ...(anyTls ? { tls } : {}),
    leavePaused: o.bool('leave-paused'),
    destinationVmName: o.string('dest-name') ?? '',
    ...migrationTuning(o),
  });
  const progress = progressReporter(ctx, 'migrate');
  let done: MigrateVmResponse__Output['done'];
  try {
    await drain(call, (m: MigrateVmResponse__Output) => {
      if (m.progress) progress.update(m.progress);
      if (m.done) done = m.done;
    });
  } finally {
    progress.finish();
  }
  if (!done) throw new Error('the server ended MigrateVm without a done message');
  if (ctx.json) ctx.printJson({ migration: done });
  else {
    const lines = [
      `migrated ${vmId} to ${o.string('to')}: now ${done.destinationVm?.id ?? '?'} there`,
      `sent ${humanSize(done.bytesSent)} in ${seconds(done.duration).toFixed(3)} s, ${done.passes} pass${done.passes === 1 ? '' : 'es'} (${enumShort(done.mode, 'MIGRATION_MODE_').toLowerCase().replace(/_/g, '-')}); paused for ${(seconds(done.downtime) * 1000).toFixed(1)} ms`,
      `downtime: last pass ${ms(done.downtimeLastPass)}, state ${ms(done.downtimeState)}, restore ${ms(done.downtimeRestore)}, resume ${ms(done.downtimeResume)}${done.maxThrottlePercent ? `; vCPUs throttled up to ${done.maxThrottlePercent}%` : ''}`,
    ];
    // Absent from servers older than these fields: the line is left out rather than showing zeros.
    if (done.setupPrepare)
      lines.push(
        `before the switch: prepare ${ms(done.setupPrepare)}, connect ${ms(done.setupConnect)}, pre-copy ${ms(done.preCopy)}; source deleted after it in ${ms(done.deleteSource)}`,
      );
    if (done.destinationVm) lines.push(formatVm(done.destinationVm));
    for (const n of done.notes) lines.push(`note: ${printable(n)}`);
    ctx.print(lines.join('\n'));
  }
}

export const snapshotCommands: Command[] = [
  {
    path: ['snapshot', 'create'],
    summary: "Snapshot a VM (paused meanwhile) to NAME under the server's snapshot directory, or to --out FILE here.",
    positionals: ['VM', '[NAME]'],
    options: [
      { name: 'out', type: 'string', arg: 'FILE', help: 'stream the snapshot into FILE on this machine instead of storing it on the server' },
      { name: 'leave-paused', type: 'bool', help: 'leave the VM paused afterwards (default: resumed as it was)' },
      { name: 'replace', type: 'bool', help: 'replace an existing snapshot NAME (default: an existing NAME is refused, ALREADY_EXISTS)' },
      {
        name: 'parent',
        type: 'string',
        arg: 'NAME',
        help: 'incremental: store only the pages dirtied since snapshot NAME of this VM (a restore reads the chain)',
      },
      { name: 'track-dirty', type: 'bool', help: 'start dirty tracking here, so later snapshots can name this one as --parent' },
    ],
    run: create,
  },
  {
    path: ['snapshot', 'restore'],
    summary: 'Restore a snapshot (NAME on the server, or --in FILE from here) into a new VM, PAUSED unless --run.',
    positionals: ['[NAME]'],
    options: [
      { name: 'in', type: 'string', arg: 'FILE', help: 'stream the snapshot from FILE on this machine' },
      { name: 'run', type: 'bool', help: 'resume the vCPUs that were running when the snapshot was taken' },
      { name: 'name', type: 'string', arg: 'NAME', help: "name of the new VM (default: the snapshot's)" },
      { name: 'no-lazy', type: 'bool', help: 'read guest memory instead of mapping the file copy-on-write (NAME only)' },
    ],
    run: restore,
  },
  {
    path: ['snapshot', 'list'],
    summary: "List the snapshots in the server's snapshot directory.",
    positionals: [],
    options: [],
    async run(ctx) {
      const resp = await ctx.client().listSnapshots();
      if (ctx.json) ctx.printJson(resp);
      else
        ctx.print(
          table(
            ['NAME', 'SIZE', 'CHAIN', 'VM', 'MEMORY', 'VCPUS', 'TAKEN', 'PROBLEM'],
            resp.snapshots.map((s) => [
              s.name,
              humanSize(s.sizeBytes),
              s.problem ? '-' : chainText(s),
              s.vmName || s.vmId || '-',
              s.memoryBytes !== '0' ? formatSize(s.memoryBytes) : '-',
              s.vcpuCount || '-',
              s.createTime ? new Date(Number(s.createTime.seconds) * 1000).toISOString() : '-',
              s.problem || '',
            ]),
          ).join('\n'),
        );
    },
  },
  {
    path: ['snapshot', 'delete'],
    summary: "Remove a snapshot from the server's snapshot directory (one with children only with --cascade).",
    positionals: ['NAME'],
    options: [{ name: 'cascade', type: 'bool', help: 'also remove the incremental snapshots whose chains run through NAME' }],
    async run(ctx) {
      const resp = await ctx.client().deleteSnapshot(ctx.positionals[0], ctx.options.bool('cascade'));
      if (ctx.json) ctx.printJson(resp);
      else ctx.print(resp.deleted.map((n) => `deleted ${n}`).join('\n'));
    },
  },
  {
    path: ['snapshot', 'merge'],
    summary: 'Fold the chain of incremental snapshot NAME into one full snapshot, atomically (over NAME unless --into).',
    positionals: ['NAME'],
    options: [{ name: 'into', type: 'string', arg: 'TARGET', help: 'write the full snapshot to TARGET instead of over NAME' }],
    async run(ctx) {
      const resp = await ctx.client().mergeSnapshot(ctx.positionals[0], ctx.options.string('into') ?? '');
      if (ctx.json) ctx.printJson(resp);
      else if (resp.snapshot)
        ctx.print(`merged a chain of ${resp.chainLength} in ${(seconds(resp.duration) * 1000).toFixed(0)} ms\n${infoLines(resp.snapshot)}`);
    },
  },
  {
    path: ['migrate'],
    summary: 'Move a VM to another vcpud (--to): live (pre-copy) or paused for the copy, resumed there, then deleted here.',
    positionals: ['VM'],
    options: [
      { name: 'to', type: 'string', arg: 'ADDR', required: true, help: 'the destination vcpud: host:port (TLS), unix:PATH or a socket path' },
      { name: 'to-tls-ca', type: 'string', arg: 'FILE', help: "CA the source verifies the destination with (default: the server's --migration-tls-ca)" },
      { name: 'to-tls-cert', type: 'string', arg: 'FILE', help: 'client certificate the source presents to the destination (mTLS)' },
      { name: 'to-tls-key', type: 'string', arg: 'FILE', help: 'its private key' },
      { name: 'to-tls-server-name', type: 'string', arg: 'NAME', help: "name to verify the destination's certificate against" },
      { name: 'leave-paused', type: 'bool', help: 'leave the VM paused on the destination' },
      { name: 'dest-name', type: 'string', arg: 'NAME', help: 'name of the VM on the destination' },
      { name: 'mode', type: 'string', arg: 'MODE', help: 'pre-copy (default: copy while the VM runs) or stop-and-copy (paused for the whole copy)' },
      { name: 'max-downtime', type: 'string', arg: 'DURATION', help: 'pre-copy switches over once the expected pause is this short (default 50ms)' },
      { name: 'bandwidth', type: 'size', arg: 'BYTES', help: 'cap the memory copy at BYTES per second (e.g. 200MiB; default unlimited)' },
      {
        name: 'completion-timeout-per-gib',
        type: 'string',
        arg: 'DURATION',
        help: 'give up (the VM stays here) after this long per GiB of guest memory (default 150s)',
      },
      { name: 'abort-on-no-progress', type: 'bool', help: 'fail instead of throttling the vCPUs when the dirty memory stops shrinking' },
      {
        name: 'preallocate',
        type: 'bool',
        help: 'the destination commits all guest memory before the copy starts: a host short of memory fails the migration early (the VM stays here) and pass 1 writes into committed memory; prepare takes longer',
      },
    ],
    notes:
      'The --to-tls-* files are read here and sent to the source server, which dials the destination with them. Progress shows each pass: bytes left, dirty and transfer rates, the expected downtime and any throttle; the report splits the downtime into its parts.',
    run: migrate,
  },
];
