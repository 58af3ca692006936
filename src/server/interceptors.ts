/**
 * grpc-js server interceptors (>= 1.10 API): metrics, request logging and client-certificate authz.
 *
 * Order matters. grpc-js wraps interceptors so that the last one in the list is the outermost: it sees
 * incoming metadata last, just before the handler. A status sent by an interceptor travels inward only,
 * so authz must be outside metrics and logging for its PERMISSION_DENIED to be counted and logged.
 * buildInterceptors() returns them in that order: [metrics and logging (one layer), authz].
 */
import { randomUUID } from 'node:crypto';
import { type OutgoingHttpHeaders, sensitiveHeaders } from 'node:http2';
import type { PeerCertificate } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from './logging';
import { grpcCodeName, type Metrics, type RpcLabels } from './metrics';

/** What call.getAuthContext() returns (grpc-js does not export the type from its root). */
export type AuthContext = ReturnType<grpc.ServerInterceptingCallInterface['getAuthContext']>;

export const HEALTH_SERVICE = 'grpc.health.v1.Health';
export const REQUEST_ID_HEADER = 'x-request-id';

/**
 * The response's headers with the request id marked never-indexed. An id is new on every call: HPACK
 * (nghttp2's default) put each one in the connection's header table, evicting an older entry, for
 * ~8 us of a GetState's server CPU (BENCHMARKS.md); as a literal it costs its bytes only.
 */
function headersWithRequestIdNeverIndexed(this: grpc.Metadata): OutgoingHttpHeaders {
  return Object.assign(grpc.Metadata.prototype.toHttp2Headers.call(this), { [sensitiveHeaders]: [REQUEST_ID_HEADER] });
}

/** A client's id is echoed into logs and headers: keep it short and free of control characters. */
const CLIENT_REQUEST_ID = /^[A-Za-z0-9._:/+=-]{1,128}$/;

/** '/pkg.Service/Method' and the streaming flags as go-grpc-prometheus labels them. */
export function rpcLabels(method: Pick<grpc.ServerMethodDefinition<unknown, unknown>, 'path' | 'requestStream' | 'responseStream'>): RpcLabels {
  const [, service = 'unknown', name = 'unknown'] = method.path.split('/');
  const grpc_type = method.requestStream ? (method.responseStream ? 'bidi_stream' : 'client_stream') : method.responseStream ? 'server_stream' : 'unary';
  return { grpc_type, grpc_service: service, grpc_method: name };
}

export function isHealthMethod(path: string): boolean {
  return path.startsWith(`/${HEALTH_SERVICE}/`);
}

/**
 * A call that ends without a status passing through the interceptors (the client cancelled, or grpc-js
 * itself answered at the transport level, e.g. an expired deadline) is only seen as onCancel.
 */
function codeOfCancelledCall(call: grpc.ServerInterceptingCallInterface): grpc.status {
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() : deadline;
  return ms <= Date.now() ? grpc.status.DEADLINE_EXCEEDED : grpc.status.CANCELLED;
}

/** The status a server interceptor passes on (grpc-js's PartialStatusObject, not exported from its root). */
type OutgoingStatus = Pick<grpc.StatusObject, 'code' | 'details'> & { metadata?: grpc.Metadata | null };

/** The labels of each method, computed once per method path. */
const labelsByPath = new Map<string, RpcLabels>();
function labelsOf(method: grpc.ServerMethodDefinition<unknown, unknown>): RpcLabels {
  let labels = labelsByPath.get(method.path);
  if (!labels) labelsByPath.set(method.path, (labels = rpcLabels(method)));
  return labels;
}

/**
 * Logs method, code, duration and a request id when a call ends: at info when it failed or took
 * longer than SLOW_CALL_MS, otherwise at debug. A checkpoint loop makes thousands of GetState calls a
 * second: an info line for each cost ~5% of the server's CPU and drowned the lines that matter; the
 * metrics count every call. Health checks log at debug whatever their outcome (probes every few seconds).
 *
 * The request id is the client's x-request-id when it sent a sane one, echoed in the response headers.
 * Otherwise vcpud makes one (a UUID) for a call it logs, and sends it in the trailers, so a client
 * can find the line of any call that has one. A call without a client id and without a line gets no
 * id: sending a fresh one on every successful GetState was 9-21 us of its server CPU under 64
 * clients (4-9%, BENCHMARKS.md), for an id that named nothing.
 */
export const SLOW_CALL_MS = 1000;

/**
 * What metrics and logging record of one call: started, handled (by code), messages both ways and
 * handling time (metrics), the request id and the "rpc finished" line (logging).
 */
class CallRecord {
  private startedAt = process.hrtime.bigint();
  /** The client's id, or the one made for the log line. */
  private requestId: string | undefined;
  /** The client's id went out in the headers. */
  private idSent = false;
  private finished = false;

