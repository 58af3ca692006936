/**
 * native crc32cFileRanges: the CRC-32C of each (offset, length) range of a file, computed on the
 * pool through a read-only mapping (how a chain restore checks its layers' memory data). No KVM needed.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native } from '../../src/ffi/native';

describe('crc32cFileRanges', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-file-crc-'));
  const file = path.join(dir, 'data');
  const data = crypto.randomBytes(5 * 4096 + 123);
  fs.writeFileSync(file, data);
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('gives the CRC of each range, unaligned ones included, and the caller may close its descriptor at once', async () => {
    const ranges = [
      [0, 4096],
      [4096 * 2, 4096 * 2],
      [100, 1],
      [4096 * 5, 123],
      [7, 0],
    ];
    const fd = fs.openSync(file, 'r');
    const pending = native.crc32cFileRanges(fd, new Float64Array(ranges.flat()));
    fs.closeSync(fd); // the task holds its own duplicate
    const crcs = await pending;
    const want = ranges.map(([off, len]) => native.crc32c(data.subarray(off, off + len)));
    expect(Array.from(crcs)).toEqual(want);
    for (const threads of [2, 3, 8]) {
      const fd2 = fs.openSync(file, 'r');
      const shared = native.crc32cFileRanges(fd2, new Float64Array(ranges.flat()), threads); // the ranges split across threads
      fs.closeSync(fd2);
      expect(Array.from(await shared)).toEqual(want);
    }
    expect(Array.from(await native.crc32cFileRanges(fs.openSync(file, 'r'), new Float64Array()))).toEqual([]);
  });

  it('rejects a range past the end of the file with MEMORY_FAULT at its first missing page, not SIGBUS', async () => {
    const fd = fs.openSync(file, 'r');
    try {
      for (const threads of [1, 2]) {
        const ranges = new Float64Array([0, 4096, 4096 * 4, 4096 * 4, 4096 * 8, 4096]);
        const err = await native.crc32cFileRanges(fd, ranges, threads).catch((e) => e);
        expect({ code: err.code, offset: err.offset }).toEqual({ code: 'MEMORY_FAULT', offset: 4096 * 6 });
      }
    } finally {
      fs.closeSync(fd);
    }
  });

  it('refuses ranges that are not (offset, length) pairs of non-negative integers', () => {
    const fd = fs.openSync(file, 'r');
    try {
      expect(() => native.crc32cFileRanges(fd, new Float64Array([0]))).toThrow(/pairs/);
      expect(() => native.crc32cFileRanges(fd, new Float64Array([-1, 4]))).toThrow(/non-negative integer/);
      expect(() => native.crc32cFileRanges(fd, [0, 4] as unknown as Float64Array)).toThrow(/Float64Array/);
      expect(() => native.crc32cFileRanges(fd, new Float64Array([0, 4]), 0)).toThrow(/threads must be 1 to 8/);
      expect(() => native.crc32cFileRanges(fd, new Float64Array([0, 4]), 9)).toThrow(/threads must be 1 to 8/);
    } finally {
      fs.closeSync(fd);
    }
  });
});
