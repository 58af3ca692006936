/** Writing to and waiting on grpc-js streams without hanging when the peer is gone. */
import { VcpudError } from '../../errors';

export interface WritableLike<T> {
  write(m: T, callback?: (err?: Error | null) => void): boolean;
  once(ev: string, fn: (...a: unknown[]) => void): unknown;
  removeListener(ev: string, fn: (...a: unknown[]) => void): unknown;
  /** Node's Writable: true once destroyed (grpc-js destroys a server stream the client cancelled). */
  readonly destroyed?: boolean;
}

const streamGone = () => new VcpudError('unavailable', 'the stream closed while a message was pending (the client went away)');

/**
 * Writes a message on a stream, waiting for 'drain' when grpc-js's buffer is full. A stream already
 * destroyed (the client cancelled) rejects at once: it will never emit 'drain', and its 'close' has
 * already been emitted, so waiting for either would hang the caller (and whatever it holds) forever.
 */
export function writeWithBackpressure<T>(stream: WritableLike<T>, msg: T): Promise<void> {
  const gone = streamGone;
  if (stream.destroyed) return Promise.reject(gone());
  if (stream.write(msg)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (err?: Error) => {
      stream.removeListener('drain', onDrain);
      stream.removeListener('close', onClose);
      stream.removeListener('error', onError);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = () => done();
    const onClose = () => done(gone());
    const onError = (e: unknown) => done(e as Error);
    stream.once('drain', onDrain);
    stream.once('close', onClose);
    stream.once('error', onError);
    if (stream.destroyed) done(gone()); // destroyed by the write itself
  });
}

/**
 * Writes a message and resolves once it has left (grpc-js serialized it and handed it to HTTP/2):
 * the caller may then reuse what the message referenced. Rejects when the stream is or becomes
 * destroyed first (Node calls the write's callback with an error then, but 'close' is waited for too).
 */
export function writeAndWait<T>(stream: WritableLike<T>, msg: T): Promise<void> {
  const gone = streamGone;
  if (stream.destroyed) return Promise.reject(gone());
  return new Promise((resolve, reject) => {
    let settled = false;
    const done = (err?: Error | null) => {
      if (settled) return;
      settled = true;
      stream.removeListener('close', onClose);
      if (err) reject(err instanceof VcpudError ? err : gone());
      else resolve();
    };
    const onClose = () => done(gone());
    stream.once('close', onClose);
    stream.write(msg, (err) => done(err));
  });
}

/** Resolves when `call` is cancelled or after `ms`, whichever comes first. */
export function cancelledWithin(call: { cancelled: boolean } & Pick<WritableLike<never>, 'once' | 'removeListener'>, ms: number): Promise<void> {
  if (call.cancelled) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      call.removeListener('cancelled', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    call.once('cancelled', done);
  });
}

/** What SendWindow needs of a grpc-js server stream. */
export interface WindowedStream<T> extends Pick<WritableLike<T>, 'once' | 'removeListener' | 'destroyed'> {
  write(m: T, cb: () => void): boolean;
  readonly cancelled: boolean;
}

/**
 * The bytes a server stream has handed to grpc-js that HTTP/2 has not taken yet, bounded.
 * grpc-js's own measure (writableLength, write()'s return value) counts messages, not bytes: 16
 * queued 1 MiB chunks pass as "16". A write's callback runs once HTTP/2 took its bytes, which only
 * happens as fast as the client's flow-control window lets them out, so a client that does not read
 * keeps them pending here, where they are counted.
 */
export class SendWindow<T> {
  private pending = 0;
  private wake?: () => void;

  constructor(
    private readonly stream: WindowedStream<T>,
    /** Bytes that may be pending; one message larger than this is still let through alone. */
    readonly capacity: number,
  ) {}

  get pendingBytes(): number {
    return this.pending;
  }

  /** True when a message of `bytes` can be written now without exceeding the capacity. */
  fits(bytes: number): boolean {
    return this.pending === 0 || this.pending + bytes <= this.capacity;
  }

  /**
   * Writes `msg`, counted as `bytes` until HTTP/2 has taken it (then `taken` runs). Check fits() or
   * await room() first.
   */
  write(msg: T, bytes: number, taken?: () => void): void {
    this.pending += bytes;
    this.stream.write(msg, () => {
      this.pending -= bytes;
      this.wake?.();
      taken?.();
    });
  }

  /** Resolves once a message of `bytes` fits; rejects when the stream closes first. */
  async room(bytes: number): Promise<void> {
    while (!this.fits(bytes)) {
      if (this.stream.destroyed || this.stream.cancelled) throw streamGone();
      const closed = await new Promise<boolean>((resolve) => {
        const done = (gone: boolean) => () => {
          this.wake = undefined;
          this.stream.removeListener('close', onGone);
          this.stream.removeListener('cancelled', onGone);
          resolve(gone);
        };
        const onGone = done(true);
        this.wake = done(false);
        this.stream.once('close', onGone);
        this.stream.once('cancelled', onGone);
      });
      if (closed) throw streamGone();
    }
  }
}

/**
 * The items of `source`, failing with `stalled()` when one takes longer than `ms` to arrive. Only the
 * wait for the client counts: time the consumer spends between items does not.
 */
export async function* stallGuarded<T>(source: AsyncIterable<T>, ms: number, stalled: () => Error): AsyncGenerator<T> {
  const it = source[Symbol.asyncIterator]();
  for (;;) {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(stalled()), ms);
    });
    let next: IteratorResult<T>;
    try {
      next = await Promise.race([it.next(), timeout]);
    } finally {
      clearTimeout(timer);
    }
    if (next.done) return;
    yield next.value;
  }
}

/**
 * Lets a grpc-js client stream buffer at most `messages` received messages its handler has not read
 * (Node's object-mode default is 16: 16 messages of up to the method's size limit per call). Node has
 * no public setter for a readable's high-water mark after construction; its state object has one.
 */
export function limitReadAhead(stream: object, messages: number): void {
  const state = (stream as { _readableState?: { highWaterMark?: number } })._readableState;
  if (typeof state?.highWaterMark !== 'number') throw new Error('limitReadAhead: not a Node readable stream');
  state.highWaterMark = messages;
}
