/**
 * Dirty-page logging on the real kernel: a guest (dirty64) writing N known pages shows exactly
 * those bits in the range; the read clears them ('get') or clear() does ('manual' modes);
 * 'manual-initially-set' starts with every bit set; vcpud's own writes show in takeWrittenPages.
 */
import fs from 'node:fs';
import { dirtyBitmapBytes, type DirtyLogMode } from '../../src/ffi/dirty-log';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { DIRTY64, dirty64Control, GUESTS } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { loadGuest, useRegistry, waitForState } from '../support/runtime';

const MiB = 1 << 20;
const MEMORY = 64 * MiB;
const PAGES = MEMORY / 4096;
const RANGE_START = 8 * MiB;
const FIRST = RANGE_START / 4096;
/** Not a multiple of 8 or 64, so a bit off at either end shows. */
const N = 77;

const bit = (bm: Buffer, i: number) => (bm[i >> 3] >> (i & 7)) & 1;
const setBits = (bm: Buffer, from = 0, to = PAGES) => {
  const out: number[] = [];
  for (let i = from; i < to; i++) if (bit(bm, i)) out.push(i);
  return out;
};
const range = (a: number, n: number) => Array.from({ length: n }, (_, i) => a + i);

describeKvm('dirty logging (real KVM)', () => {
  const registry = useRegistry({ maxVms: 2, maxVcpusPerVm: 1, maxMemoryPerVmBytes: MEMORY, maxMemoryTotalBytes: 2 * MEMORY });

  it('reports the capabilities the host has (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)', () => {
    const vm = registry().create({ memoryBytes: MEMORY, vcpuCount: 1 });
    const caps = vm.vm.dirtyLogCaps();
    const raw = vm.vm.checkExtension('MANUAL_DIRTY_LOG_PROTECT2');
    console.log(`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = ${raw}: ${JSON.stringify(caps)}`);
    expect(caps).toEqual({ manualProtect: (raw & 1) !== 0, initiallySet: (raw & 2) !== 0 });
  });

  /** A VM whose guest writes pages FIRST..FIRST+N-1 once each, then stops (done). */
  async function guestWritingN(mode: DirtyLogMode): Promise<ManagedVm> {
    const vm = registry().create({ memoryBytes: MEMORY, vcpuCount: 1 });
    await loadGuest(vm, 'dirty64');
    vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: RANGE_START, rangePages: 1024, limit: N }));
    vm.vm.startDirtyLog(0, mode);
    return vm;
  }

  async function runToDone(vm: ManagedVm): Promise<void> {
    await vm.resumeAll();
    await waitForState(vm, 0, 'stopped');
    expect(vm.vcpu(0).status().reason).toBe('done');
    expect(vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0)).toBe(BigInt(N));
  }

  /** Bits set in the written range (and the 1024-page range around it that the guest did not reach). */
  const inRange = (bm: Buffer) => setBits(bm, FIRST - 64, FIRST + 1024);
  /** Bits outside the range: only the guest's low pages (page tables, control block) may be there. */
  const outside = (bm: Buffer) => [...setBits(bm, 0, FIRST - 64), ...setBits(bm, FIRST + 1024)];

  it("'get': exactly the pages written, cleared by the read", async () => {
    const vm = await guestWritingN('get');
    await runToDone(vm);
    const bm = Buffer.alloc(dirtyBitmapBytes(MEMORY));
    await vm.vm.harvestDirtyLog(0, bm);
    expect(inRange(bm)).toEqual(range(FIRST, N));
    expect(outside(bm).every((p) => p < 0x10)).toBe(true);
    expect(bit(bm, DIRTY64.control / 4096)).toBe(1);
    await vm.vm.harvestDirtyLog(0, bm);
    expect(setBits(bm)).toEqual([]);
  });

  it("'manual': GET leaves the bits, clear() in 64-page chunks removes them", async () => {
    const vm = await guestWritingN('manual');
    await runToDone(vm);
    const bm = Buffer.alloc(dirtyBitmapBytes(MEMORY));
    await vm.vm.harvestDirtyLog(0, bm);
    expect(inRange(bm)).toEqual(range(FIRST, N));
    const again = Buffer.alloc(bm.length);
    await vm.vm.harvestDirtyLog(0, again);
    expect(again.equals(bm)).toBe(true);
    // Clear the range's first chunk only: its bits go, the rest stay.
    await vm.vm.clearDirtyLog(0, FIRST, 64, bm);
    await vm.vm.harvestDirtyLog(0, again);
    expect(inRange(again)).toEqual(range(FIRST + 64, N - 64));
    for (let first = 0; first < PAGES; first += 4096) await vm.vm.clearDirtyLog(0, first, 4096, again);
    await vm.vm.harvestDirtyLog(0, again);
    expect(setBits(again)).toEqual([]);
    await expect(vm.vm.clearDirtyLog(0, 3, 64, again)).rejects.toMatchObject({ kind: 'invalid_argument' });
  });

  it("'manual-initially-set': every bit set at the start, then only what the guest writes", async () => {
    const vm = await guestWritingN('manual-initially-set');
    const bm = Buffer.alloc(dirtyBitmapBytes(MEMORY));
    await vm.vm.harvestDirtyLog(0, bm);
    expect(setBits(bm).length).toBe(PAGES);
    await vm.vm.clearDirtyLog(0, 0, PAGES, bm);
    await vm.vm.harvestDirtyLog(0, bm);
    expect(setBits(bm)).toEqual([]);
    await runToDone(vm);
    await vm.vm.harvestDirtyLog(0, bm);
    expect(inRange(bm)).toEqual(range(FIRST, N));
  });

  it('the mode is VM-wide; harvest needs logging; stop ends it', async () => {
    const vm = await guestWritingN('get');
    const bm = Buffer.alloc(dirtyBitmapBytes(MEMORY));
    expect(() => vm.vm.startDirtyLog(0, 'manual')).toThrow(/already logs/);
    // The kernel itself would switch modes under a logging slot (which is why DirtyLog refuses to).
    vm.vm.enableCap('MANUAL_DIRTY_LOG_PROTECT2', [1n]);
    vm.vm.enableCap('MANUAL_DIRTY_LOG_PROTECT2', [0n]);
    expect(() => vm.vm.enableCap('MANUAL_DIRTY_LOG_PROTECT2', [2n])).toThrow(/EINVAL/);
    await expect(vm.vm.clearDirtyLog(0, 0, 64, bm)).rejects.toThrow(/mode 'get'/);
    vm.vm.stopDirtyLog(0);
    expect(vm.vm.dirtyLogMode).toBeUndefined();
    await expect(vm.vm.harvestDirtyLog(0, bm)).rejects.toThrow(/does not log/);
    // After a stop the slot can log again, in another mode.
    vm.vm.startDirtyLog(0, 'manual');
    await expect(vm.vm.harvestDirtyLog(0, Buffer.alloc(8))).rejects.toThrow(/bitmap is 8 bytes/);
    await runToDone(vm);
    await vm.vm.harvestDirtyLog(0, bm);
    expect(inRange(bm)).toEqual(range(FIRST, N));
  });

  it("vcpud's own writes (write, readFromFd) show in takeWrittenPages, once", () => {
    const vm = registry().create({ memoryBytes: MEMORY, vcpuCount: 1 });
    const mem = vm.vm.regions[0].memory;
    const taken = () => {
      const out = Buffer.alloc(PAGES / 8);
      mem.takeWrittenPages(out);
      return setBits(out);
    };
    vm.writeMemory(0x5000, Buffer.alloc(10, 1)); // before tracking: not recorded
    mem.trackWrites(true);
    expect(taken()).toEqual([]);
    vm.writeMemory(0x20ff0, Buffer.alloc(0x20, 1)); // straddles pages 0x20 and 0x21
    vm.writeMemory(40 * MiB, Buffer.alloc(3 * 4096, 2));
    const fd = fs.openSync(GUESTS.dirty64.file, 'r');
    try {
      mem.readFromFd(50 * MiB, fs.fstatSync(fd).size, fd, 0);
    } finally {
      fs.closeSync(fd);
    }
    expect(taken()).toEqual([0x20, 0x21, ...range((40 * MiB) / 4096, 3), (50 * MiB) / 4096]);
    expect(taken()).toEqual([]);
    mem.trackWrites(false);
    vm.writeMemory(0x7000, Buffer.alloc(1, 1));
    expect(taken()).toEqual([]);
  });
});
