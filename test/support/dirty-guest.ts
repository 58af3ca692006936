/**
 * A running dirty64 guest for migration tests: its counter written into a page range while it moves,
 * random memory around it, and the check that both arrived whole (no write lost or repeated, the
 * random bytes unchanged).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { DIRTY64, dirty64Control, dirty64Expected, GUESTS, GUEST_ABI } from '../guests/guests';
import { MiB, waitFor, type Client } from './snapshot';
import { call, collect } from './vcpud-process';

export const RANGE_START = 16 * MiB;
export const RANGE_PAGES = 256;

export interface DirtyGuest {
  id: string;
  /** sha256 of the random bytes written from FILL_FROM to the end of memory. */
  fillHash: string;
  /** Pages of dirty64's range (default RANGE_PAGES). */
  rangePages?: number;
}
export const FILL_FROM = 32 * MiB;

/** Waits until dirty64 in `vmId` has written more than `laps` times its range's pages (RANGE_PAGES). */
export async function untilLapped(vms: Client, vmId: string, laps: number): Promise<void> {
  await waitFor(
    async () => (await readMemory(vms, vmId, DIRTY64.control + DIRTY64.lastValue, 8)).readBigUInt64LE(0) > BigInt(laps * RANGE_PAGES),
    `dirty64 to lap its range ${laps} times`,
  );
}

/** A VM running dirty64 (unpaced) over `rangePages` pages, its memory above FILL_FROM random. */
export async function dirtyGuest(vms: Client, memory: number, rangePages = RANGE_PAGES): Promise<DirtyGuest> {
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(memory), vcpuCount: 1, name: 'dirty' });
  const hash = crypto.createHash('sha256');
  for (let gpa = FILL_FROM; gpa < memory; gpa += 16 * MiB) {
    const chunk = crypto.randomBytes(Math.min(16 * MiB, memory - gpa));
    hash.update(chunk);
    await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: chunk });
  }
  const control = dirty64Control({ rangeStart: RANGE_START, rangePages });
  await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(DIRTY64.control), data: control });
  await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.dirty64.file), loadAddress: String(GUEST_ABI.loadAddress) });
  await call(vms, 'RunVm', { vmId: vm.id });
  return { id: vm.id, fillHash: hash.digest('hex'), rangePages };
}

export async function readMemory(vms: Client, vmId: string, gpa: number, length: number): Promise<Buffer> {
  const parts = await collect<{ data: Buffer }>(vms, 'ReadMemory', { vmId, guestPhysicalAddress: String(gpa), length: String(length) });
  return Buffer.concat(parts.map((p) => p.data));
}

/** Pauses the VM and checks dirty64's range against its counter, and the random fill against its hash. */
export async function expectIntact(vms: Client, state: Client, guest: DirtyGuest, vmId: string, memory: number): Promise<bigint> {
  await call(vms, 'PauseVm', { vmId });
  const regs = (await call<{ state: { regs: { rbx: string } } }>(state, 'GetState', { vmId, vcpuId: 0, sections: ['STATE_SECTION_REGS'] })).state.regs;
  const rbx = BigInt(regs.rbx);
  const pages = guest.rangePages ?? RANGE_PAGES;
  const range = await readMemory(vms, vmId, RANGE_START, pages * 4096);
  const wrong: string[] = [];
  // dirty64 does `inc rbx` then the store: paused between the two, the page RBX is for still holds its
  // value from the lap before (exactly `pages` less). Every other page must match exactly.
  const current = Number((rbx - 1n) % BigInt(pages));
  for (let j = 0; j < pages; j++) {
    const got = range.readBigUInt64LE(j * 4096);
    const want = dirty64Expected(rbx, pages, j);
    if (got !== want && !(j === current && got === want - BigInt(pages))) wrong.push(`page ${j}: ${got}, expected ${want}`);
  }
  expect({ rbx: rbx > BigInt(pages), wrong: wrong.slice(0, 5) }).toEqual({ rbx: true, wrong: [] });
  const fill = await readMemory(vms, vmId, FILL_FROM, memory - FILL_FROM);
  expect(crypto.createHash('sha256').update(fill).digest('hex')).toBe(guest.fillHash);
  return rbx;
}
