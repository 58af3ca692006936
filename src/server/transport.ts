/**
 * Where and how the gRPC server listens: a unix socket guarded by its file mode, TLS/mTLS on TCP, or
 * plaintext TCP on loopback only (--insecure). Also the grpc-js server options.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { formatListenAddress, isLoopbackHost, parseHostPort, parseListenAddress, type Config } from './config';
import { listenGrpc, withHandshakeTimeout, type ConnectionGate, type GrpcListener, type ListenTarget } from './connections';

export type BoundAddress = { kind: 'unix'; path: string; address: string } | { kind: 'tcp'; host: string; port: number; address: string };

/**
 * An API connection that carries no call for this long is closed (GOAWAY; grpc-js clients reconnect
 * on their next call): a client that went away without closing must not keep its descriptor forever.
 */
export const API_IDLE_CONNECTION_MS = 300_000;

/**
 * Server options of the API server.
 * - Message limits: one bound (default 64 MiB) both ways, sized for the largest state (xsave, nested
 *   state, memory chunks) with room; larger requests fail with RESOURCE_EXHAUSTED before decoding.
 * - max_concurrent_streams: caps the calls one connection can hold open (HTTP/2 SETTINGS); the number
 *   of connections is capped at accept (connections.ts).
 * - Keepalive: ping each connection after 60 s without traffic and drop it when no ack comes in 20 s,
 *   so streams held by a client that vanished without a FIN (a killed pod behind TCP) are released.
 *   grpc-js servers do not police client pings, so clients may choose their own keepalive.
 * - max_connection_idle: API_IDLE_CONNECTION_MS. No max_connection_age: a sidecar has few,
 *   long-lived clients and no load balancer to rebalance; forced reconnects would only add latency.
 * - channelz stays on although nothing serves it: grpc-js 1.14 tracks sessions for forceShutdown only in
 *   its channelz session handler, so with 'grpc.enable_channelz': 0 a forced shutdown leaves open
 *   streams (a health Watch, a console stream) running forever.
 */
export function serverOptions(config: Pick<Config, 'maxMessageBytes' | 'maxConcurrentStreams'>): grpc.ServerOptions {
  return {
    'grpc.max_receive_message_length': config.maxMessageBytes,
    'grpc.max_send_message_length': config.maxMessageBytes,
    'grpc.max_concurrent_streams': config.maxConcurrentStreams,
    'grpc.keepalive_time_ms': 60_000,
    'grpc.keepalive_timeout_ms': 20_000,
    'grpc.max_connection_idle_ms': API_IDLE_CONNECTION_MS,
  };
}

/**
 * The plaintext probe server carries only grpc.health.v1: tiny messages, few streams, and a probe
 * is done within the handshake timeout, so a connection idle that long is closed.
 */
export function healthServerOptions(config: Pick<Config, 'handshakeTimeoutMs'>): grpc.ServerOptions {
  return {
    'grpc.max_receive_message_length': 4096,
    'grpc.max_concurrent_streams': 16,
    'grpc.keepalive_time_ms': 60_000,
    'grpc.keepalive_timeout_ms': 20_000,
    'grpc.max_connection_idle_ms': config.handshakeTimeoutMs,
  };
}

/** TLS (mTLS when a CA is configured) or, only for --insecure on loopback, plaintext. */
export function tcpCredentials(config: Pick<Config, 'tls' | 'insecure' | 'handshakeTimeoutMs'>, host: string): grpc.ServerCredentials {
  if (config.tls) {
    const { certFile, keyFile, caFile } = config.tls;
    const ca = caFile ? fs.readFileSync(caFile) : null;
    // checkClientCertificate: with a CA, the handshake fails for a client without a certificate it signed.
    const creds = grpc.ServerCredentials.createSsl(ca, [{ private_key: fs.readFileSync(keyFile), cert_chain: fs.readFileSync(certFile) }], ca !== null);
    return withHandshakeTimeout(creds, config.handshakeTimeoutMs);
  }
  // loadConfig already refuses this; checked again because plaintext on a routable address is never OK.
  if (!config.insecure || !isLoopbackHost(host)) throw new Error('TCP requires --tls-cert/--tls-key (or --insecure on a loopback address)');
  return grpc.ServerCredentials.createInsecure();
}

/** Resolves true when something accepts connections on the socket (a live server we must not unlink). */
function socketIsLive(socketPath: string): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ path: socketPath });
    const done = (live: boolean | Error) => {
      s.destroy();
      clearTimeout(timer);
      if (live instanceof Error) reject(live);
      else resolve(live);
    };
    const timer = setTimeout(() => done(true), 1000); // accepted-but-silent or slow: assume alive
    s.once('connect', () => done(true));
    s.once('error', (e: NodeJS.ErrnoException) =>
      done(e.code === 'ECONNREFUSED' || e.code === 'ENOENT' ? false : new Error(`cannot probe ${socketPath}: ${e.message}`)),
    );
  });
}

