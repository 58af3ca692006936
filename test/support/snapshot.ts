/** Helpers for snapshot and migration tests against real vcpud processes. */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import { SECTIONS } from '../../src/ffi/sections';
import {
  decodePreamble,
  decodeRecordHeader,
  nextRecordOffset,
  payloadOffset,
  PREAMBLE_SIZE,
  RECORD_HEADER_SIZE,
  RecordKind,
} from '../../src/vm/snapshot-format';
import { FileSource, loadSnapshot } from '../../src/vm/snapshot-reader';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { call, startVcpud, type VcpudProcess } from './vcpud-process';

export type Client = grpc.Client & Record<string, Function>;
export const MiB = 1024 * 1024;

export interface ConsoleCollector {
  text(): string;
  /** Run states its vCPUs reported, in stream order. */
  states(): string[];
  /** Output bytes the stream dropped (its client fell behind). */
  droppedBytes(): number;
  stop(): void;
  /**
   * Once the source VM was paused (CreateSnapshot leave_paused): waits for the PAUSED state change,
   * which follows every byte printed before the pause, then stops and returns the text (refusing a
   * gap). A stream stopped sooner, even 200 ms after the pause, could lag under load and end mid-line.
   */
  stopAtPause(): Promise<string>;
  ended(): boolean;
}

/** Collects a VM's console from the start. */
export function consoleCollector(vms: Client, vmId: string): ConsoleCollector {
  let text = '';
  const states: string[] = [];
  let dropped = 0;
  let ended = false;
  const s = vms.StreamConsole({ vmId, fromStart: true }) as grpc.ClientReadableStream<Record<string, any>>;
  s.on('data', (m) => {
    dropped += Number(m.droppedOutputBytes ?? 0);
    if (m.event === 'output') text += m.output.toString('latin1');
    if (m.event === 'stateChange') states.push(m.stateChange.runState);
  });
  s.on('error', () => (ended = true));
  s.on('end', () => (ended = true));
  const stopAtPause = async () => {
    await waitFor(() => states.includes('VCPU_RUN_STATE_PAUSED'), 'the PAUSED state change on the console stream');
    s.cancel();
    if (dropped) throw new Error(`the console stream dropped ${dropped} bytes: its text is not the whole output`);
    return text;
  };
  return { text: () => text, states: () => states, droppedBytes: () => dropped, stop: () => s.cancel(), stopAtPause, ended: () => ended };
}

export async function waitFor(pred: () => boolean | Promise<boolean>, what: string, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Complete lines of counter output as numbers (a partial last line left out). */
export function counterLines(text: string): number[] {
  const lines = text.split('\n');
  lines.pop();
  return lines.filter((l) => l.length).map(Number);
}

/** The first place a run of numbers is not consecutive, or undefined. */
export function firstBreak(values: number[]): string | undefined {
  for (let i = 1; i < values.length; i++) if (values[i] !== values[i - 1] + 1) return `index ${i}: ${values[i - 1]} then ${values[i]}`;
  return undefined;
}

/**
 * What a counter64 snapshot holds, in words, for a failure message: the captured RBX (the count),
 * RIP and RSP, the count's mirror in the saved memory (it differs from RBX by at most 1 when memory
 * and registers are of one moment) and the saved stack around RSP (print_dec's digits).
 */
export async function counterSnapshotFacts(file: string): Promise<string> {
  const fd = fs.openSync(file, 'r');
  try {
    const loaded = await loadSnapshot(new FileSource(fd), { check: () => {}, lazy: false });
    try {
      const regs = SECTIONS.regs.decode(loaded.vcpuState.get(0)?.get('regs') as Buffer) as Record<string, bigint>;
      const read = (gpa: number, n: number) => {
        const b = Buffer.alloc(n);
        loaded.memory.read(gpa, b);
        return b;
      };
      const rsp = Number(regs.rsp);
      const stack = read(Math.max(0, rsp - 48), 96)
        .toString('latin1')
        .replace(/[^0-9\n]/g, '.');
      return `snapshot: RBX ${regs.rbx}, RIP 0x${regs.rip.toString(16)}, RSP 0x${rsp.toString(16)}, mirror ${read(GUEST_ABI.counterBase, 8).readBigUInt64LE(0)}, stack [RSP-48, RSP+48) ${JSON.stringify(stack)}`;
    } finally {
      loaded.memory.release();
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** A VM with counter64 loaded (not running); `fill`: guest memory from 2 MiB on gets random bytes. */
export async function counterVm(vms: Client, opts: { memory?: number; name?: string; fill?: boolean } = {}): Promise<string> {
  const memory = opts.memory ?? 4 * MiB;
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(memory), vcpuCount: 1, name: opts.name ?? 'counter' });
  if (opts.fill) {
    const chunk = crypto.randomBytes(32 * MiB);
    for (let gpa = 2 * MiB; gpa < memory; gpa += chunk.length)
      await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: chunk.subarray(0, Math.min(chunk.length, memory - gpa)) });
  }
  await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: String(GUEST_ABI.loadAddress) });
  return vm.id;
}

