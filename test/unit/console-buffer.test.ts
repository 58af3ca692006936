/** A VM's console history: the newest bytes in order, at a cost that is its capacity whatever the chunk sizes. */
import v8 from 'node:v8';
import vm from 'node:vm';
import { ConsoleBuffer } from '../../src/vm/console';

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;
const bytes = (from: number, n: number) => Buffer.from(Array.from({ length: n }, (_, i) => (from + i) & 0xff));

describe('ConsoleBuffer', () => {
  it('keeps everything until it is full, then the newest `capacity` bytes in order', () => {
    const c = new ConsoleBuffer(10);
    expect(c.history()).toEqual(Buffer.alloc(0));
    c.append(bytes(0, 4));
    c.append(Buffer.alloc(0));
    expect(c.history()).toEqual(bytes(0, 4));
    c.append(bytes(4, 5));
    expect(c.history()).toEqual(bytes(0, 9));
    c.append(bytes(9, 3)); // wraps
    expect(c.history()).toEqual(bytes(2, 10));
    c.append(bytes(12, 25)); // larger than the ring: only its tail stays
    expect(c.history()).toEqual(bytes(27, 10));
    c.append(bytes(37, 10)); // exactly one ring
    expect(c.history()).toEqual(bytes(37, 10));
    expect(c.bytesWritten).toBe(47);
  });

  it('hands out a copy: later output does not change a history already taken', () => {
    const c = new ConsoleBuffer(4);
    c.append(bytes(0, 4));
    const h = c.history();
    c.append(bytes(4, 4));
    expect(h).toEqual(bytes(0, 4));
  });

  it('costs its capacity, not a heap object per chunk: 60,000 chunks of 4 bytes', () => {
    const capacity = 256 * 1024;
    gc();
    const before = process.memoryUsage();
    const c = new ConsoleBuffer(capacity);
    for (let i = 0; i < 60_000; i++) c.append(bytes(i, 4));
    gc();
    const after = process.memoryUsage();
    const grown = after.heapUsed - before.heapUsed + (after.arrayBuffers - before.arrayBuffers);
    expect(c.history().length).toBe(240_000);
    // A list of chunks held 60,000 Buffers here (~6 MiB of heap); the ring is one 256 KiB buffer.
    expect(grown).toBeLessThan(2 * capacity);
  });
});
