/** Writing to and waiting on grpc-js streams without hanging when the peer is gone. */
import { VcpudError } from '../../errors';

export interface WritableLike<T> {
  write(m: T, callback?: (err?: Error | null) => void): boolean;
  once(ev: string, fn: (...a: unknown[]) => void): unknown;
  removeListener(ev: string, fn: (...a: unknown[]) => void): unknown;
  /** Node's Writable: true once destroyed (grpc-js destroys a server stream the client cancelled). */
  readonly destroyed?: boolean;
}

/**
 * Writes a message on a stream, waiting for 'drain' when grpc-js's buffer is full. A stream already
 * destroyed (the client cancelled) rejects at once: it will never emit 'drain', and its 'close' has
 * already been emitted, so waiting for either would hang the caller (and whatever it holds) forever.
 */
export function writeWithBackpressure<T>(stream: WritableLike<T>, msg: T): Promise<void> {
  const gone = () => new VcpudError('unavailable', 'the stream closed while a message was pending (the client went away)');
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
  const gone = () => new VcpudError('unavailable', 'the stream closed while a message was pending (the client went away)');
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