/**
 * Whoever owns the socket's directory can replace the socket under the clients (e.g. a
 * /tmp/vcpud-UID made in advance by another user): only ours or root's is used.
 */
async function refuseForeignDirectory(dir: string): Promise<void> {
  const uid = process.getuid?.();
  const owner = (await fs.promises.stat(dir)).uid;
  if (uid !== undefined && owner !== uid && owner !== 0)
    throw new Error(`the socket directory ${dir} belongs to uid ${owner}, not to this user (uid ${uid}) or root: choose another --listen`);
}

/**
 * Makes `socketPath` bindable: creates its directory (mode 0700, plus search permission for the group
 * or others when socketMode grants them access, since they could not reach the socket otherwise) and
 * removes a stale socket left by a crashed vcpud. Refuses to remove anything that is not a socket, or a
 * socket some process still listens on.
 */
export async function prepareUnixSocketPath(socketPath: string, socketMode: number): Promise<void> {
  const dir = path.dirname(socketPath);
  const dirMode = 0o700 | (socketMode & 0o060 ? 0o010 : 0) | (socketMode & 0o006 ? 0o001 : 0);
  const created = await fs.promises.mkdir(dir, { recursive: true, mode: dirMode });
  // mkdir's mode passes through the umask; only a directory we created is ours to chmod.
  if (created !== undefined) await fs.promises.chmod(dir, dirMode);
  else await refuseForeignDirectory(dir);

  let stat: fs.Stats;
  try {
    stat = await fs.promises.lstat(socketPath);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw e;
  }
  if (!stat.isSocket()) throw new Error(`${socketPath} exists and is not a socket; refusing to delete it`);
  if (await socketIsLive(socketPath)) throw new Error(`${socketPath} is in use: another server is listening on it`);
  await fs.promises.rm(socketPath, { force: true });
}

/** Removes the socket file on shutdown (only if it still is a socket). */
export async function removeUnixSocket(socketPath: string): Promise<void> {
  try {
    if ((await fs.promises.lstat(socketPath)).isSocket()) await fs.promises.rm(socketPath, { force: true });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
}

/** A listener bound: where, and the handle that stops it accepting. */
export interface Bound {
  address: BoundAddress;
  listener: GrpcListener;
}

async function listenOrExplain(
  server: grpc.Server,
  address: string,
  target: ListenTarget,
  creds: grpc.ServerCredentials,
  gate: ConnectionGate,
): Promise<GrpcListener> {
  try {
    return await listenGrpc(server, target, creds, gate);
  } catch (e) {
    throw new Error(`cannot listen on ${address}: ${(e as Error).message}`);
  }
}

/**
 * Binds the API server to config.listen, its connections admitted by `gate`, and returns the bound
 * address (the real port when 0 was asked).
 * Unix: the socket is chmod-ed to socketMode right after bind; until then it is reachable only through
 * its directory, which is ours (0700) when we created it.
 */
export async function bindServer(server: grpc.Server, config: Config, gate: ConnectionGate): Promise<Bound> {
  const listen = parseListenAddress(config.listen);
  if (listen.kind === 'unix') {
    await prepareUnixSocketPath(listen.path, config.socketMode);
    const address = formatListenAddress(listen);
    const listener = await listenOrExplain(server, address, { path: listen.path }, grpc.ServerCredentials.createInsecure(), gate);
    await fs.promises.chmod(listen.path, config.socketMode);
    return { address: { kind: 'unix', path: listen.path, address }, listener };
  }
  const listener = await listenOrExplain(server, formatListenAddress(listen), listen, tcpCredentials(config, listen.host), gate);
  const port = listener.port;
  return { address: { kind: 'tcp', host: listen.host, port, address: formatListenAddress({ ...listen, port }) }, listener };
}

/**
 * Binds a plaintext server on `hostPort`. Only for the health-only probe server: Kubernetes gRPC
 * probes speak plaintext to the pod IP, and grpc.health.v1 reveals nothing but serving status.
 */
export async function bindPlaintextTcp(server: grpc.Server, hostPort: string, gate: ConnectionGate): Promise<Bound> {
  const { host, port: wanted } = parseHostPort(hostPort);
  const address = formatListenAddress({ kind: 'tcp', host, port: wanted });
  const listener = await listenOrExplain(server, address, { host, port: wanted }, grpc.ServerCredentials.createInsecure(), gate);
  const port = listener.port;
  return { address: { kind: 'tcp', host, port, address: formatListenAddress({ kind: 'tcp', host, port }) }, listener };
}
