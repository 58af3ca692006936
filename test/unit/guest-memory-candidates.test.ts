/**
 * Which pages a migration reads (no KVM needed): GuestMemory.candidatePages clears the bits of pages
 * known zero without reading them (anonymous pages never touched; holes of a shared file on tmpfs)
 * and reads nothing itself, and applyFrames leaves a hole of a shared file unallocated when a zero
 * page arrives for it, but clears a page that holds data. A read of a tmpfs hole would allocate it:
 * the file's data extents (SEEK_DATA, as `fs.statSync().blocks` counts them) show whether it did.
 */
import fs from 'node:fs';
import path from 'node:path';
import { applyFrames } from '../../src/ffi/page-frames';
import { native } from '../../src/ffi/native';

const PAGE = 4096;
const PAGES = 64;

const bitsOf = (b: Buffer, n: number) => Array.from({ length: n }, (_, i) => (b[i >> 3] >> (i & 7)) & 1);
const pagesWith = (bits: number[]) => bits.flatMap((b, i) => (b ? [i] : []));
const bitmapOf = (pages: number[]) => {
  const b = Buffer.alloc(PAGES / 8);
  for (const p of pages) b[p >> 3] |= 1 << (p & 7);
  return b;
};

/** A tmpfs-backed (/dev/shm) memory file of PAGES pages, all holes, and its GuestMemory. */
function shmMemory(name: string) {
  const file = path.join('/dev/shm', `vcpud-candidates-${process.pid}-${name}`);
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, PAGES * PAGE);
  const fd = fs.openSync(file, 'r+');
  const mem = new native.GuestMemory(PAGES * PAGE, fd);
  return {
    mem,
    /** Bytes of the file backed by memory (tmpfs blocks are 512 bytes). */
    allocated: () => fs.statSync(file).blocks * 512,
    close() {
      mem.release();
      fs.closeSync(fd);
      fs.rmSync(file, { force: true });
    },
  };
}

describe('GuestMemory.candidatePages', () => {
  it('anonymous memory: the pages written (even with zeros) and none of the untouched ones', () => {
    const mem = new native.GuestMemory(PAGES * PAGE);
    try {
      mem.write(3 * PAGE, Buffer.alloc(PAGE, 1));
      mem.write(40 * PAGE, Buffer.alloc(2 * PAGE));
      expect(pagesWith(bitsOf(mem.candidatePages(0, PAGES), PAGES))).toEqual([3, 40, 41]);
      // A range from an offset: bit 0 is the range's first page.
      expect(pagesWith(bitsOf(mem.candidatePages(40 * PAGE, 8), 8))).toEqual([0, 1]);
    } finally {
      mem.release();
    }
  });

  it('anonymous memory larger than one slice of the page map (64 Ki pages)', () => {
    const pages = 80 * 1024;
    const mem = new native.GuestMemory(pages * PAGE);
    try {
      for (const p of [1, 65535, 65536, 79999]) mem.write(p * PAGE, Buffer.alloc(8, 1));
      expect(pagesWith(bitsOf(mem.candidatePages(0, pages), pages))).toEqual([1, 65535, 65536, 79999]);
    } finally {
      mem.release();
    }
  });

  it('a tmpfs file: its data extents, and the holes stay holes (nothing read)', () => {
    const shm = shmMemory('data');
    try {
      shm.mem.write(5 * PAGE, Buffer.alloc(PAGE, 7));
      shm.mem.write(20 * PAGE, Buffer.alloc(PAGE));
      expect(pagesWith(bitsOf(shm.mem.candidatePages(0, PAGES), PAGES))).toEqual([5, 20]);
      expect(shm.allocated()).toBe(2 * PAGE);
    } finally {
      shm.close();
    }
  });

  it('refuses a range outside the memory', () => {
    const mem = new native.GuestMemory(PAGES * PAGE);
    try {
      expect(() => mem.candidatePages(0, PAGES + 1)).toThrow(/GuestMemory.candidatePages: too many pages/);
    } finally {
      mem.release();
    }
  });
});

describe('applyFrames into a tmpfs file', () => {
  it('a zero page for a hole leaves it a hole; one for a page with data clears it', async () => {
    const src = new native.GuestMemory(PAGES * PAGE);
    const dst = shmMemory('apply');
    try {
      dst.mem.write(9 * PAGE, Buffer.alloc(PAGE, 0xee)); // data the zero page must clear
      src.write(2 * PAGE, Buffer.alloc(PAGE, 0x5a));
      const out = Buffer.alloc(1 << 16);
      const r = await src.packPages(bitmapOf([2, 9, 30]), 0, out, { seq: 0 });
      expect(r.zeroPages).toBe(2);
      await applyFrames(dst.mem, out.subarray(0, r.bytes));
      // Page 30 arrived as zero over a hole: not read, so not allocated. Page 9 was cleared in place.
      expect(pagesWith(bitsOf(dst.mem.candidatePages(0, PAGES), PAGES))).toEqual([2, 9]);
      expect(dst.allocated()).toBe(2 * PAGE);
      const page = (n: number) => {
        const b = Buffer.alloc(PAGE);
        dst.mem.read(n * PAGE, b);
        return b;
      };
      expect(page(2).equals(Buffer.alloc(PAGE, 0x5a))).toBe(true);
      expect(page(9).equals(Buffer.alloc(PAGE))).toBe(true);
    } finally {
      src.release();
      dst.close();
    }
  });
});
