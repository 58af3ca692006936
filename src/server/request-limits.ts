/**
 * Bounds on what clients can make vcpud hold while their request messages arrive.
 *
 * grpc-js reassembles each request message in full (up to grpc.max_receive_message_length, one
 * server-wide number) before any handler or interceptor sees it, on every stream of every connection.
 * This module replaces that reassembly, per call, by one that
 * - refuses a message whose declared length is over its method's limit, as soon as the 5-byte gRPC
 *   prefix arrives (bulk methods: --max-message-bytes; uploads: UPLOAD_MESSAGE_MAX; everything else:
 *   STATE_MESSAGE_MAX),
 * - counts every message over STATE_MESSAGE_MAX (only bulk data is) against one server-wide budget
 *   (--max-request-bytes-in-flight) from its first byte until it is complete, refusing one that would
 *   go over,
 * - ends a call whose message stops arriving midway for --upload-stall-timeout (UPLOAD_STALLED),
 * - refuses compressed request messages (INVALID_ARGUMENT): grpc-js would inflate one up to the
 *   server-wide maximum before anything could look at its size.
 * Size refusals are RESOURCE_EXHAUSTED with ErrorInfo (LIMIT_EXCEEDED naming the limit, or UPLOAD_STALLED).
 *
 * grpc-js has no public hook for this: the interceptor reaches into the base call it wraps (its
 * `decoder`, `stream` and `handler`), checked by grpcInternals(), which fails every call loudly if a
 * grpc-js upgrade moved them.
 */
import type { ServerHttp2Stream } from 'node:http2';
import type * as grpc from '@grpc/grpc-js';
import { invalidArgument, limitExceeded, VcpudError } from '../errors';
import { toServiceError } from './errors';
import type { Logger } from './logging';

/**
 * The largest request of a method without bulk data (a full SetState is ~20 KiB, nested state 8 KiB).
 * Messages up to this size are not counted against the budget: an HTTP/2 stream's initial
 * flow-control window (64 KiB) lets every open stream hold that much in any case.
 */
export const STATE_MESSAGE_MAX = 64 * 1024;
/** The largest RestoreSnapshotStream message: snapshot bytes arrive in chunks (vcpuctl and MigrateVm send 1 MiB). */
export const UPLOAD_MESSAGE_MAX = 4 * 1024 * 1024;
/** Methods whose one request carries bulk data: limited by --max-message-bytes. */
const BULK_METHODS = new Set(['/vcpud.v1.VmService/WriteMemory', '/vcpud.v1.VmService/LoadProgram']);
const UPLOAD_METHODS = new Set(['/vcpud.v1.SnapshotService/RestoreSnapshotStream']);
const PREFIX_BYTES = 5;

export interface RequestLimits {
  maxMessageBytes: number;
  maxRequestBytesInFlight: number;
  uploadStallTimeoutMs: number;
}

/** The largest request message `path` accepts. */
export function maxRequestBytes(path: string, limits: Pick<RequestLimits, 'maxMessageBytes'>): number {
  if (BULK_METHODS.has(path)) return limits.maxMessageBytes;
  if (UPLOAD_METHODS.has(path)) return Math.min(UPLOAD_MESSAGE_MAX, limits.maxMessageBytes);
  return Math.min(STATE_MESSAGE_MAX, limits.maxMessageBytes);
}

/** Bytes of large request messages being received, over every call. */
export class RequestBudget {
  private used = 0;
  constructor(readonly capacity: number) {}

  get inFlight(): number {
    return this.used;
  }

  take(bytes: number): boolean {
    if (this.used + bytes > this.capacity) return false;
    this.used += bytes;
    return true;
  }

  give(bytes: number): void {
    this.used -= bytes;
  }
}

export function uploadStalled(what: string, ms: number): VcpudError {
  return new VcpudError('resource_exhausted', `${what} stalled: nothing arrived for ${ms} ms (--upload-stall-timeout); the call was ended`, {
    reason: 'UPLOAD_STALLED',
    limit: 'upload_stall_timeout',
  });
}

/**
 * Splits a request stream into gRPC messages (1-byte compressed flag, 4-byte big-endian length,
 * payload), handing each on whole with its prefix, as grpc-js's own reassembly does.
 */
export class BoundedMessageDecoder {
  // Overwritten before it is read (prefixHave counts what is valid): from the pool, not a fresh allocation.
  private prefix = Buffer.allocUnsafe(PREFIX_BYTES);
  private prefixHave = 0;
  private parts: Buffer[] = [];
  private need = 0;
  /** Declared size of the message being assembled, when counted against the budget. */
  private counted = 0;
  private stallTimer?: NodeJS.Timeout;
  private lastProgress = 0;
  private failed = false;

  constructor(
    private readonly method: string,
    private readonly limit: number,
    private readonly budget: RequestBudget,
    private readonly stallMs: number,
    private readonly fail: (e: VcpudError) => void,
    /** True while grpc-js holds the stream paused (the handler has not asked for more): no stall then. */
    private readonly serverPaused: () => boolean = () => false,
  ) {}

