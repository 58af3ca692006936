/**
 * The unix-socket migration data plane alone, between two processes, beside its floor in the same
 * run: GuestMemory.sendFrames of a guest memory full of random pages (this process) into
 * GuestMemory.receiveFrames into fresh memory (a child), against a plain unix socket moving the same
 * bytes between two Node processes (the floor of bench/migration.ts). No vcpud, gRPC, KVM or
 * switch-over: what a change to native/page_frames.cc does to the per-byte cost, in CPU ms per GiB
 * of each side (steady on a shared host, where the MiB/s follow the scheduler). Rounds alternate
 * the floor, frames copied through staging with the kernel's default send buffer (as the floor
 * has), the same with the send buffer the migration engine asks for, and frames sent zero-copy with
 * that buffer (what the engine does). Standalone (not in `npm run bench`):
 *
 *   npx tsc -p tsconfig.json && node dist/bench/migration-data-plane.js
 *
 * Profile a side with `perf record -g -- node dist/bench/migration-data-plane.js` (the child is
 * followed; its receiving pool thread is the one in ReceiveTask).
 */
import { fork } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { native, type NativeGuestMemory } from '../src/ffi/native';
import { widenSendBuffer } from '../src/ffi/page-frames';
import { MiB, fatal, knob, table } from './floors';

const SIZE = Number(knob('BENCH_DATA_PLANE_MIB', '1024', 'migration-data-plane: bytes moved per transfer, in MiB')) * MiB;
const ROUNDS = Number(knob('BENCH_DATA_PLANE_ROUNDS', '3', 'migration-data-plane: rounds of floor and frames, alternating'));
/** What bench/migration.ts's floor writes per call, and what the engine sends per sendFrames call and frame. */
const FLOOR_CHUNK = 8 * MiB;
const STREAM = { framePages: 64, stagingBytes: MiB, callBytes: 64 * MiB, stallMs: 10_000, sendBufferBytes: MiB };
const GiB = 1024 * MiB;

type Mode = 'floor' | 'copy, default send buffer' | 'copy' | 'zero-copy';
interface ChildDone {
  cpuMs: number;
  bytes: number;
}

const now = () => Number(process.hrtime.bigint()) / 1e6;
const cpuMs = (since?: NodeJS.CpuUsage) => {
  const u = process.cpuUsage(since);
  return (u.user + u.system) / 1000;
};
/** The socket's fd (the native calls take a duplicate); its own reads stopped so the fd is the call's. */
const handleOf = (s: net.Socket) => (s as unknown as { _handle: { fd: number; readStop(): number; readStart(): number } })._handle;

/** The receiving side: one connection on `socketPath`, then its CPU and byte count. */
function child(mode: Mode, socketPath: string, size: number): void {
  const server = net.createServer(async (s) => {
    const handle = handleOf(s);
    handle.readStop();
    const cpu0 = process.cpuUsage();
    const done = (bytes: number) => process.send?.({ cpuMs: cpuMs(cpu0), bytes } satisfies ChildDone);
    if (mode === 'floor') {
      let n = 0;
      s.on('data', (d: Buffer) => (n += d.length));
      s.on('end', () => done(n));
      handle.readStart();
      return;
    }
    const memory = new native.GuestMemory(size);
    const r = await memory.receiveFrames(handle.fd, Buffer.alloc(0), { stallMs: STREAM.stallMs, cancel: Buffer.alloc(1) });
    done(r.bytes);
    memory.release();
    s.destroy();
  });
  server.listen(socketPath, () => process.send?.({ listening: true }));
}

/** One transfer of SIZE bytes in `mode`: wall ms, and CPU ms of each side. */
async function transfer(mode: Mode, dir: string, memory: NativeGuestMemory, random: Buffer): Promise<string[]> {
  const socketPath = path.join(dir, `${mode}-${Date.now()}.sock`);
  const receiver = fork(__filename, ['child', mode, socketPath, String(SIZE)], { stdio: 'inherit' });
  try {
    const next = <T>() => new Promise<T>((resolve) => receiver.once('message', (m) => resolve(m as T)));
    await next();
    const s = net.connect({ path: socketPath });
    await new Promise((r) => s.once('connect', r));
    const done = next<ChildDone>();
    const [t0, cpu0] = [now(), process.cpuUsage()];
    if (mode === 'floor') {
      for (let sent = 0; sent < SIZE; sent += random.length) if (!s.write(random)) await new Promise((r) => s.once('drain', r));
      s.end();
    } else {
      handleOf(s).readStop();
      if (mode !== 'copy, default send buffer') widenSendBuffer(handleOf(s).fd, STREAM.sendBufferBytes);
      const bitmap = Buffer.alloc(SIZE / 4096 / 8, 0xff);
      const staging = Buffer.alloc(STREAM.stagingBytes);
      const cancel = Buffer.alloc(1);
      for (let page = 0, seq = 0; page < SIZE / 4096; ) {
        const r = await memory.sendFrames(handleOf(s).fd, bitmap, page, staging, {
          seq,
          framePages: STREAM.framePages,
          maxBytes: STREAM.callBytes,
          end: true,
          zeroCopy: mode === 'zero-copy',
          stallMs: STREAM.stallMs,
          cancel,
        });
        [page, seq] = [r.nextPage, seq + r.frames];
      }
    }
    const sendCpu = cpuMs(cpu0);
    const got = await done;
    const ms = now() - t0;
    s.destroy();
    const perGiB = GiB / SIZE;
    return [
      mode,
      ms.toFixed(0),
      (SIZE / MiB / (ms / 1000)).toFixed(0),
      (sendCpu * perGiB).toFixed(0),
      (got.cpuMs * perGiB).toFixed(0),
      `${(got.bytes / MiB).toFixed(0)} MiB read; load ${os.loadavg()[0].toFixed(1)}`,
    ];
  } finally {
    receiver.kill();
  }
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-bench-data-plane-'));
  const memory = new native.GuestMemory(SIZE);
  try {
    const random = crypto.randomBytes(FLOOR_CHUNK);
    for (let off = 0; off < SIZE; off += random.length) memory.write(off, random.subarray(0, Math.min(random.length, SIZE - off)));
    const rows: string[][] = [];
    const modes = ['floor', 'copy, default send buffer', 'copy', 'zero-copy'] as const;
    for (let round = 0; round < ROUNDS; round++) for (const mode of modes) rows.push(await transfer(mode, dir, memory, random));
    console.log(`unix socket data plane, ${SIZE / MiB} MiB of random pages into fresh memory, ${ROUNDS} rounds alternating\n`);
    console.log(table(['transfer', 'ms', 'MiB/s', 'sender CPU ms/GiB', 'receiver CPU ms/GiB', 'notes'], rows));
  } finally {
    memory.release();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[2] === 'child') child(process.argv[3] as Mode, process.argv[4], Number(process.argv[5]));
else if (require.main === module) main().catch(fatal);
