/** Helpers for snapshot and migration tests against real vcpud processes. */
import crypto from 'node:crypto';
import fs from 'node:fs';
import type * as grpc from '@grpc/grpc-js';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { call } from './vcpud-process';

export type Client = grpc.Client & Record<string, Function>;
export const MiB = 1024 * 1024;

/** Collects a VM's console from the start. */
export function consoleCollector(vms: Client, vmId: string): { text(): string; stop(): void; ended(): boolean } {
  let text = '';
  let ended = false;
  const s = vms.StreamConsole({ vmId, fromStart: true }) as grpc.ClientReadableStream<Record<string, any>>;
  s.on('data', (m) => m.event === 'output' && (text += m.output.toString('latin1')));
  s.on('error', () => (ended = true));
  s.on('end', () => (ended = true));
  return { text: () => text, stop: () => s.cancel(), ended: () => ended };
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

export const sha256 = (file: string) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');