export interface StreamResult<T> {
  messages: T[];
  error?: grpc.ServiceError;
}

/** Runs a server stream to its end (or error), calling `onMessage` for each message. */
export function runStream<T = Record<string, any>>(stream: grpc.ClientReadableStream<T>, onMessage: (m: T) => void = () => {}): Promise<StreamResult<T>> {
  return new Promise((resolve) => {
    const messages: T[] = [];
    stream.on('data', (m: T) => {
      messages.push(m);
      onMessage(m);
    });
    stream.on('error', (error: grpc.ServiceError) => resolve({ messages, error }));
    stream.on('end', () => resolve({ messages }));
  });
}

/** RestoreSnapshotStream with `bytes`, in 1 MiB messages. */
export function uploadSnapshot(snapshots: Client, bytes: Buffer, options: object = {}): Promise<Record<string, any>> {
  return new Promise((resolve, reject) => {
    const up = snapshots.RestoreSnapshotStream((err: grpc.ServiceError | null, res: Record<string, any>) =>
      err ? reject(err) : resolve(res),
    ) as grpc.ClientWritableStream<object>;
    up.on('error', () => {});
    up.write({ options });
    for (let off = 0; off < bytes.length; off += MiB) up.write({ data: bytes.subarray(off, off + MiB) });
    up.end();
  });
}

/** Offset of the first memory data payload byte of a snapshot (a byte its checksums cover, unlike alignment padding). */
export function firstMemoryData(file: Buffer): number {
  decodePreamble(file);
  for (let at = PREAMBLE_SIZE, seq = 0; ; seq++) {
    const h = decodeRecordHeader(file.subarray(at, at + RECORD_HEADER_SIZE), at, seq);
    if (h.kind === RecordKind.MemoryData && h.payloadLength) return payloadOffset(h);
    at = nextRecordOffset(h);
  }
}

export const sha256 = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** Two vcpuds sharing one --snapshot-dir, and the clients the snapshot suites use. */
export interface SnapshotPair {
  snapDir: string;
  a: VcpudProcess;
  b: VcpudProcess;
  aVms: Client;
  aSnap: Client;
  bVms: Client;
  bSnap: Client;
}

/**
 * Registers, in the calling describe block, hooks that start two vcpuds sharing a new --snapshot-dir
 * (named from `prefix`) before its tests, delete every VM a test left on either after each, and stop
 * both and remove the directory after all. The returned object is filled in by the first hook.
 */
export function snapshotPair(prefix: string): SnapshotPair {
  const pair = { snapDir: fs.mkdtempSync(path.join(os.tmpdir(), prefix)) } as SnapshotPair;
  beforeAll(async () => {
    [pair.a, pair.b] = await Promise.all([startVcpud(['--snapshot-dir', pair.snapDir]), startVcpud(['--snapshot-dir', pair.snapDir])]);
    [pair.aVms, pair.aSnap, pair.bVms, pair.bSnap] = [
      pair.a.client('VmService'),
      pair.a.client('SnapshotService'),
      pair.b.client('VmService'),
      pair.b.client('SnapshotService'),
    ];
  });
  afterAll(async () => {
    await Promise.all([pair.a?.stop(), pair.b?.stop()]);
    fs.rmSync(pair.snapDir, { recursive: true, force: true });
  });
  afterEach(async () => {
    for (const vms of [pair.aVms, pair.bVms]) {
      const { vms: left } = await call<{ vms: { id: string }[] }>(vms, 'ListVms', {});
      for (const vm of left) await call(vms, 'DeleteVm', { vmId: vm.id });
    }
  });
  return pair;
}
