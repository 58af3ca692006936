/**
 * Stream writes that must not hang when the client is gone: grpc-js destroys a server stream the
 * client cancelled, after which 'drain' and 'close' never come again.
 */
import { EventEmitter } from 'node:events';
import { Writable } from 'node:stream';
import { cancelledWithin, SendWindow, stallGuarded, writeWithBackpressure } from '../../src/server/services/streams';

/** An object-mode stream that takes one message at a time, each after `ms`. */
const slow = (ms = 5) => new Writable({ objectMode: true, highWaterMark: 1, write: (_m, _e, cb) => setTimeout(cb, ms) });

/** Settles `p` or says it hung. */
const within = <T>(p: Promise<T>, ms = 1000) =>
  Promise.race([
    p.then(
      (v) => ({ settled: 'resolved', v }),
      (e: Error) => ({ settled: 'rejected', v: e.message }),
    ),
    new Promise((r) => setTimeout(() => r({ settled: 'hung' }), ms)),
  ]);

describe('writeWithBackpressure', () => {
  it('resolves at once while there is room, and after drain when full', async () => {
    const w = slow();
    expect(await within(writeWithBackpressure(w, 1))).toMatchObject({ settled: 'resolved' });
    expect(await within(writeWithBackpressure(w, 2))).toMatchObject({ settled: 'resolved' }); // waited for drain
  });

  it('rejects on a stream destroyed before the write (a cancelled call): no hang', async () => {
    const w = slow();
    w.on('error', () => {});
    w.destroy();
    await new Promise((r) => setImmediate(r)); // 'close' is gone by the time the handler writes
    expect(await within(writeWithBackpressure(w, 1))).toEqual({ settled: 'rejected', v: expect.stringMatching(/client went away/) });
  });

  it('rejects when the stream is destroyed while a write waits for drain', async () => {
    const w = slow(50);
    w.on('error', () => {});
    await writeWithBackpressure(w, 1);
    const pending = writeWithBackpressure(w, 2);
    w.destroy();
    expect(await within(pending)).toEqual({ settled: 'rejected', v: expect.stringMatching(/client went away/) });
  });
});

describe('cancelledWithin', () => {
  it('resolves on the cancel, or after the time', async () => {
    const call = Object.assign(new EventEmitter(), { cancelled: false });
    const t0 = Date.now();
    const p = cancelledWithin(call, 5000);
    setTimeout(() => call.emit('cancelled'), 20);
    await p;
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(call.listenerCount('cancelled')).toBe(0);
    const t1 = Date.now();
    await cancelledWithin(call, 50);
    expect(Date.now() - t1).toBeGreaterThanOrEqual(45);
    expect(call.listenerCount('cancelled')).toBe(0);
  });
});

describe('SendWindow', () => {
  /** A stream whose writes HTTP/2 "takes" only when the test says so. */
  function heldStream() {
    const callbacks: (() => void)[] = [];
    const s = Object.assign(new EventEmitter(), {
      cancelled: false,
      destroyed: false,
      write: (_m: unknown, cb: () => void) => (callbacks.push(cb), true),
    });
    return { s, take: () => callbacks.shift()?.() };
  }

  it('counts bytes until HTTP/2 takes them; room() waits for them, fits() says whether to drop', async () => {
    const { s, take } = heldStream();
    const w = new SendWindow(s, 100);
    expect(w.fits(500)).toBe(true); // an empty window lets one oversized message through
    w.write('a', 60);
    expect(w.fits(40)).toBe(true);
    expect(w.fits(41)).toBe(false);
    w.write('b', 40);
    const room = within(w.room(50));
    take();
    expect(await room).toMatchObject({ settled: 'resolved' });
    expect(w.pendingBytes).toBe(40);
  });

  it('room() rejects when the stream closes while it waits', async () => {
    const { s } = heldStream();
    const w = new SendWindow(s, 10);
    w.write('a', 10);
    const room = within(w.room(10));
    s.emit('close');
    expect(await room).toEqual({ settled: 'rejected', v: expect.stringMatching(/client went away/) });
  });
});

describe('stallGuarded', () => {
  it('passes items through and fails with the stall error when one takes too long', async () => {
    async function* source() {
      yield 1;
      await new Promise((r) => setTimeout(r, 200));
      yield 2;
    }
    const got: number[] = [];
    const run = (async () => {
      for await (const x of stallGuarded(source(), 50, () => new Error('stalled'))) got.push(x);
    })();
    expect(await within(run)).toEqual({ settled: 'rejected', v: 'stalled' });
    expect(got).toEqual([1]);
  });
});
