/**
 * vcpud accepts the connections of its listeners itself, so that no client can exhaust its file
 * descriptors: each listener has a cap on open connections (a connection over it is closed at accept
 * and counted), and the gRPC listeners hand every admitted socket to grpc-js through
 * Server.createConnectionInjector (grpc-js's bindAsync has no connection cap and no hook at accept).
 * Connections that never finish their TLS handshake are closed by Node's tls.Server after
 * handshakeTimeout (set through the credentials); connections that carry no stream are closed by
 * grpc-js's idle timeout (grpc.max_connection_idle_ms, see transport.ts).
 */
import dns from 'node:dns';
import fs from 'node:fs';
import net from 'node:net';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from './logging';

/** The listeners whose connections are counted (a metric label). */
export type ListenerName = 'api' | 'health' | 'metrics';

/** What a gate reports, for metrics (all optional: tests may leave them out). */
export interface ConnectionEvents {
  opened?(listener: ListenerName): void;
  closed?(listener: ListenerName): void;
  refused?(listener: ListenerName): void;
}

/** Logs a refusal at most this often: a flood must not flood the log too. */
const REFUSAL_LOG_INTERVAL_MS = 10_000;

/** Counts the open connections of one listener (over all its addresses) against its cap. */
export class ConnectionGate {
  private readonly open = new Set<net.Socket>();
  private refusedSinceLog = 0;
  private lastLog = 0;

  constructor(
    readonly listener: ListenerName,
    readonly maxConnections: number,
    private readonly events: ConnectionEvents = {},
    private readonly logger?: Logger,
  ) {}

  /** Takes a just-accepted socket: false (and the socket destroyed) when the listener is full. */
  admit(socket: net.Socket): boolean {
    if (this.open.size >= this.maxConnections) {
      socket.destroy();
      this.events.refused?.(this.listener);
      this.logRefusal();
      return false;
    }
    this.open.add(socket);
    this.events.opened?.(this.listener);
    socket.once('close', () => {
      this.open.delete(socket);
      this.events.closed?.(this.listener);
    });
    return true;
  }

  /** Closes every connection still open (those grpc-js never took over, e.g. mid-handshake). */
  destroyAll(): void {
    for (const s of this.open) s.destroy();
  }

  /** Applies the gate to a server that accepts its own connections (the metrics HTTP server). */
  guard(server: net.Server): void {
    server.prependListener('connection', (socket: net.Socket) => void this.admit(socket));
    server.on('error', (e) => this.acceptFailed(e));
  }

  /** accept(2) failing (EMFILE, ENFILE) must not end the process: log it, the next accept may work. */
  acceptFailed(e: Error): void {
    this.logger?.warn('cannot accept a connection', { listener: this.listener, error: e.message, code: (e as NodeJS.ErrnoException).code });
  }

  private logRefusal(): void {
    this.refusedSinceLog++;
    const now = Date.now();
    if (now - this.lastLog < REFUSAL_LOG_INTERVAL_MS) return;
    this.logger?.warn('connection refused: the listener is at its connection limit', {
      listener: this.listener,
      max_connections: this.maxConnections,
      refused_since_previous_log: this.refusedSinceLog,
    });
    this.refusedSinceLog = 0;
    this.lastLog = now;
  }
}

/** A gRPC listener of ours: the port actually bound (TCP; 0 for a unix socket), and its off switch. */
export interface GrpcListener {
  port: number;
  /** Stops accepting; connections already admitted stay until grpc-js or destroyAll closes them. */
  stopAccepting(): void;
}

export type ListenTarget = { path: string } | { host: string; port: number };

/** server.listen as a promise: rejects with the listen error (EADDRINUSE, EACCES...). */
export function listen(server: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(options, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/**
 * Listens on `target` (every address a host name resolves to, on one port, as grpc-js's bindAsync
 * did) and feeds each connection the gate admits to `server` with `creds`.
 */
export async function listenGrpc(server: grpc.Server, target: ListenTarget, creds: grpc.ServerCredentials, gate: ConnectionGate): Promise<GrpcListener> {
  const injector = server.createConnectionInjector(creds);
  const servers: net.Server[] = [];
  const stopAccepting = () => {
    for (const s of servers) s.close();
  };
  /** Listens on one address; once listening, its errors are failed accepts. */
  const listenOn = async (options: net.ListenOptions) => {
    const s = net.createServer((socket) => {
      if (gate.admit(socket)) injector.injectConnection(socket);
    });
    await listen(s, options);
    s.on('error', (e) => gate.acceptFailed(e));
    servers.push(s);
    return s;
  };
  try {
    if ('path' in target) {
      await listenOn({ path: target.path });
      return { port: 0, stopAccepting };
    }
    // As grpc-js did: listening on some of the addresses (say 127.0.0.1 but not ::1 where IPv6 is off) is enough.
    const addresses = await dns.promises.lookup(target.host, { all: true });
    let port = target.port;
    let firstError: unknown;
    for (const a of addresses) {
      try {
        const s = await listenOn({ host: a.address, port, exclusive: true });
        port = (s.address() as net.AddressInfo).port; // port 0: the others share the first one's
      } catch (e) {
        firstError ??= e;
      }
    }
    if (!servers.length) throw firstError ?? new Error(`${target.host} resolves to no address`);
    return { port, stopAccepting };
  } catch (e) {
    stopAccepting();
    injector.destroy();
    throw e;
  }
}

/**
 * The credentials `creds` with a TLS handshake deadline (Node's default is 120 s; grpc-js has no
 * option for it): Node's TLS server reports a handshake not complete `ms` after accept (bytes
 * trickling in do not extend it), and the HTTP/2 server grpc-js builds then destroys the connection.
 */
export function withHandshakeTimeout(creds: grpc.ServerCredentials, ms: number): grpc.ServerCredentials {
  const serverOptions = creds._getConstructorOptions();
  if (!serverOptions) return creds; // plaintext: no TLS handshake
  return new (class extends grpc.ServerCredentials {
    _equals(other: grpc.ServerCredentials): boolean {
      return other === this;
    }
  })({ ...serverOptions, handshakeTimeout: ms }, creds._getSecureContextOptions() ?? undefined);
}

/** The soft RLIMIT_NOFILE of this process; undefined when unlimited or unknown (no /proc). */
export function descriptorLimit(): number | undefined {
  try {
    const m = /^Max open files\s+(\d+)/m.exec(fs.readFileSync('/proc/self/limits', 'utf8'));
    return m ? Number(m[1]) : undefined;
  } catch {
    return undefined;
  }
}
