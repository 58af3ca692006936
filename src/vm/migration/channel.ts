/**
 * One migration data connection (net.Socket or tls.TLSSocket) as a channel of envelopes
 * (protocol.ts), where every wait is bounded: a write waiting for the peer to drain, and a read
 * waiting for the peer's next envelope, each race the stall timeout, the caller's abort signal and
 * the connection's end. A stalled peer (SIGSTOP, a partition) therefore fails the migration within
 * the stall timeout instead of holding it forever.
 */
import type net from 'node:net';
import { classifyErrno, isConnectionErrno, VcpudError } from '../../errors';
import { Inbox } from './inbox';
import {
  decodeEnvelopeHeader,
  decodeJson,
  ENVELOPE_HEADER_SIZE,
  EnvelopeType,
  envelopeHeader,
  writeEnvelopeHeader,
  jsonEnvelope,
  type EnvelopeHead,
  type WireError,
} from './protocol';
import { readIntoBuffers } from './socket-reads';

/** The inbox's first size, and the least free space a read into it is given. */
const INBOX_BYTES = 256 * 1024;
/**
 * Received bytes buffered (not read yet) before reads stop until a read needs more: the rest waits
 * in the kernel, uncopied, for a read that takes it in place (while the destination waits for an
 * apply slot, everything read went through the inbox, one copy more per byte).
 */
const MAX_BUFFERED = INBOX_BYTES;
const MIN_READ_SPACE = 64 * 1024;

export interface Envelope {
  head: EnvelopeHead;
  payload: Buffer;
}

/** A read gathering into the caller's buffer: bytes go straight there as they arrive. */
interface Target {
  buf: Buffer;
  filled: number;
}

export class Channel {
  /** Bytes received while no read was waiting for them. */
  private readonly inbox = new Inbox(INBOX_BYTES);
  private target?: Target;
  /** Reads land in buffers handed out (socket-reads.ts), not in 'data' chunks; `handedOut` says whose. */
  private readonly inPlace: boolean;
  private handedOut?: Target;
  /** The gathering read's wait; `progress` re-arms its stall timer when data comes. */
  private waiter?: { resolve: () => void; progress: () => void };
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
    // TLS: Node decrypts into the buffers handed out (the waiting read's own, or the inbox). A
    // plain socket keeps 'data' chunks: receiveStream hands its fd to a pool thread.
    const tls = (socket as net.Socket & { encrypted?: boolean }).encrypted === true;
    // Bytes Node decrypted before the hook (with the handshake) wait in the socket's own buffer.
    if (tls) for (let c: Buffer | null; (c = socket.read() as Buffer | null); ) this.onData(c);
    this.inPlace = tls && readIntoBuffers(socket, { next: () => this.readBuffer(), received: (n) => this.readInPlace(n) });
    if (!this.inPlace) socket.on('data', (c: Buffer) => this.onData(c));
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

  /** Where the socket's next read lands: the waiting read's free part when it gathers, otherwise the inbox's free space. */
  private readBuffer(): Buffer {
    const t = this.target;
    this.handedOut = t;
    return t ? t.buf.subarray(t.filled) : this.inbox.space(MIN_READ_SPACE);
  }

  /** `n` bytes landed in what readBuffer() handed out. */
  private readInPlace(n: number): boolean {
    try {
      return this.landed(n);
    } catch (e) {
      // Called from Node's read callback: a bug here must fail this connection, not the process.
      this.socket.destroy(e as Error);
      return false;
    }
  }

  private landed(n: number): boolean {
    this.bytesIn += n;
    const t = this.handedOut;
    if (!t) {
      this.inbox.commit(n);
      // A read that started gathering since this buffer was handed out takes its bytes from the inbox.
      const g = this.target;
      if (g) {
        const k = Math.min(this.inbox.length, g.buf.length - g.filled);
        this.inbox.take(g.buf.subarray(g.filled), k);
        g.filled += k;
      }
    } else if (t === this.target) t.filled += n;
    else {
      // The read gave up meanwhile (its channel is failing): these bytes belong to nobody.
      this.socket.destroy();
      return false;
    }
    this.arrived();
    return true;
  }

  /** A 'data' chunk (a socket this channel does not read in place). */
  private onData(c: Buffer): void {
    this.bytesIn += c.length;
    const t = this.target;
    let used = 0;
    if (t) {
      used = Math.min(c.length, t.buf.length - t.filled);
      c.copy(t.buf, t.filled, 0, used);
      t.filled += used;
    }
    if (used < c.length) this.inbox.append(used ? c.subarray(used) : c);
    this.arrived();
  }