  constructor(
    private readonly metrics: Metrics,
    private readonly logger: Logger,
    private readonly method: grpc.ServerMethodDefinition<unknown, unknown>,
    private readonly labels: RpcLabels,
    private readonly call: grpc.ServerInterceptingCallInterface,
  ) {}

  start(): void {
    this.startedAt = process.hrtime.bigint();
    this.metrics.rpcStarted(this.labels);
  }

  receiveMetadata(metadata: grpc.Metadata): void {
    const given = metadata.get(REQUEST_ID_HEADER)[0];
    if (typeof given === 'string' && CLIENT_REQUEST_ID.test(given)) this.requestId = given;
  }

  receiveMessage(): void {
    this.metrics.rpcMessageReceived(this.labels);
  }

  cancel(): void {
    this.finish(codeOfCancelledCall(this.call), 'cancelled before a status was sent');
  }

  sendMetadata(metadata: grpc.Metadata): void {
    if (this.requestId === undefined) return;
    this.idSent = true;
    metadata.set(REQUEST_ID_HEADER, this.requestId);
    // grpc-js copies toHttp2Headers()'s result, symbol keys included, into the headers http2 sends.
    // (A trailers-only error's metadata is cloned on the way, without this: errors are not the hot path.)
    metadata.toHttp2Headers = headersWithRequestIdNeverIndexed;
  }

  sendMessage(): void {
    this.metrics.rpcMessageSent(this.labels);
  }

  /** The status to send on: the same one, or a copy carrying the request id of a logged call in its trailers. */
  sendStatus(status: OutgoingStatus): OutgoingStatus {
    this.finish(status.code, status.details);
    if (this.idSent || this.requestId === undefined) return status;
    const metadata = status.metadata?.clone() ?? new grpc.Metadata();
    metadata.set(REQUEST_ID_HEADER, this.requestId);
    return { ...status, metadata };
  }

  /** Once per call: grpc-js reports onCancel after every status too. */
  private finish(code: grpc.status, details: string | undefined): void {
    if (this.finished) return;
    this.finished = true;
    const elapsed = Number(process.hrtime.bigint() - this.startedAt);
    this.metrics.rpcHandled(this.labels, code, elapsed / 1e9);
    const durationMs = elapsed / 1e6;
    const level = !isHealthMethod(this.method.path) && (code !== grpc.status.OK || durationMs > SLOW_CALL_MS) ? 'info' : 'debug';
    if (!this.logger.enabled(level)) return;
    this.requestId ??= randomUUID();
    const fields: Record<string, unknown> = {
      request_id: this.requestId,
      method: this.method.path,
      peer: this.call.getPeer(),
      code: grpcCodeName(code),
      duration_ms: durationMs,
    };
    if (code !== grpc.status.OK && details) fields.details = details;
    this.logger[level]('rpc finished', fields);
  }
}

/** The listener a call passes incoming events to (grpc-js does not export the type from its root). */
type IncomingListener = Parameters<grpc.ServerInterceptingCallInterface['start']>[0];

/** The listener the record hears incoming events through, in front of the handler's. */
class RecordingListener implements IncomingListener {
  constructor(
    private readonly next: IncomingListener,
    private readonly record: CallRecord,
  ) {}
  onReceiveMetadata(metadata: grpc.Metadata): void {
    this.record.receiveMetadata(metadata);
    this.next.onReceiveMetadata(metadata);
  }
  onReceiveMessage(message: unknown): void {
    this.record.receiveMessage();
    this.next.onReceiveMessage(message);
  }
  onReceiveHalfClose(): void {
    this.next.onReceiveHalfClose();
  }
  onCancel(): void {
    this.record.cancel();
    this.next.onCancel();
  }
}

type Call = grpc.ServerInterceptingCallInterface;

/**
 * The call as the metrics and logging layer passes it on: every method forwarded to the call it wraps,
 * with the record told first. Not a grpc-js ServerInterceptingCall: that one exists for asynchronous
 * hooks, and made each call a responder, a listener wrapper and a closure per event: 4-37 us of a
 * GetState's p50 (median 8 over 5 alternating pairs) and 0-10 us of its CPU under load (BENCHMARKS.md).
 * Everything here is synchronous.
 */
class RecordedCall implements Call {
  private metadataSent = false;

