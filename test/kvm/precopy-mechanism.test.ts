/**
 * The mechanism layer of a live migration end to end, in one process: a running dirty64 guest's
 * memory is copied to a second GuestMemory in passes (dirty log in each mode, cleared chunk by
 * chunk right before packing in the manual modes, plus vcpud's own writes from takeWrittenPages),
 * then the guest is paused and the last dirty pages go. The copy must equal the source byte for
 * byte, and every page of the guest's range must hold the value its counter (RBX) says: no write
 * escaped the log.
 */
import { dirtyBitmapBytes, type DirtyLogMode } from '../../src/ffi/dirty-log';
import { native, type NativeGuestMemory } from '../../src/ffi/native';
import { applyFrames } from '../../src/ffi/page-frames';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { DIRTY64, dirty64Control, dirty64Expected } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { loadGuest, useRegistry, waitUntil } from '../support/runtime';

const MiB = 1 << 20;
const MEMORY = 64 * MiB;
const PAGES = MEMORY / 4096;
const RANGE_START = 16 * MiB;
const RANGE_PAGES = 256;
const CHUNK = 4096; // pages cleared (manual modes) and packed at a time
const PASSES = 4;

/** The bits of `bm` in [first, +n) as a bitmap over the whole memory (others zero). */
function chunkOf(bm: Buffer, first: number, n: number): Buffer {
  const c = Buffer.alloc(bm.length);
  bm.copy(c, first / 8, first / 8, (first + n) / 8);
  return c;
}

describeKvm('pre-copy mechanism: dirty log + page frames (real KVM)', () => {
  const registry = useRegistry({ maxVms: 2, maxVcpusPerVm: 1, maxMemoryPerVmBytes: MEMORY, maxMemoryTotalBytes: 2 * MEMORY });

  /** One pass: harvest, OR in vcpud's writes, then per chunk clear (manual) + pack + apply. */
  async function pass(vm: ManagedVm, mode: DirtyLogMode, dst: NativeGuestMemory, bm: Buffer, out: Buffer, seq: { n: bigint }) {
    const src = vm.vm.regions[0].memory;
    await vm.vm.harvestDirtyLog(0, bm);
    src.takeWrittenPages(bm);
    let pages = 0;
    for (let first = 0; first < PAGES; first += CHUNK) {
      const chunk = chunkOf(bm, first, CHUNK);
      if (mode !== 'get') await vm.vm.clearDirtyLog(0, first, CHUNK, chunk);
      for (let page = first; page < first + CHUNK; ) {
        const r = await src.packPages(chunk, page, out, { seq: seq.n });
        seq.n += BigInt(r.frames);
        const a = await applyFrames(dst, out.subarray(0, r.bytes));
        expect(a.consumed).toBe(r.bytes);
        pages += r.pages;
        page = Math.min(r.nextPage, first + CHUNK);
        if (r.nextPage >= PAGES) break;
      }
    }
    return pages;
  }

  it.each(['get', 'manual', 'manual-initially-set'] as const)("mode '%s': the copy equals the source, every counter value in place", async (mode) => {
    const vm = registry().create({ memoryBytes: MEMORY, vcpuCount: 1 });
    await loadGuest(vm, 'dirty64');
    const tscKhz = vm.vcpu(0).vcpu.getTscKhz();
    vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: RANGE_START, rangePages: RANGE_PAGES, bytesPerSecond: 16 * MiB, tscKhz }));
    const src = vm.vm.regions[0].memory;
    const dst = new native.GuestMemory(MEMORY);
    try {
      src.trackWrites(true);
      vm.vm.startDirtyLog(0, mode);
      await vm.resumeAll();
      await waitUntil(() => vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0) > 0n, 'dirty64 to start');
      const bm = Buffer.alloc(dirtyBitmapBytes(MEMORY));
      const out = Buffer.alloc(4 * MiB);
      const seq = { n: 0n };
      // Pass 1: initially-set hands every page over; the others start from the non-zero pages.
      if (mode !== 'manual-initially-set') {
        const nonZero = src.scanPages(0, PAGES);
        nonZero.copy(bm);
        for (let page = 0; page < PAGES; ) {
          const r = await src.packPages(bm, page, out, { seq: seq.n });
          seq.n += BigInt(r.frames);
          await applyFrames(dst, out.subarray(0, r.bytes));
          page = r.nextPage;
        }
      }
      const sent: number[] = [];
      for (let i = 0; i < PASSES; i++) {
        await new Promise((r) => setTimeout(r, 40)); // let the guest dirty pages between passes
        vm.writeMemory(40 * MiB + i * 4096, Buffer.from(`vcpud wrote this in pass ${i}`)); // not a guest write: only takeWrittenPages sees it
        sent.push(await pass(vm, mode, dst, bm, out, seq));
      }
      await vm.pauseAll();
      sent.push(await pass(vm, mode, dst, bm, out, seq));
      console.log(`${mode}: pages sent per pass after the first: ${sent.join(', ')}`);

      const a = Buffer.alloc(MiB);
      const b = Buffer.alloc(MiB);
      for (let off = 0; off < MEMORY; off += MiB) {
        src.read(off, a);
        dst.read(off, b);
        if (!a.equals(b)) throw new Error(`memory differs in [${off}, +1 MiB)`);
      }
      const rbx = (await vm.vcpu(0).withState(() => vm.vcpu(0).vcpu.getRegs())).rbx;
      expect(rbx).toBeGreaterThan(BigInt(RANGE_PAGES)); // wrapped around the range at least once
      const v = Buffer.alloc(8);
      for (let j = 0; j < RANGE_PAGES; j++) {
        dst.read(RANGE_START + j * 4096, v);
        const got = v.readBigUInt64LE(0);
        const want = dirty64Expected(rbx, RANGE_PAGES, j);
        // Paused between `inc rbx` and the page store: that one page still holds the previous lap's value.
        const pausedBeforeStore = want === rbx && got === rbx - BigInt(RANGE_PAGES);
        if (got !== want && !pausedBeforeStore) throw new Error(`page ${j}: ${got}, expected ${want} (RBX ${rbx})`);
      }
    } finally {
      dst.release();
    }
  });
});