  /** Wakes the waiting read once it has its bytes (a read waits only while it gathers); pauses the socket while the inbox is full. */
  private arrived(): void {
    const t = this.target;
    if (t) {
      if (t.filled < t.buf.length) this.waiter?.progress();
      else {
        this.target = undefined; // complete: what comes next is the inbox's
        this.wake();
      }
    }
    // Paused, a socket read in place stops its reads too (net.Socket.pause).
    if (this.inbox.length > MAX_BUFFERED && !this.socket.isPaused()) this.socket.pause();
  }

  private resumeReads(): void {
    if (this.socket.isPaused()) this.socket.resume();
  }

  /** An ERROR envelope among the bytes received but not read yet, as the error it carries. */
  private unreadPeerError(): VcpudError | undefined {
    const buf = this.inbox.peek();
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
   * Sends an envelope in a buffer the caller reuses: `envelope` is ENVELOPE_HEADER_SIZE bytes of
   * room for the header (written here) and the payload, so the socket gets one write (two made TLS
   * copy both into one buffer, and sent a 16-byte record per envelope). Resolves once the socket
   * has handed it to the kernel (the buffer is free again), within the stall timeout. Writes queue
   * in order, so several may be outstanding; the caller bounds how many by its buffers.
   */
  sendReusable(type: EnvelopeType, envelope: Buffer, checksum = true): Promise<void> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    if (this.signal?.aborted) return Promise.reject(abortError(this.signal));
    let onWritten = () => {};
    const written = this.bounded<void>(`sending to ${this.peer}`, (resolve) => {
      onWritten = () => resolve();
      return () => {};
    });
    writeEnvelopeHeader(envelope, type, envelope.subarray(ENVELOPE_HEADER_SIZE), checksum);
    this.socket.write(envelope, () => onWritten()); // an error here also closes: the close rejects first
    this.bytesOut += envelope.length;
    return written;
  }

  sendJson(type: EnvelopeType, body: object): Promise<void> {
    return this.send(jsonEnvelope(type, body));
  }

  /**
   * The next `n` bytes, in `into` when it is given and large enough (a reused buffer), otherwise in
   * a new buffer: first what the inbox holds, then the rest straight from the socket as it arrives.
   */
  private async readExact(n: number, what: string, into?: Buffer): Promise<Buffer> {
    const out = into && into.length >= n ? into.subarray(0, n) : Buffer.allocUnsafe(n);
    const ready = Math.min(n, this.inbox.length);
    this.inbox.take(out, ready);
    if (ready < n) {
      if (this.closedWith) throw this.closedWith;
      const t: Target = { buf: out, filled: ready };
      this.target = t;
      this.resumeReads();
      try {
        // One wait for the whole read, its stall timer re-armed by every chunk that arrives.
        await this.bounded<void>(what, (resolve, progress) => {
          const waiter = { resolve: () => resolve(), progress };
          this.waiter = waiter;
          return () => {
            if (this.waiter === waiter) this.waiter = undefined;
          };
        });
      } finally {
        if (this.target === t) this.target = undefined;
      }
      if (t.filled < n) throw this.closedWith ?? new VcpudError('internal', 'a read ended without its bytes');
    }
    return out;
  }

  /**
   * The next envelope from the peer, within the stall timeout. An ERROR envelope is thrown as the
   * peer's error. `into` lends a buffer for the payload (the payload is then a view of it); without
   * it the payload is a new buffer.
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
    const prefix = Buffer.from(this.inbox.peek());
    this.inbox.clear();
    let r: T;
    try {
      r = await read(this.rawFd as number, prefix, this.cancelFlag);
    } catch (e) {
      return this.streamError(e, what);
    }
    this.bytesIn += r.bytes;
    this.inbox.append(prefix.subarray(r.prefixUsed));
    handle.readStart();
    return r;
  }

  /** A native stream call's failure as the channel would report it. */
  private async streamError(e: unknown, what: string): Promise<never> {
    const { code, syscall } = e as { code?: string; syscall?: string };
    if (e instanceof VcpudError) throw e; // a corrupt frame, guest memory that failed (typed by the caller)
    // A failure of this side (an errno that is not the connection's: EIO, ENOMEM, EBADF...) is not the
    // peer's: named as what it is, by the one errno table, without waiting for the peer's account.
    if (code && code !== 'ETIMEDOUT' && code !== 'ECANCELED' && !isConnectionErrno(code) && !this.closedWith) {
      const c = classifyErrno(syscall, code);
      throw new VcpudError(c.kind, `${what}: ${(e as Error).message}`, { reason: c.reason, errno: code }, { cause: e });
    }
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
