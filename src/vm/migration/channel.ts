/**
 * One migration data connection (net.Socket or tls.TLSSocket) as a channel of envelopes
 * (protocol.ts), where every wait is bounded: a write waiting for the peer to drain, and a read
 * waiting for the peer's next envelope, each race the stall timeout, the caller's abort signal and
 * the connection's end. A stalled peer (SIGSTOP, a partition) therefore fails the migration within
 * the stall timeout instead of holding it forever.
 */
import type net from 'node:net';
import { VcpudError } from '../../errors';
import {
  decodeEnvelopeHeader,
  decodeJson,
  ENVELOPE_HEADER_SIZE,
  EnvelopeType,
  envelopeHeader,
  jsonEnvelope,
  type EnvelopeHead,
  type WireError,
} from './protocol';

/** Received bytes buffered before the socket is paused (bounds the receiver's memory). */
const MAX_BUFFERED = 64 * 1024 * 1024;

export interface Envelope {
  head: EnvelopeHead;
  payload: Buffer;
}

export class Channel {
  private chunks: Buffer[] = [];
  private buffered = 0;
  /** A read waiting for `need` buffered bytes; `progress` re-arms its stall timer when data comes. */
  private waiter?: { need: number; resolve: () => void; progress: () => void };
  private closedWith?: Error;
  private readonly closeListeners = new Set<(e: Error) => void>();
  /** Bytes sent and received so far. */
  bytesOut = 0;
  bytesIn = 0;
  /** Byte 0 set to 1 on abort or close: cancels a native stream call on this connection. */
  readonly cancelFlag = Buffer.alloc(1);

  constructor(
    readonly socket: net.Socket,
    private readonly stallMs: number,
    /** Names the peer in errors ("the destination", "the source"). */
    private readonly peer: string,
    private readonly signal?: AbortSignal,
  ) {
    socket.setNoDelay?.(true);
    signal?.addEventListener('abort', () => (this.cancelFlag[0] = 1), { once: true });
    socket.on('data', (c: Buffer) => {
      this.chunks.push(c);
      this.buffered += c.length;
      this.bytesIn += c.length;
      if (this.buffered > MAX_BUFFERED) socket.pause();
      if (this.waiter && this.buffered < this.waiter.need) this.waiter.progress();
      else this.wake();
    });
    const closed = (e?: Error) => {
      // The peer's own account of why it closed (an ERROR envelope not read yet) beats the bare close.
      this.closedWith ??= this.unreadPeerError() ?? new VcpudError('unavailable', `the connection to ${peer} ${e ? `failed: ${e.message}` : 'was closed'}`);
      for (const l of this.closeListeners) l(this.closedWith);
      this.wake();
    };
    socket.on('error', closed);
    socket.on('close', () => closed());
    socket.on('end', () => closed());
  }

  /** An ERROR envelope among the bytes received but not read yet, as the error it carries. */
  private unreadPeerError(): VcpudError | undefined {
    const buf = Buffer.concat(this.chunks);
    for (let off = 0; off + ENVELOPE_HEADER_SIZE <= buf.length; ) {
      let head: EnvelopeHead;
      try {
        head = decodeEnvelopeHeader(buf.subarray(off, off + ENVELOPE_HEADER_SIZE));
      } catch {
        return undefined;
      }
      const payload = buf.subarray(off + ENVELOPE_HEADER_SIZE, off + ENVELOPE_HEADER_SIZE + head.length);
      if (payload.length < head.length) return undefined;
      if (head.type === EnvelopeType.Error) return peerError(this.peer, head, payload);
      off += ENVELOPE_HEADER_SIZE + head.length;
    }
    return undefined;
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.resolve();
  }