  constructor(
    private readonly call: Call,
    private readonly record: CallRecord,
  ) {}
  start(listener: IncomingListener): void {
    this.record.start();
    this.call.start(new RecordingListener(listener, this.record));
  }
  sendMetadata(metadata: grpc.Metadata): void {
    this.metadataSent = true;
    this.record.sendMetadata(metadata);
    this.call.sendMetadata(metadata);
  }
  sendMessage(message: unknown, callback: () => void): void {
    // Headers go first, and through this layer, as a ServerInterceptingCall sends them.
    if (!this.metadataSent) this.sendMetadata(new grpc.Metadata());
    this.record.sendMessage();
    this.call.sendMessage(message, callback);
  }
  sendStatus(status: OutgoingStatus): void {
    this.call.sendStatus(this.record.sendStatus(status));
  }
  startRead(): void {
    this.call.startRead();
  }
  getPeer(): string {
    return this.call.getPeer();
  }
  getDeadline(): ReturnType<Call['getDeadline']> {
    return this.call.getDeadline();
  }
  getHost(): string {
    return this.call.getHost();
  }
  getAuthContext(): AuthContext {
    return this.call.getAuthContext();
  }
  getConnectionInfo(): ReturnType<Call['getConnectionInfo']> {
    return this.call.getConnectionInfo();
  }
  getMetricsRecorder(): ReturnType<Call['getMetricsRecorder']> {
    return this.call.getMetricsRecorder();
  }
}

/** Metrics and logging of every call, in one interceptor layer. */
export function metricsAndLoggingInterceptor(metrics: Metrics, logger: Logger): grpc.ServerInterceptor {
  // grpc-js types an interceptor's result as its class but calls only the interface's methods (request-limits.ts does the same).
  return (method, call) => new RecordedCall(call, new CallRecord(metrics, logger, method, labelsOf(method), call)) as unknown as grpc.ServerInterceptingCall;
}

/** The names a client certificate can be allowed by: its subject CNs and its SAN URIs (e.g. SPIFFE ids). */
export function certificateIdentities(cert: PeerCertificate): { cns: string[]; uris: string[] } {
  const cn = cert.subject?.CN;
  const cns = cn === undefined ? [] : Array.isArray(cn) ? cn : [cn];
  const uris: string[] = [];
  // Node lists SANs as 'DNS:a, URI:spiffe://x, ...', JSON-quoting an entry that holds a comma or quote.
  const entry = /(?:^|, )([A-Za-z ]+):("(?:[^"\\]|\\.)*"|[^,]*)/g;
  for (const m of (cert.subjectaltname ?? '').matchAll(entry)) {
    if (m[1] !== 'URI') continue;
    uris.push(m[2].startsWith('"') ? (JSON.parse(m[2]) as string) : m[2]);
  }
  return { cns, uris };
}

/** null when allowed, else the reason (sent to the client as the PERMISSION_DENIED message). */
export function authorizeClient(auth: AuthContext, allowed: ReadonlySet<string>): string | null {
  const cert = auth.sslPeerCertificate;
  if (!cert) return 'a client certificate is required';
  const { cns, uris } = certificateIdentities(cert);
  if ([...cns, ...uris].some((name) => allowed.has(name))) return null;
  const who = [cns.length ? `CN=${cns.join(',')}` : 'without CN', ...(uris.length ? [`(URI ${uris.join(', ')})`] : [])].join(' ');
  return `client certificate ${who} is not allowed`;
}

/**
 * With mTLS and an allowlist: rejects, with PERMISSION_DENIED and before the handler runs, a call whose
 * client certificate names no allowed CN or SAN URI. The TLS handshake already proved the certificate
 * is signed by the CA; this decides which of those clients may call. Health checks are exempt (probes
 * and load balancers have no business holding an allowed identity).
 */
export function authzInterceptor(allowedClients: readonly string[], logger?: Logger): grpc.ServerInterceptor {
  const allowed = new Set(allowedClients);
  return (method, call) => {
    if (isHealthMethod(method.path)) return call as grpc.ServerInterceptingCall;
    return new grpc.ServerInterceptingCall(call, {
      start: (next) =>
        next({
          onReceiveMetadata: (metadata, nextMetadata) => {
            const denied = authorizeClient(call.getAuthContext(), allowed);
            if (denied === null) {
              nextMetadata(metadata);
              return;
            }
            logger?.warn('client not allowed', { method: method.path, peer: call.getPeer(), reason: denied });
            // Not forwarding the metadata keeps the handler from ever starting; the status goes inward.
            call.sendStatus({ code: grpc.status.PERMISSION_DENIED, details: denied, metadata: new grpc.Metadata() });
          },
        }),
    });
  };
}

export interface InterceptorOptions {
  metrics: Metrics;
  logger: Logger;
  /** Allowed client identities when mTLS with an allowlist is configured; empty or absent: no authz. */
  allowedClients?: readonly string[];
}

/** The interceptors of the API server, in the order explained at the top of this file. */
export function buildInterceptors(options: InterceptorOptions): grpc.ServerInterceptor[] {
  const list = [metricsAndLoggingInterceptor(options.metrics, options.logger)];
  if (options.allowedClients?.length) list.push(authzInterceptor(options.allowedClients, options.logger));
  return list;
}
