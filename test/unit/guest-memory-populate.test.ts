/**
 * GuestMemory.populate through ffi/populate.ts (no KVM needed): it commits the range (its pages
 * present in the page map), a range the host cannot back (a mapped file truncated under it: the
 * kernel answers EFAULT instead of the SIGBUS a touch would raise) rejects with a PopulateError
 * naming the errno and the bytes committed before it, a cancel rejects ECANCELED, and bad ranges
 * are refused before any work.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { KvmError } from '../../src/errors';
import { native } from '../../src/ffi/native';
import { PopulateError, populateMemory } from '../../src/ffi/populate';
import { countBits } from '../../src/vm/snapshot-format';
import { rssAnonBytes } from '../support/proc-resources';

const MiB = 1024 * 1024;

describe('GuestMemory.populate', () => {
  it("commits the range: every page of it is present, and this process's anonymous RSS grows by it", async () => {
    const mem = new native.GuestMemory(128 * MiB);
    const pages = (128 * MiB) / 4096;
    // Present pages as /proc/self/pagemap shows them (candidatePages of anonymous memory): exact,
    // where the process's RSS also moves with the heap a collection returns meanwhile.
    const present = () => countBits(mem.candidatePages(0, pages), pages);
    try {
      const before = rssAnonBytes(process.pid);
      expect(present()).toBe(0);
      await populateMemory(mem, 0, 128 * MiB);
      expect(present()).toBe(pages);
      // Not to the byte: the JS heap may grow or shrink meanwhile.
      expect(rssAnonBytes(process.pid) - before).toBeGreaterThanOrEqual(96 * MiB);
    } finally {
      mem.release();
    }
  });

  it('a range the host cannot back rejects EFAULT with the bytes committed before the failing chunk', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-populate-'));
    const file = path.join(dir, 'mem');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 192 * MiB);
    const fd = fs.openSync(file, 'r+');
    const mem = new native.GuestMemory(192 * MiB, fd);
    try {
      fs.truncateSync(file, 100 * MiB); // pages past 100 MiB no longer exist
      const e = await populateMemory(mem, 0, 192 * MiB).catch((x: unknown) => x);
      expect(e).toBeInstanceOf(PopulateError);
      expect(e).toBeInstanceOf(KvmError);
      expect(e).toMatchObject({ code: 'EFAULT', ioctl: 'madvise(MADV_POPULATE_WRITE)', committedBytes: 64 * MiB });
    } finally {
      mem.release();
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('a cancel rejects ECANCELED before the next chunk; misaligned or outside ranges are refused', async () => {
    const mem = new native.GuestMemory(8 * MiB);
    try {
      const e = await populateMemory(mem, 0, 8 * MiB, Buffer.from([1])).catch((x: unknown) => x);
      expect(e).toMatchObject({ code: 'ECANCELED', committedBytes: 0 });
      expect(() => mem.populate(1, 4096)).toThrow(/page-aligned/);
      expect(() => mem.populate(0, 16 * MiB)).toThrow(/outside the 8388608-byte guest memory/);
    } finally {
      mem.release();
    }
  });
});
