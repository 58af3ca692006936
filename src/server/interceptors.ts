/**
 * grpc-js server interceptors (>= 1.10 API): metrics, request logging and client-certificate authz.
 *
 * Order matters. grpc-js wraps interceptors so that the last one in the list is the outermost: it sees
 * incoming metadata last, just before the handler. A status sent by an interceptor travels inward only,
 * so authz must be outside metrics and logging for its PERMISSION_DENIED to be counted and logged.
 * buildInterceptors() returns them in that order: [metrics and logging (one layer), authz].
 */
import { randomUUID } from 'node:crypto';
import type { PeerCertificate } from 'node:tls';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from './logging';
import { grpcCodeName, type Metrics, type RpcLabels } from './metrics';

/** What call.getAuthContext() returns (grpc-js does not export the type from its root). */
export type AuthContext = ReturnType<grpc.ServerInterceptingCallInterface['getAuthContext']>;

export const HEALTH_SERVICE = 'grpc.health.v1.Health';
export const REQUEST_ID_HEADER = 'x-request-id';

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

/**
 * What an observing interceptor does at each step of a call; every hook is optional. Several observers
 * share one grpc-js interceptor layer (observingInterceptor): each layer wraps every listener and every
 * outgoing step of every call, and the metrics and logging layers were ~40 us of server CPU per call.
 */
/** The status a server interceptor passes on (grpc-js's PartialStatusObject, not exported from its root). */
type OutgoingStatus = Pick<grpc.StatusObject, 'code' | 'details'> & { metadata?: grpc.Metadata | null };

interface CallObserver {
  start?(): void;
  receiveMetadata?(metadata: grpc.Metadata): void;
  receiveMessage?(): void;
  cancel?(): void;
  sendMetadata?(metadata: grpc.Metadata): void;
  sendMessage?(): void;
  /** Returns the status to send on (the same one, or a copy with more trailers). */
  sendStatus?(status: OutgoingStatus): OutgoingStatus;
}

type ObserverFactory = (method: grpc.ServerMethodDefinition<unknown, unknown>, call: grpc.ServerInterceptingCallInterface) => CallObserver;

/**
 * One interceptor layer running the observers of `factories`, in order, at every step of a call. The
 * hooks are looked up as they run: gathering them into per-hook arrays cost more per call than the
 * lookups (seven arrays and a dozen bound functions per call).
 */
function observingInterceptor(...factories: ObserverFactory[]): grpc.ServerInterceptor {
  return (method, call) => {
    const observers = factories.map((f) => f(method, call));
    return new grpc.ServerInterceptingCall(call, {
      start: (next) => {
        for (const o of observers) o.start?.();
        next({
          onReceiveMetadata: (metadata, nextMetadata) => {
            for (const o of observers) o.receiveMetadata?.(metadata);
            nextMetadata(metadata);
          },
          onReceiveMessage: (message, nextMessage) => {
            for (const o of observers) o.receiveMessage?.();
            nextMessage(message);
          },
          onCancel: () => {
            for (const o of observers) o.cancel?.();
          },
        });
      },
      sendMetadata: (metadata, next) => {
        for (const o of observers) o.sendMetadata?.(metadata);
        next(metadata);
      },
      sendMessage: (message, next) => {
        for (const o of observers) o.sendMessage?.();
        next(message);
      },
      sendStatus: (status, next) => {
        let s = status;
        for (const o of observers) if (o.sendStatus) s = o.sendStatus(s);
        next(s);
      },
    });
  };
}

/** The labels of each method, computed once per method path. */
const labelsByPath = new Map<string, RpcLabels>();
function labelsOf(method: grpc.ServerMethodDefinition<unknown, unknown>): RpcLabels {
  let labels = labelsByPath.get(method.path);
  if (!labels) labelsByPath.set(method.path, (labels = rpcLabels(method)));
  return labels;
}

