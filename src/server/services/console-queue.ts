/**
 * What one StreamConsole stream holds for its client, bounded in bytes. The guest never waits for a
 * client: events queue here in order (consecutive output coalesced into one message) while HTTP/2
 * has CONSOLE_IN_FLIGHT bytes of this stream not yet taken; what does not fit CONSOLE_QUEUE_BYTES is
 * dropped and counted, and the first message after the gap says how much (dropped_output_bytes,
 * dropped_events).
 */
import type { StreamConsoleResponse } from '../../api/generated/vcpud/v1/StreamConsoleResponse';
import { SendWindow, type WindowedStream } from './streams';

/**
 * Bytes of events a stream holds for its client: queued here plus handed to HTTP/2. As large as
 * ReadMemory's send window, which the memory bound (src/server/memory-bound.ts) already counts per
 * stream. Events arrive in bursts (one drain of the run thread delivers everything since the last:
 * over a thousand debug values at once under the nested lab's emulated CPU), and a reading client
 * must get them all.
 */
export const CONSOLE_QUEUE_BYTES = 1024 * 1024;
/** Bytes handed to HTTP/2 and not taken yet; the rest waits here, where output coalesces. */
const CONSOLE_IN_FLIGHT = 64 * 1024;
/**
 * What a state change or debug value counts as: its queued object, and its message on the way out
 * (grpc-js and Node's HTTP/2 keep a framed copy, a write request and callbacks: ~0.4 KiB measured).
 */
const EVENT_COST = 512;
/** A state change or debug value while it waits here: its message object only (~0.2 KiB). */
const QUEUED_EVENT_COST = 256;

/**
 * Console messages written per event-loop turn, over all streams; the rest waits for the next turn,
 * after I/O. Without it one drain filled the room of every stream at once (64 unread streams x 128
 * events: thousands of grpc-js writes in one turn) and a bystander's call waited behind them.
 */
export const CONSOLE_WRITES_PER_TURN = 256;

/** Shares CONSOLE_WRITES_PER_TURN among the console streams. */
class WriteTurns {
  private left = CONSOLE_WRITES_PER_TURN;
  private nextTurnScheduled = false;
  private readonly waiting = new Set<() => void>();

  /** True when one more message may be written in this turn. */
  take(): boolean {
    if (!this.nextTurnScheduled) {
      this.nextTurnScheduled = true;
      setImmediate(() => this.nextTurn());
    }
    if (!this.left) return false;
    this.left--;
    return true;
  }

  /** Runs `resume` (once, however often asked) when the next turn's writes are allotted. */
  later(resume: () => void): void {
    this.waiting.add(resume);
  }

  private nextTurn(): void {
    this.nextTurnScheduled = false;
    this.left = CONSOLE_WRITES_PER_TURN;
    const resumes = [...this.waiting];
    this.waiting.clear();
    for (const resume of resumes) resume();
  }
}
const turns = new WriteTurns();

interface Queued {
  msg: StreamConsoleResponse;
  /** Output not yet joined into msg.output. */
  parts?: Buffer[];
  cost: number;
}

export class ConsoleQueue {
  private readonly queue: Queued[] = [];
  private queuedBytes = 0;
  private droppedOutput = 0;
  private droppedEvents = 0;
  private readonly window: SendWindow<StreamConsoleResponse>;
  private closed = false;
  private readonly resume = () => this.flush();

  constructor(stream: WindowedStream<StreamConsoleResponse>) {
    this.window = new SendWindow(stream, CONSOLE_IN_FLIGHT);
  }

  output(chunk: Buffer): void {
    if (!chunk.length) return;
    if (!this.admit(chunk.length + EVENT_COST)) {
      this.droppedOutput += chunk.length;
      return;
    }
    const last = this.queue[this.queue.length - 1];
    // Coalesce, unless a gap lies between the two (its report goes with the output after it).
    if (last?.parts && !this.droppedOutput && !this.droppedEvents) {
      last.parts.push(chunk);
      last.cost += chunk.length;
      this.queuedBytes += chunk.length;
    } else {
      this.enqueue({ msg: {}, parts: [chunk], cost: chunk.length + EVENT_COST });
    }
    this.flush();
  }

  /**
   * `build(e)` makes the message only when it is kept: a full queue drops events without allocating
   * (a busy guest emits thousands a second, each to every stream).
   */
  event<E>(build: (e: E) => StreamConsoleResponse, e: E): void {
    if (!this.admit(QUEUED_EVENT_COST)) {
      this.droppedEvents++;
      return;
    }
    this.enqueue({ msg: build(e), cost: QUEUED_EVENT_COST });
    this.flush();
  }

  /** Hands everything still queued to grpc-js (the stream ends next: the client gets it all). */
  flushAll(): void {
    while (this.queue.length) this.send(this.queue.shift() as Queued);
    this.closed = true;
  }

  /** The client left: nothing more is written (a turn already asked for finds nothing to do). */
  close(): void {
    this.queue.length = 0;
    this.closed = true;
  }

  private admit(cost: number): boolean {
    return this.queuedBytes + this.window.pendingBytes + cost <= CONSOLE_QUEUE_BYTES;
  }

  private enqueue(q: Queued): void {
    if (this.droppedOutput) q.msg.droppedOutputBytes = String(this.droppedOutput);
    if (this.droppedEvents) q.msg.droppedEvents = String(this.droppedEvents);
    this.droppedOutput = this.droppedEvents = 0;
    this.queue.push(q);
    this.queuedBytes += q.cost;
  }

  private flush(): void {
    while (!this.closed && this.queue.length && this.window.fits(sentCost(this.queue[0]))) {
      if (!turns.take()) return turns.later(this.resume);
      this.send(this.queue.shift() as Queued);
    }
  }

  private send(q: Queued): void {
    this.queuedBytes -= q.cost;
    if (q.parts) q.msg.output = q.parts.length === 1 ? q.parts[0] : Buffer.concat(q.parts);
    this.window.write(q.msg, sentCost(q), () => this.flush());
  }
}

/** What a message counts once handed to HTTP/2: output as queued, an event its framed cost. */
function sentCost(q: Queued): number {
  return q.parts ? q.cost : EVENT_COST;
}
