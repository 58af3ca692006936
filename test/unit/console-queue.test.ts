/**
 * StreamConsole's queues share a write budget per event-loop turn: a burst to many streams at once
 * is written over several turns (I/O in between), never dropped for it.
 */
import { EventEmitter } from 'node:events';
import { CONSOLE_WRITES_PER_TURN, ConsoleQueue } from '../../src/server/services/console-queue';
import type { StreamConsoleResponse } from '../../src/api/generated/vcpud/v1/StreamConsoleResponse';

/** A call whose client takes each message (runs its callback) only when `take` is called. */
class FakeCall extends EventEmitter {
  readonly written: StreamConsoleResponse[] = [];
  private readonly callbacks: (() => void)[] = [];
  destroyed = false;
  cancelled = false;
  write(m: StreamConsoleResponse, cb: () => void): boolean {
    this.written.push(m);
    this.callbacks.push(cb);
    return true;
  }
  takeAll(): void {
    for (const cb of this.callbacks.splice(0)) cb();
  }
}
const nextTurn = () => new Promise((r) => setImmediate(r));
const debug = (value: number): StreamConsoleResponse => ({ debug: { vcpuId: 0, value: String(value), done: false } });
const total = (calls: FakeCall[]) => calls.reduce((n, c) => n + c.written.length, 0);

describe('ConsoleQueue', () => {
  it('writes at most CONSOLE_WRITES_PER_TURN messages per turn over all streams, and then the rest', async () => {
    const calls = Array.from({ length: 64 }, () => new FakeCall());
    const queues = calls.map((c) => new ConsoleQueue(c as never));
    const perStream = 100; // 100 events (51 KiB counted) fit each stream's room: all would go at once
    for (let i = 0; i < perStream; i++) for (const q of queues) q.event(debug, i);
    expect(total(calls)).toBe(CONSOLE_WRITES_PER_TURN);
    for (let turn = 0; turn < 100 && total(calls) < 64 * perStream; turn++) {
      await nextTurn();
      expect(total(calls)).toBeLessThanOrEqual(CONSOLE_WRITES_PER_TURN * (turn + 2));
    }
    // Every stream got every event, in order, none reported dropped.
    for (const c of calls) expect(c.written.map((m) => m.debug?.value)).toEqual(Array.from({ length: perStream }, (_, i) => String(i)));
    expect(calls.some((c) => c.written.some((m) => m.droppedEvents))).toBe(false);
  });

  it('writes nothing more once its client left', async () => {
    const calls = Array.from({ length: 4 }, () => new FakeCall());
    const queues = calls.map((c) => new ConsoleQueue(c as never));
    for (let i = 0; i < CONSOLE_WRITES_PER_TURN; i++) for (const q of queues) q.event(debug, i);
    const before = calls[3].written.length;
    expect(before).toBeLessThan(CONSOLE_WRITES_PER_TURN); // the budget ran out before the last stream's events
    queues[3].close();
    for (let turn = 0; turn < 8; turn++) {
      for (const c of calls) c.takeAll();
      await nextTurn();
    }
    expect(calls[3].written.length).toBe(before);
    expect(calls[0].written.length).toBe(CONSOLE_WRITES_PER_TURN);
  });
});