/** Counts started, handled (by code), messages both ways, and handling time of every RPC. */
function metricsObserver(metrics: Metrics): ObserverFactory {
  return (method, call) => {
    const labels = labelsOf(method);
    let startedAt = process.hrtime.bigint();
    let finished = false;
    const finish = (code: grpc.status) => {
      if (finished) return; // grpc-js reports onCancel after every status too
      finished = true;
      metrics.rpcHandled(labels, code, Number(process.hrtime.bigint() - startedAt) / 1e9);
    };
    return {
      start: () => {
        startedAt = process.hrtime.bigint();
        metrics.rpcStarted(labels);
      },
      receiveMessage: () => metrics.rpcMessageReceived(labels),
      cancel: () => finish(codeOfCancelledCall(call)),
      sendMessage: () => metrics.rpcMessageSent(labels),
      sendStatus: (status) => {
        finish(status.code);
        return status;
      },
    };
  };
}

export function metricsInterceptor(metrics: Metrics): grpc.ServerInterceptor {
  return observingInterceptor(metricsObserver(metrics));
}

/**
 * Gives every call a request id (the client's x-request-id when it sent a sane one, else a fresh UUID),
 * returns it in the response headers (or the trailers of a trailers-only error response), and logs
 * method, code and duration when the call ends: at info when it failed or took longer than
 * SLOW_CALL_MS, otherwise at debug. A checkpoint loop makes thousands of GetState calls a second: an
 * info line for each cost ~5% of the server's CPU and drowned the lines that matter; the metrics count
 * every call. Health checks log at debug whatever their outcome (probes every few seconds).
 */
export const SLOW_CALL_MS = 1000;

function loggingObserver(logger: Logger): ObserverFactory {
  return (method, call) => {
    const health = isHealthMethod(method.path);
    let requestId: string | undefined;
    const id = () => (requestId ??= randomUUID());
    let headersSent = false;
    let finished = false;
    let startedAt = process.hrtime.bigint();
    const finish = (code: grpc.status, details?: string) => {
      if (finished) return;
      finished = true;
      const durationMs = Number(process.hrtime.bigint() - startedAt) / 1e6;
      const level = !health && (code !== grpc.status.OK || durationMs > SLOW_CALL_MS) ? 'info' : 'debug';
      if (!logger.enabled(level)) return;
      const fields: Record<string, unknown> = {
        request_id: id(),
        method: method.path,
        peer: call.getPeer(),
        code: grpcCodeName(code),
        duration_ms: durationMs,
      };
      if (code !== grpc.status.OK && details) fields.details = details;
      logger[level]('rpc finished', fields);
    };
    return {
      start: () => {
        startedAt = process.hrtime.bigint();
      },
      receiveMetadata: (metadata) => {
        const given = metadata.get(REQUEST_ID_HEADER)[0];
        if (requestId === undefined) requestId = typeof given === 'string' && CLIENT_REQUEST_ID.test(given) ? given : randomUUID();
      },
      cancel: () => finish(codeOfCancelledCall(call), 'cancelled before a status was sent'),
      sendMetadata: (metadata) => {
        headersSent = true;
        metadata.set(REQUEST_ID_HEADER, id());
      },
      sendStatus: (status) => {
        finish(status.code, status.details);
        if (headersSent) return status;
        const metadata = status.metadata?.clone() ?? new grpc.Metadata();
        metadata.set(REQUEST_ID_HEADER, id());
        return { ...status, metadata };
      },
    };
  };
}

export function loggingInterceptor(logger: Logger): grpc.ServerInterceptor {
  return observingInterceptor(loggingObserver(logger));
}

/** Metrics and logging in one interceptor layer (as metricsInterceptor then loggingInterceptor would do). */
export function metricsAndLoggingInterceptor(metrics: Metrics, logger: Logger): grpc.ServerInterceptor {
  return observingInterceptor(metricsObserver(metrics), loggingObserver(logger));
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
    if (isHealthMethod(method.path)) return new grpc.ServerInterceptingCall(call);
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