  /**
   * Waits for what `arm` sets up (a write's drain, or enough data), bounded by the stall timeout
   * (which `arm`'s `progress` re-arms), abort and close.
   */
  private bounded<T>(what: string, arm: (resolve: (v: T) => void, progress: () => void) => () => void): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let disarm = () => {};
      const done = (fn: () => void) => {
        clearTimeout(timer);
        this.closeListeners.delete(onClose);
        this.signal?.removeEventListener('abort', onAbort);
        disarm();
        fn();
      };
      const timer = setTimeout(
        () =>
          done(() =>
            reject(new VcpudError('unavailable', `${this.peer} made no progress for ${this.stallMs} ms while ${what} (stalled; --migration-stall-timeout)`)),
          ),
        this.stallMs,
      );
      const onClose = (e: Error) => done(() => reject(e));
      const onAbort = () => done(() => reject(abortError(this.signal as AbortSignal)));
      if (this.signal?.aborted) return onAbort();
      this.signal?.addEventListener('abort', onAbort, { once: true });
      this.closeListeners.add(onClose);
      disarm = arm(
        (v) => done(() => resolve(v)),
        () => timer.refresh(),
      );
    });
  }

  /** Sends bytes; resolves once the socket takes more (the peer drains), within the stall timeout. */
  async send(...bufs: Buffer[]): Promise<void> {
    if (this.closedWith) throw this.closedWith;
    if (this.signal?.aborted) throw abortError(this.signal);
    let ok = true;
    for (const b of bufs) {
      ok = this.socket.write(b);
      this.bytesOut += b.length;
    }
    if (ok) return;
    await this.bounded<void>(`sending to ${this.peer}`, (resolve) => {
      const onDrain = () => resolve();
      this.socket.once('drain', onDrain);
      return () => this.socket.off('drain', onDrain);
    });
  }

  sendEnvelope(type: EnvelopeType, payload: Buffer, checksum = true): Promise<void> {
    return this.send(envelopeHeader(type, payload, checksum), payload);
  }

  /**
   * Sends an envelope whose payload buffer the caller reuses: resolves once the socket has handed
   * the payload to the kernel (the buffer is free again), within the stall timeout. Writes queue in
   * order, so several may be outstanding; the caller bounds how many by its buffers.
   */
  sendReusable(type: EnvelopeType, payload: Buffer, checksum = true): Promise<void> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    if (this.signal?.aborted) return Promise.reject(abortError(this.signal));
    let onWritten = () => {};
    const written = this.bounded<void>(`sending to ${this.peer}`, (resolve) => {
      onWritten = () => resolve();
      return () => {};
    });
    this.socket.write(envelopeHeader(type, payload, checksum));
    this.socket.write(payload, () => onWritten()); // an error here also closes: the close rejects first
    this.bytesOut += ENVELOPE_HEADER_SIZE + payload.length;
    return written;
  }

  sendJson(type: EnvelopeType, body: object): Promise<void> {
    return this.send(jsonEnvelope(type, body));
  }

  /** `into`: where to gather bytes that span socket chunks (a reused buffer of at least n bytes). */
  private async readExact(n: number, what: string, into?: Buffer): Promise<Buffer> {
    if (this.buffered < n) {
      if (this.closedWith) throw this.closedWith;
      if (this.socket.isPaused()) this.socket.resume();
      // One wait for the whole read, its stall timer re-armed by every chunk that arrives.
      await this.bounded<void>(what, (resolve, progress) => {
        const waiter = { need: n, resolve: () => resolve(), progress };
        this.waiter = waiter;
        return () => {
          if (this.waiter === waiter) this.waiter = undefined;
        };
      });
      if (this.buffered < n) throw this.closedWith ?? new VcpudError('internal', 'a read ended without its bytes');
    }
    let out: Buffer;
    if (this.chunks[0].length >= n) {
      out = this.chunks[0].subarray(0, n);
      this.chunks[0] = this.chunks[0].subarray(n);
      if (!this.chunks[0].length) this.chunks.shift();
    } else {
      out = into && into.length >= n ? into.subarray(0, n) : Buffer.allocUnsafe(n);
      let off = 0;
      while (off < n) {
        const c = this.chunks[0];
        const take = Math.min(c.length, n - off);
        c.copy(out, off, 0, take);
        off += take;
        if (take === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(take);
      }
    }
    this.buffered -= n;
    if (this.buffered <= MAX_BUFFERED / 2 && this.socket.isPaused()) this.socket.resume();
    return out;
  }

  /**
   * The next envelope from the peer, within the stall timeout. An ERROR envelope is thrown as the
   * peer's error. `into` lends a buffer for a payload that spans socket chunks (the payload is then
   * a view of it); without it such a payload is copied into a new buffer.
   */
  async next(what: string, into?: (head: EnvelopeHead) => Buffer | undefined): Promise<Envelope> {
    const head = decodeEnvelopeHeader(await this.readExact(ENVELOPE_HEADER_SIZE, what));
    const payload = head.length ? await this.readExact(head.length, what, into?.(head)) : Buffer.alloc(0);
    if (head.type === EnvelopeType.Error) throw peerError(this.peer, head, payload);
    return { head, payload };
  }

  /** The next envelope, which must be of `type`, decoded as JSON. */
  async expectJson<T>(type: EnvelopeType, what: string): Promise<T> {
    const { head, payload } = await this.next(what);
    if (head.type !== type) throw new VcpudError('internal', `${this.peer} sent ${EnvelopeType[head.type]} where ${EnvelopeType[type]} was due`);
    return decodeJson<T>(head, payload);
  }

  /**
   * The socket's fd when the connection is a plain unix socket: page frames can then go straight
   * between guest memory and the socket on a pool thread (GuestMemory.sendFrames/receiveFrames).
   * None for TLS (Node encrypts).
   */
  get rawFd(): number | undefined {
    if ((this.socket as net.Socket & { encrypted?: boolean }).encrypted) return undefined;
    const fd = (this.socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    return typeof fd === 'number' && fd >= 0 ? fd : undefined;
  }

  /**
   * Runs a native stream write on the socket (`fd`): the caller has waited for every earlier write
   * to reach the kernel (sendReusable). Its socket errors become the channel's errors.
   */
  async sendStream<T extends { bytes: number }>(what: string, write: (fd: number, cancel: Buffer) => Promise<T>): Promise<T> {
    if (this.closedWith) throw this.closedWith;
    const r = await write(this.rawFd as number, this.cancelFlag).catch((e) => this.streamError(e, what));
    this.bytesOut += r.bytes;
    return r;
  }

  /**
   * Runs a native stream read on the socket: the socket's own reads stop, the bytes received but
   * not read yet go to `read` as its prefix, and the ones it leaves (past the stream's end) are
   * read next, as the socket's reads resume.
   */
  async receiveStream<T extends { bytes: number; prefixUsed: number }>(
    what: string,
    read: (fd: number, prefix: Buffer, cancel: Buffer) => Promise<T>,
  ): Promise<T> {
    if (this.closedWith) throw this.closedWith;
    const handle = (this.socket as unknown as { _handle: { readStop(): number; readStart(): number } })._handle;
    // `reading` stays true for Node, so nothing restarts the reads meanwhile (net.Socket._read).
    handle.readStop();
    while (this.socket.readableLength > 0) this.socket.read(); // emitted as 'data' into chunks
    const prefix = Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    let r: T;
    try {
      r = await read(this.rawFd as number, prefix, this.cancelFlag);
    } catch (e) {
      return this.streamError(e, what);
    }
    this.bytesIn += r.bytes;
    const rest = prefix.subarray(r.prefixUsed);
    if (rest.length) {
      this.chunks.push(rest);
      this.buffered = rest.length;
    }
    handle.readStart();
    return r;
  }

  /** A native stream call's failure as the channel would report it. */
  private async streamError(e: unknown, what: string): Promise<never> {
    const code = (e as { code?: string }).code;
    if (e instanceof VcpudError) throw e; // a corrupt frame
    if (code === 'ETIMEDOUT')
      throw new VcpudError('unavailable', `${this.peer} made no progress for ${this.stallMs} ms while ${what} (stalled; --migration-stall-timeout)`);
    if (code === 'ECANCELED' && this.signal?.aborted) throw abortError(this.signal);
    // The peer's own account (its ERROR envelope, then its close) may still be on the way.
    if (!this.closedWith)
      await new Promise<void>((resolve) => {
        const done = () => {
          clearTimeout(t);
          this.closeListeners.delete(done);
          resolve();
        };
        const t = setTimeout(done, 1000);
        this.closeListeners.add(done);
      });
    throw this.closedWith ?? new VcpudError('unavailable', `the connection to ${this.peer} failed: ${(e as Error).message}`);
  }

  /** Sends an ERROR envelope (best effort) and closes. */
  fail(e: VcpudError | Error): void {
    if (!this.closedWith) {
      const err = e as VcpudError;
      this.socket.write(jsonEnvelope(EnvelopeType.Error, { message: err.message, kind: err.kind ?? 'internal', reason: err.details?.reason }));
    }
    this.close();
  }

  close(): void {
    this.cancelFlag[0] = 1;
    this.socket.end();
    // A peer that stopped reading keeps a graceful end pending forever: drop the connection soon after.
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  destroy(): void {
    this.cancelFlag[0] = 1;
    this.socket.destroy();
  }
}

function peerError(peer: string, head: EnvelopeHead, payload: Buffer): VcpudError {
  const e = decodeJson<WireError>(head, payload);
  return new VcpudError((e.kind as never) || 'internal', `${peer} reported: ${e.message}`, e.reason ? { reason: e.reason } : {});
}

function abortError(signal: AbortSignal): Error {
  const r = signal.reason;
  return r instanceof Error ? r : new VcpudError('unavailable', String(r ?? 'the migration was cancelled'));
}