  write(data: Buffer): Buffer[] {
    const out: Buffer[] = [];
    let at = 0;
    while (at < data.length && !this.failed) {
      const whole = this.prefixHave === 0 ? this.wholeSmallMessage(data, at) : 0;
      if (whole > 0) {
        // The common case (a state request in one DATA frame): handed on as a view, nothing assembled.
        out.push(data.subarray(at, at + whole));
        at += whole;
        continue;
      }
      if (this.prefixHave < PREFIX_BYTES) {
        const take = Math.min(PREFIX_BYTES - this.prefixHave, data.length - at);
        data.copy(this.prefix, this.prefixHave, at, at + take);
        this.prefixHave += take;
        at += take;
        if (this.prefixHave === PREFIX_BYTES && !this.startMessage()) break;
      } else {
        const take = Math.min(this.need, data.length - at);
        this.parts.push(data.subarray(at, at + take));
        this.need -= take;
        at += take;
      }
      if (this.prefixHave === PREFIX_BYTES && this.need === 0) out.push(this.finishMessage());
    }
    this.lastProgress = Date.now();
    // Only a message still incomplete after this chunk can stall.
    if (!this.failed && this.prefixHave === PREFIX_BYTES && this.need > 0) this.armStallTimer();
    return out;
  }

  /**
   * The length (prefix included) of a message that starts at `at` and lies whole in `data`, when it
   * is small enough not to count against the budget and passes the checks; 0 otherwise (the
   * assembling path then takes it, and refuses it if it must).
   */
  private wholeSmallMessage(data: Buffer, at: number): number {
    if (data.length - at < PREFIX_BYTES) return 0;
    const size = data.readUInt32BE(at + 1);
    if (size > STATE_MESSAGE_MAX || data.length - at - PREFIX_BYTES < size || this.refusal(data[at], size)) return 0;
    return PREFIX_BYTES + size;
  }

  /** Releases what the message being assembled holds (the call ended). */
  close(): void {
    this.failed = true;
    this.release();
  }

  /** Why a message with compressed flag `flag` and `size` bytes is refused whatever the budget, if it is. */
  private refusal(flag: number, size: number): VcpudError | undefined {
    if (flag !== 0)
      return invalidArgument(`compressed request messages are not accepted (${this.method}): their inflated size could not be bounded before inflating`, [
        { rule: 'request.compressed', field: 'grpc-encoding', message: 'send requests uncompressed (identity)' },
      ]);
    if (size > this.limit)
      return limitExceeded('max_request_message_bytes', `a ${size}-byte request message is over ${this.method}'s limit of ${this.limit} bytes`);
    return undefined;
  }

  private startMessage(): boolean {
    const size = this.prefix.readUInt32BE(1);
    const refused = this.refusal(this.prefix[0], size);
    if (refused) {
      this.refuse(refused);
      return false;
    }
    if (size > STATE_MESSAGE_MAX) {
      if (!this.budget.take(size)) {
        this.refuse(
          limitExceeded(
            'max_request_bytes_in_flight',
            `a ${size}-byte request message does not fit: ${this.budget.inFlight} of the ${this.budget.capacity} bytes of --max-request-bytes-in-flight are being received; retry later`,
          ),
        );
        return false;
      }
      this.counted = size;
    }
    this.need = size;
    this.parts = [Buffer.from(this.prefix)];
    return true;
  }

  private finishMessage(): Buffer {
    const message = this.parts.length === 1 ? this.parts[0] : Buffer.concat(this.parts);
    this.parts = [];
    this.prefixHave = 0;
    this.release();
    return message;
  }

  private release(): void {
    if (this.counted) this.budget.give(this.counted);
    this.counted = 0;
    this.parts = [];
    if (this.stallTimer) clearTimeout(this.stallTimer);
    this.stallTimer = undefined;
  }

  private armStallTimer(): void {
    if (this.stallTimer) return;
    this.lastProgress = Date.now();
    const check = () => {
      if (this.serverPaused()) this.lastProgress = Date.now();
      const idle = Date.now() - this.lastProgress;
      if (idle >= this.stallMs) {
        this.stallTimer = undefined;
        this.refuse(
          uploadStalled(
            `a ${this.method} request message (${this.prefix.readUInt32BE(1) - this.need} of ${this.prefix.readUInt32BE(1)} bytes received)`,
            this.stallMs,
          ),
        );
      } else {
        this.stallTimer = setTimeout(check, this.stallMs - idle);
      }
    };
    this.stallTimer = setTimeout(check, this.stallMs);
    this.stallTimer.unref();
  }

  private refuse(e: VcpudError): void {
    this.failed = true;
    this.release();
    this.fail(e);
  }
}

/** The parts of grpc-js's BaseServerInterceptingCall this module replaces or listens to. */
interface BaseCallInternals {
  decoder: { write(data: Buffer): Buffer[] };
  stream: ServerHttp2Stream;
  sendStatus(status: Partial<grpc.StatusObject>): void;
}

function grpcInternals(call: unknown): BaseCallInternals {
  const c = call as Partial<BaseCallInternals>;
  if (typeof c?.decoder?.write !== 'function' || typeof c.stream?.once !== 'function' || typeof c.sendStatus !== 'function')
    throw new Error('request limits: @grpc/grpc-js internals changed (no decoder/stream on the base call); update src/server/request-limits.ts');
  return c as BaseCallInternals;
}

/**
 * The interceptor that installs the bounded reassembly on every call. It must be the first
 * interceptor (the one grpc-js hands its base call to), before any data frame is read.
 */
export function requestLimitsInterceptor(
  limits: RequestLimits,
  logger: Logger,
  budget = new RequestBudget(limits.maxRequestBytesInFlight),
): grpc.ServerInterceptor {
  return (method, call) => {
    const base = grpcInternals(call);
    const decoder = new BoundedMessageDecoder(
      method.path,
      maxRequestBytes(method.path, limits),
      budget,
      limits.uploadStallTimeoutMs,
      (e) => {
        logger.warn('request refused while it arrived', { method: method.path, error: e.message });
        base.sendStatus(toServiceError(e));
      },
      () => base.stream.isPaused(),
    );
    base.decoder = decoder;
    base.stream.once('close', () => decoder.close());
    return call as grpc.ServerInterceptingCall;
  };
}
