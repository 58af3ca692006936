/** src/vm/mutex: one holder at a time, in arrival order, released however `fn` ends; a free lock runs `fn` at once. */
import { Mutex } from '../../src/vm/mutex';

const tick = () => new Promise<void>((r) => setImmediate(r));

describe('Mutex', () => {
  it('runs fn at once when free, in the turn of its caller', async () => {
    const m = new Mutex();
    let ran = false;
    const p = m.run(() => {
      ran = true;
      return 7;
    });
    expect(ran).toBe(true);
    await expect(p).resolves.toBe(7);
  });

  it('serializes holders in arrival order; a caller arriving at release does not overtake a waiter', async () => {
    const m = new Mutex();
    const order: string[] = [];
    let releaseFirst!: () => void;
    const first = m.run(async () => {
      order.push('a start');
      await new Promise<void>((r) => (releaseFirst = r));
      order.push('a end');
    });
    const second = m.run(() => order.push('b'));
    const third = m.run(async () => {
      order.push('c start');
      await tick();
      order.push('c end');
    });
    await tick();
    expect(order).toEqual(['a start']);
    releaseFirst();
    // Arrives after a released the lock but before b's turn came: it must wait for b and c.
    await Promise.resolve();
    const late = m.run(() => order.push('d'));
    await Promise.all([first, second, third, late]);
    expect(order).toEqual(['a start', 'a end', 'b', 'c start', 'c end', 'd']);
  });

  it('releases the lock when fn throws or rejects, and passes the error on', async () => {
    const m = new Mutex();
    await expect(
      m.run(() => {
        throw new Error('sync');
      }),
    ).rejects.toThrow('sync');
    await expect(m.run(() => Promise.reject(new Error('async')))).rejects.toThrow('async');
    await expect(m.run(() => 'free again')).resolves.toBe('free again');
  });

  it('runNow runs a synchronous fn at once and lets go of the lock however it ends; it refuses a held lock', async () => {
    const m = new Mutex();
    expect(m.free).toBe(true);
    expect(m.runNow(() => (m.free ? 'wrongly free' : 'held while running'))).toBe('held while running');
    expect(m.free).toBe(true);
    expect(() =>
      m.runNow(() => {
        throw new Error('sync');
      }),
    ).toThrow('sync');
    expect(m.free).toBe(true);
    let release!: () => void;
    const held = m.run(() => new Promise<void>((r) => (release = r)));
    expect(m.free).toBe(false);
    expect(() => m.runNow(() => 1)).toThrow('held');
    release();
    await held;
    expect(m.free).toBe(true);
  });
});
