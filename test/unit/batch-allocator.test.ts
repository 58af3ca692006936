/** batchAllocator: the zero-filled buffers of one batch's reads, carved from shared allocations. */
import { batchAllocator } from '../../src/ffi/vcpu';

describe('batchAllocator', () => {
  it('gives zero-filled, 8-byte aligned, disjoint buffers of the sizes asked', () => {
    const alloc = batchAllocator();
    const sizes = [4, 144, 312, 1024, 4096, 10248, 8 + 16 * 41];
    const bufs = sizes.map((n) => alloc(n));
    expect(bufs.map((b) => b.length)).toEqual(sizes);
    for (const b of bufs) {
      expect(b.every((x) => x === 0)).toBe(true);
      expect(b.byteOffset % 8).toBe(0);
    }
    for (const [i, b] of bufs.entries()) b.fill(i + 1); // writing one leaves every other as it was
    expect(bufs.map((b, i) => b.every((x) => x === i + 1))).toEqual(sizes.map(() => true));
    expect(new Set(bufs.map((b) => b.buffer)).size).toBe(1);
  });

  it('starts a new allocation when one is full, and gives a request larger than that its own', () => {
    const alloc = batchAllocator();
    const a = alloc(15_000);
    const b = alloc(15_000);
    const big = alloc(100_000);
    expect(a.buffer).not.toBe(b.buffer);
    expect(big.length).toBe(100_000);
    expect(big.every((x) => x === 0)).toBe(true);
    expect(big.buffer).not.toBe(b.buffer);
    expect(alloc(8).buffer).toBe(b.buffer); // the current chunk still has room
  });
});
