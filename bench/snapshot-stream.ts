/**
 * The stream RPCs beside the grpc-js bulk floor (bench/grpc-bulk-floor.ts) measured in the same run:
 * CreateSnapshot to a stream against a trivial server-streaming handler, RestoreSnapshotStream against
 * a trivial client-streaming one, moving the same bytes (the snapshot's) in the same message size
 * (1 MiB) between two processes. The VM's memory is random (no page to skip). Rounds alternate which
 * of the pair goes first (the host is shared); the figures are medians. Also `vcpuctl snapshot create
 * --out` and `vcpuctl snapshot restore --in` end to end (process start included, FILE on /dev/shm so
 * the disk is not measured), reported only.
 *
 * Target (issue 14 item 5): each stream RPC at >= 0.8 x its floor. BENCH_STREAM_MIB (guest memory),
 * BENCH_STREAM_RUNS override the defaults; BENCH_CPU_PROF=DIR runs vcpud under --cpu-prof into DIR.
 */
import { execFile } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { vcpudProto } from '../src/api/proto';
import { call, startVcpud } from '../test/support/vcpud-process';
import { BYTES_FIELD_HEADROOM, bytesFieldMessage } from '../src/api/preserialized';
import { startBulkFloor } from './grpc-bulk-floor';
import { randomCounterVm } from './snapshot';
import { MiB, ROOT, cpuSeconds, fatal, knob, median, ratioRow, table, type BenchResult, type BenchRow } from './floors';

type Client = grpc.Client & Record<string, Function>;
const MEMORY = Number(knob('BENCH_STREAM_MIB', '1024', 'snapshot-stream: guest memory in MiB')) * MiB;
const RUNS = Number(knob('BENCH_STREAM_RUNS', '5', 'snapshot-stream: rounds (the figures are medians)'));
const CPU_PROF = knob('BENCH_CPU_PROF', '', 'snapshot-stream: a directory: vcpud runs with node --cpu-prof into it');
const WINDOW = Number(
  knob('BENCH_STREAM_WINDOW', '0', 'snapshot-stream: HTTP/2 receive window of the bench clients in bytes (grpc-node.flow_control_window; 0 = grpc-js default)'),
);
const VCPUCTL = knob('BENCH_STREAM_VCPUCTL', '1', 'snapshot-stream: 0 skips the vcpuctl rows') !== '0';
/** The message size of both RPCs (CreateSnapshotResponse.data is at most 1 MiB; vcpuctl uploads 1 MiB). */
const CHUNK = MiB;
const TARGET = { op: '>=', ratio: 0.8 } as const;

const now = () => Number(process.hrtime.bigint()) / 1e6;

/** CreateSnapshot to a stream, consumed here: resolves to the snapshot's bytes (kept only when asked). */
function createToStream(snaps: Client, vmId: string, keep: boolean): Promise<{ bytes: number; chunks: Buffer[] }> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    const s = snaps.CreateSnapshot({ vmId, stream: true }) as grpc.ClientReadableStream<{ data?: Buffer }>;
    s.on('data', (m) => {
      if (!m.data) return;
      bytes += m.data.length;
      if (keep) chunks.push(m.data);
    });
    s.on('error', reject);
    s.on('end', () => resolve({ bytes, chunks }));
  });
}

/**
 * RestoreSnapshotStream (paused VM) of the floor's own upload messages (pre-serialized data messages:
 * the client costs what the floor's does); resolves to the new VM's id.
 */
function restoreFromStream(snaps: Client, messages: Buffer[]): Promise<string> {
  const method = vcpudProto().vcpud.v1.SnapshotService.service.RestoreSnapshotStream;
  const options = method.requestSerialize({ options: { run: false, vmName: '' } });
  return new Promise((resolve, reject) => {
    const s = snaps.makeClientStreamRequest(
      method.path,
      (b: Buffer) => b,
      method.responseDeserialize,
      (err: grpc.ServiceError | null, res?: { vm: { id: string } | null }) => (err ? reject(err) : resolve(res!.vm!.id)),
    );
    let i = -1; // -1: the options message
    const pump = () => {
      for (; i < messages.length; i++) if (!s.write(i < 0 ? options : messages[i])) return void s.once('drain', () => (i++, pump()));
      s.end();
    };
    pump();
  });
}

