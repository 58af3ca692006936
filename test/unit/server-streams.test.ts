/**
 * Stream writes that must not hang when the client is gone: grpc-js destroys a server stream the
 * client cancelled, after which 'drain' and 'close' never come again.
 */
import { EventEmitter } from 'node:events';
import { Writable } from 'node:stream';
import { cancelledWithin, writeWithBackpressure } from '../../src/server/services/streams';

/** An object-mode stream that takes one message at a time, each after `ms`. */
const slow = (ms = 5) => new Writable({ objectMode: true, highWaterMark: 1, write: (_m, _e, cb) => setTimeout(cb, ms) });

/** Settles `p` or says it hung. */
const within = <T>(p: Promise<T>, ms = 1000) =>
  Promise.race([p.then((v) => ({ settled: 'resolved', v }), (e: Error) => ({ settled: 'rejected', v: e.message })), new Promise((r) => setTimeout(() => r({ settled: 'hung' }), ms))]);

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
