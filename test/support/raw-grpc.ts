/**
 * gRPC calls made by hand over Node's http2, for tests that act as clients grpc-js would never be:
 * one that never reads its responses (grpc-js clients read 16 messages ahead), or one that declares
 * a message and never finishes sending it.
 */
import http2 from 'node:http2';
import net from 'node:net';
import * as grpc from '@grpc/grpc-js';
import { vcpudProto } from '../../src/api/proto';
import { decodeStatusDetails } from '../../src/api/status-details';

/** A connection to a unix-socket gRPC server ('unix:/path'). */
export function connectRaw(target: string): http2.ClientHttp2Session {
  const socketPath = target.replace(/^unix:/, '');
  const session = http2.connect('http://localhost', { createConnection: () => net.connect(socketPath), maxSessionMemory: 1024 });
  session.on('error', () => {});
  return session;
}

/** The request bytes of `service`/`method` for `req` (proto-loader's serializer). */
export function encodeRequest(service: 'VmService' | 'VcpuStateService' | 'SnapshotService', method: string, req: object): Buffer {
  const def = (vcpudProto().vcpud.v1[service] as unknown as grpc.ServiceClientConstructor).service[method];
  return def.requestSerialize(req);
}

/** A gRPC message prefix: uncompressed, `length` bytes declared. */
export function messagePrefix(length: number): Buffer {
  const p = Buffer.alloc(5);
  p.writeUInt32BE(length, 1);
  return p;
}

export interface RawCall {
  stream: http2.ClientHttp2Stream;
  /** Resolves with the call's status (grpc-status trailer or trailers-only headers) once it ends. */
  status: Promise<RawStatus>;
}

/** A raw call's status, with its ErrorInfo's reason and the metadata tests look at. */
export interface RawStatus {
  code: number;
  details: string;
  reason?: string;
  limit?: string;
  rule?: string;
}

/**
 * Opens a call to /vcpud.v1.<service>/<method>, writes `body` (framed messages) and ends the
 * request side when `end`. `read: false` leaves the response unread (the stream stays paused, so
 * the server soon has to hold whatever it still wants to send).
 */
export function rawCall(
  session: http2.ClientHttp2Session,
  service: string,
  method: string,
  body: Buffer,
  opts: { end?: boolean; read?: boolean } = {},
): RawCall {
  const stream = session.request({ ':method': 'POST', ':path': `/vcpud.v1.${service}/${method}`, 'content-type': 'application/grpc', te: 'trailers' });
  stream.on('error', () => {});
  stream.write(body);
  if (opts.end ?? true) stream.end();
  if (opts.read === false) stream.pause();
  else stream.resume();
  const status = new Promise<RawStatus>((resolve) => {
    const done = (h: http2.IncomingHttpHeaders) => {
      if (h['grpc-status'] === undefined) return;
      const md = new grpc.Metadata();
      const details = h['grpc-status-details-bin'];
      if (typeof details === 'string') md.set('grpc-status-details-bin', Buffer.from(details, 'base64'));
      const info = decodeStatusDetails(md)?.errorInfo;
      resolve({
        code: Number(h['grpc-status']),
        details: decodeURIComponent(String(h['grpc-message'] ?? '')),
        reason: info?.reason,
        limit: info?.metadata?.limit,
        rule: info?.metadata?.rule,
      });
    };
    stream.on('response', done);
    stream.on('trailers', done);
    stream.on('close', () => resolve({ code: -1, details: `stream closed without a status (rst ${stream.rstCode})` }));
  });
  return { stream, status };
}

/** The response messages in `bytes` (whole gRPC frames; a partial last frame is left out). */
export function decodeResponses<T = Record<string, unknown>>(
  service: 'VmService' | 'VcpuStateService' | 'SnapshotService',
  method: string,
  bytes: Buffer,
): T[] {
  const def = (vcpudProto().vcpud.v1[service] as unknown as grpc.ServiceClientConstructor).service[method];
  const out: T[] = [];
  for (let at = 0; at + 5 <= bytes.length; ) {
    const length = bytes.readUInt32BE(at + 1);
    if (at + 5 + length > bytes.length) break;
    out.push(def.responseDeserialize(bytes.subarray(at + 5, at + 5 + length)) as T);
    at += 5 + length;
  }
  return out;
}

/** `promise`, or `fallback` after `ms` (the timer does not outlive the race). */
export async function within<T, F>(promise: Promise<T>, ms: number, fallback: F): Promise<T | F> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([promise, new Promise<F>((resolve) => (timer = setTimeout(() => resolve(fallback), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}