function run(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(cmd, args, { maxBuffer: 16 * MiB }, (err, stdout, stderr) =>
      err ? reject(new Error(`${args.join(' ')}: ${err.message}\n${stderr}`)) : resolve(stdout),
    ),
  );
}

export async function measureSnapshotStream(): Promise<BenchResult> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-snapshot-stream-'));
  const nodeArgs = CPU_PROF ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(CPU_PROF)}`] : [];
  const d = await startVcpud(['--snapshot-dir', path.join(dir, 'snapshots'), '--max-memory-per-vm', '2Gi'], {}, nodeArgs);
  const channelOptions: grpc.ChannelOptions = WINDOW ? { 'grpc-node.flow_control_window': WINDOW } : {};
  const floor = await startBulkFloor(channelOptions);
  const shmFile = path.join('/dev/shm', `bench-snapshot-stream-${process.pid}.snap`);
  const label = MEMORY >= 1 << 30 ? `${MEMORY / (1 << 30)} GiB` : `${MEMORY / MiB} MiB`;
  const t = {
    down: [] as number[],
    create: [] as number[],
    up: [] as number[],
    restore: [] as number[],
    ctlCreate: [] as number[],
    ctlRestore: [] as number[],
  };
  const cpu = { create: [] as number[], restore: [] as number[], down: [] as number[], up: [] as number[] };
  const clientCpu = { create: [] as number[], restore: [] as number[], down: [] as number[], up: [] as number[] };
  let size = 0;
  const snaps = new (vcpudProto().vcpud.v1.SnapshotService as unknown as grpc.ServiceClientConstructor)(
    d.serving.api,
    grpc.credentials.createInsecure(),
    channelOptions,
  ) as Client;
  try {
    const vms = d.client('VmService');
    const vmId = await randomCounterVm(vms, MEMORY, crypto.randomBytes(32 * MiB), 'bench-stream');

    // Warm-up (also the bytes every upload sends): one snapshot kept whole.
    const first = await createToStream(snaps, vmId, true);
    const snapshot = Buffer.concat(first.chunks);
    size = snapshot.length;
    const count = Math.ceil(size / CHUNK);
    const upMessages: Buffer[] = [];
    for (let off = 0; off < size; off += CHUNK) {
      const framed = Buffer.allocUnsafe(BYTES_FIELD_HEADROOM + Math.min(CHUNK, size - off));
      snapshot.copy(framed, BYTES_FIELD_HEADROOM, off, off + CHUNK);
      upMessages.push(bytesFieldMessage(2, framed, BYTES_FIELD_HEADROOM).bytes); // RestoreSnapshotStreamRequest.data
    }
    // The snapshot's source vCPU (a busy thread) is paused so it does not take a core from the copies.
    await call(vms, 'PauseVm', { vmId });
    const vcpudCpu = () => cpuSeconds(d.proc.pid!);
    const floorCpu = () => cpuSeconds(floor.pid);
    const ownCpu = () => {
      const u = process.cpuUsage();
      return (u.user + u.system) / 1e6;
    };
    const timed = async <T>(what: keyof typeof cpu, cpuOf: () => number, fn: () => Promise<T>): Promise<T> => {
      const [c, own] = [cpuOf(), ownCpu()];
      const t0 = now();
      const r = await fn();
      t[what].push(now() - t0);
      cpu[what].push(cpuOf() - c);
      clientCpu[what].push(ownCpu() - own);
      return r;
    };

    for (let round = 0; round < RUNS; round++) {
      const floorDown = () => timed('down', floorCpu, () => floor.down(count, CHUNK));
      const create = () => timed('create', vcpudCpu, () => createToStream(snaps, vmId, false));
      const floorUp = () => timed('up', floorCpu, () => floor.up(upMessages));
      const restore = async () => {
        const id = await timed('restore', vcpudCpu, () => restoreFromStream(snaps, upMessages));
        await call(vms, 'DeleteVm', { vmId: id });
      };
      const pairs: [() => Promise<unknown>, () => Promise<unknown>][] = [
        [floorDown, create],
        [floorUp, restore],
      ];
      for (const [a, b] of pairs) {
        if (round % 2) {
          await b();
          await a();
        } else {
          await a();
          await b();
        }
      }
      if (VCPUCTL) {
        const ctl = path.join(ROOT, 'dist', 'src', 'cli', 'vcpuctl.js');
        const server = ['--server', d.serving.api, '--json', '--timeout', '0'];
        fs.rmSync(shmFile, { force: true });
        let t0 = now();
        await run(process.execPath, [ctl, ...server, 'snapshot', 'create', vmId, '--out', shmFile]);
        t.ctlCreate.push(now() - t0);
        t0 = now();
        const out = JSON.parse(await run(process.execPath, [ctl, ...server, 'snapshot', 'restore', '--in', shmFile])) as { vm: { id: string } };
        t.ctlRestore.push(now() - t0);
        await call(vms, 'DeleteVm', { vmId: out.vm.id });
      }
      console.error(
        `round ${round}: floor down ${t.down[round].toFixed(0)} create ${t.create[round].toFixed(0)} floor up ${t.up[round].toFixed(0)} restore ${t.restore[round].toFixed(0)}` +
          (VCPUCTL ? ` vcpuctl create ${t.ctlCreate[round].toFixed(0)} restore ${t.ctlRestore[round].toFixed(0)}` : '') +
          ' ms',
      );
    }
    await call(vms, 'DeleteVm', { vmId });
  } finally {
    fs.rmSync(shmFile, { force: true });
    snaps.close();
    await floor.stop();
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const speed = (ms: number) => size / MiB / (ms / 1000);
  const m = Object.fromEntries(Object.entries(t).map(([k, v]) => [k, v.length ? median(v) : NaN])) as Record<keyof typeof t, number>;
  const medians = (o: typeof cpu) => Object.fromEntries(Object.entries(o).map(([k, v]) => [k, median(v)])) as Record<keyof typeof cpu, number>;
  const [mc, cc] = [medians(cpu), medians(clientCpu)];
  const createRow = ratioRow(`${label}: CreateSnapshot to a stream`, speed(m.create), speed(m.down), 'MiB/s', 'grpc-js server stream, same bytes', TARGET);
  const restoreRow = ratioRow(`${label}: RestoreSnapshotStream`, speed(m.restore), speed(m.up), 'MiB/s', 'grpc-js client stream, same bytes', TARGET);
  const rows: BenchRow[] = [createRow, restoreRow];
  const lines: (string | number)[][] = [
    ['grpc-js server stream (floor)', m.down, speed(m.down), `${mc.down.toFixed(2)} s (floor server)`, cc.down],
    ['CreateSnapshot to a stream', m.create, speed(m.create), `${mc.create.toFixed(2)} s (vcpud)`, cc.create],
    ['grpc-js client stream (floor)', m.up, speed(m.up), `${mc.up.toFixed(2)} s (floor server)`, cc.up],
    ['RestoreSnapshotStream', m.restore, speed(m.restore), `${mc.restore.toFixed(2)} s (vcpud)`, cc.restore],
  ];
  if (VCPUCTL) {
    rows.push(ratioRow(`${label}: vcpuctl snapshot create --out (process)`, speed(m.ctlCreate), speed(m.down), 'MiB/s', 'grpc-js server stream, same bytes'));
    rows.push(ratioRow(`${label}: vcpuctl snapshot restore --in (process)`, speed(m.ctlRestore), speed(m.up), 'MiB/s', 'grpc-js client stream, same bytes'));
    lines.push(
      ['vcpuctl snapshot create --out /dev/shm', m.ctlCreate, speed(m.ctlCreate), '', ''],
      ['vcpuctl snapshot restore --in /dev/shm', m.ctlRestore, speed(m.ctlRestore), '', ''],
    );
  }
  const detail = [
    `${label} VM, random memory, ${(size / MiB).toFixed(1)} MiB snapshot in ${CHUNK / MiB} MiB messages over a Unix socket; median of ${RUNS} alternating rounds\n`,
    table(['measure', 'ms', 'MiB/s', 'server CPU', 'client CPU s'], lines),
    '',
    ...rows.filter((r) => r.met !== null).map((r) => `${r.name}: ${r.ratio!.toFixed(2)} x the floor (target ${r.target}: ${r.met ? 'met' : 'NOT met'})`),
  ].join('\n');
  return { rows, detail };
}

async function main(): Promise<void> {
  console.log((await measureSnapshotStream()).detail);
}

if (require.main === module) main().catch(fatal);
