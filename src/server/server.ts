/**
 * Assembles the vcpud gRPC server: interceptors and options, health, the given services, reflection,
 * the listeners (API, optional plaintext health-only server, metrics HTTP), and an orderly shutdown.
 * It knows nothing about KVM: main.ts builds the services and decides when health turns SERVING.
 */
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as grpc from '@grpc/grpc-js';
import type * as protoLoader from '@grpc/proto-loader';
import type { Config } from './config';
import type { Health } from './health';
import { buildInterceptors, metricsAndLoggingInterceptor, rpcLabels } from './interceptors';
import type { Logger } from './logging';
import type { Metrics } from './metrics';
import { addReflection, DescriptorIndex, readDescriptorSet, REFLECTION_SERVICES, splitFileDescriptorSet } from './reflection';
import { requestLimitsInterceptor } from './request-limits';
import { bindPlaintextTcp, bindServer, healthServerOptions, removeUnixSocket, serverOptions, type BoundAddress } from './transport';
import { ConnectionGate, descriptorLimit, type GrpcListener, type ListenerName } from './connections';

/**
 * Where a service adds itself: a grpc.Server, or the API server's recording sink (createVcpudServer).
 * grpc-health-check's addToServer takes the same shape.
 */
export type ServiceSink = Pick<grpc.Server, 'addService'>;

/** Something that adds its gRPC service(s) to a server (the vcpud services, or a test's). */
export interface ServiceRegistrar {
  register(server: ServiceSink): void;
  /** Descriptors of services outside protos/ (tests), so reflection can describe them too. */
  packageDefinition?: protoLoader.PackageDefinition;
}

export interface ServerDeps {
  logger: Logger;
  metrics: Metrics;
  health: Health;
  services: ServiceRegistrar[];
}

export interface ServerAddresses {
  /** The API listener: unix socket or TCP with the port actually bound. */
  api: BoundAddress;
  /** The plaintext grpc.health.v1-only listener, when healthListen is set. */
  health?: BoundAddress;
  /** The Prometheus endpoint, when metricsListen is set. */
  metrics?: { host: string; port: number; address: string };
}

export interface RunningServer {
  server: grpc.Server;
  addresses: ServerAddresses;
  /** Services registered on the API server (what reflection lists). */
  services: string[];
  /**
   * Health NOT_SERVING, then tryShutdown (in-flight calls finish, new ones are refused), forceShutdown
   * after `graceMs` (default config.shutdownGraceMs), then the health and metrics listeners close and
   * the socket file is removed. Idempotent.
   */
  shutdown(graceMs?: number): Promise<void>;
}

/** The descriptors proto-loader synthesized for a test's own services (message and enum entries carry them). */
function synthesizedFiles(definition: protoLoader.PackageDefinition | undefined): Uint8Array[] {
  const isType = (d: protoLoader.AnyDefinition): d is protoLoader.MessageTypeDefinition<object, object> | protoLoader.EnumTypeDefinition => 'format' in d;
  return Object.values(definition ?? {}).flatMap((d) => (isType(d) ? d.fileDescriptorProtos : []));
}

/** The package name of '/pkg.Service/Method'. */
const serviceOfPath = (p: string) => p.split('/')[1];

/**
 * The sink every service of the API server registers through: it adds to `server`, records which
 * services were registered (reflection lists exactly those; grpc-js offers no listing) and creates
 * their metric series at zero.
 */
function recordingSink(server: grpc.Server, metrics: Metrics): { sink: ServiceSink; registered: Set<string> } {
  const registered = new Set<string>();
  const sink: ServiceSink = {
    addService(service, implementation) {
      server.addService(service, implementation);
      for (const method of Object.values(service)) {
        registered.add(serviceOfPath(method.path));
        metrics.initializeMethod(rpcLabels(method));
      }
    },
  };
  return { sink, registered };
}

/**
 * Connections the health and metrics listeners each keep open at most: probes and scrapes come a few
 * at a time, and these ports may be reachable from the whole pod network.
 */
export const PROBE_MAX_CONNECTIONS = 16;

/** Descriptors vcpud holds with no connection and no VM (23 measured on Node 20), with room. */
const OWN_DESCRIPTORS = 64;

/** Warns when descriptors would run out before the connection caps refuse anything. */
function checkDescriptorBudget(config: Config, logger: Logger): number | undefined {
  const limit = descriptorLimit();
  const connections = config.maxConnections + 2 * PROBE_MAX_CONNECTIONS;
  if (limit !== undefined && limit < connections + OWN_DESCRIPTORS)
    logger.warn('RLIMIT_NOFILE is below what the connection caps allow: descriptors can run out first (calls then fail with EMFILE)', {
      fd_limit: limit,
      max_connections: config.maxConnections,
      needed_without_vms: connections + OWN_DESCRIPTORS,
    });
  return limit;
}

function tryShutdown(server: grpc.Server, graceMs: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      server.forceShutdown(); // cancels what is still running; clients see CANCELLED/UNAVAILABLE
      resolve();
    }, graceMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

function closeHttp(server: http.Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections(); // keep-alive scrapers would otherwise hold close() open
  });
}

export async function createVcpudServer(config: Config, deps: ServerDeps): Promise<RunningServer> {
  const { logger, metrics, health } = deps;
  // Authz only where it means something: mTLS (a CA verified the client) with a non-empty allowlist.
  const allowedClients = config.tls?.caFile ? config.tls.allowedClients : [];
  // The request limits go first: grpc-js hands its base call (whose reassembly they replace) to the first interceptor.
  const interceptors = [requestLimitsInterceptor(config, logger), ...buildInterceptors({ metrics, logger, allowedClients })];
  const server = new grpc.Server({ ...serverOptions(config), interceptors });
  const { sink, registered } = recordingSink(server, metrics);

  health.register(sink);
  for (const s of deps.services) s.register(sink);

  // The built descriptors (vcpud.v1, health, reflection) go first: they win over synthesized ones.
  const index = new DescriptorIndex().add(splitFileDescriptorSet(readDescriptorSet()));
  for (const s of deps.services) index.add(synthesizedFiles(s.packageDefinition));
  const listed = [...registered, ...REFLECTION_SERVICES].sort();
  addReflection(server, index, listed);

  const gate = (listener: ListenerName, max: number) => new ConnectionGate(listener, max, metrics.connectionEvents(listener, max), logger);
  const gates = { api: gate('api', config.maxConnections), health: gate('health', PROBE_MAX_CONNECTIONS), metrics: gate('metrics', PROBE_MAX_CONNECTIONS) };
  const listeners: Partial<Record<'api' | 'health', GrpcListener>> = {};
  let healthServer: grpc.Server | undefined;
  let metricsServer: http.Server | undefined;
  const addresses: Partial<ServerAddresses> = {};
  try {
    ({ address: addresses.api, listener: listeners.api } = await bindServer(server, config, gates.api));
    if (config.healthListen) {
      healthServer = new grpc.Server({ ...healthServerOptions(config), interceptors: [metricsAndLoggingInterceptor(metrics, logger)] });
      health.register(healthServer);
      ({ address: addresses.health, listener: listeners.health } = await bindPlaintextTcp(healthServer, config.healthListen, gates.health));
    }
    if (config.metricsListen) {
      metricsServer = await metrics
        .serve(config.metricsListen, { gate: gates.metrics, idleMs: config.handshakeTimeoutMs })
        .catch((e: NodeJS.ErrnoException) => {
          throw metricsListenError(config.metricsListen, e);
        });
      const a = metricsServer.address() as AddressInfo;
      addresses.metrics = { host: a.address, port: a.port, address: a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}` };
    }
  } catch (e) {
    listeners.api?.stopAccepting();
    listeners.health?.stopAccepting();
    server.forceShutdown();
    healthServer?.forceShutdown();
    if (metricsServer) await closeHttp(metricsServer);
    if (addresses.api?.kind === 'unix') await removeUnixSocket(addresses.api.path).catch(() => {});
    throw e;
  }
  const bound = addresses as ServerAddresses;
  logger.info('listening', {
    api: bound.api.address,
    tls: config.tls ? (config.tls.caFile ? 'mtls' : 'tls') : 'none',
    health: bound.health?.address,
    metrics: bound.metrics?.address,
    max_connections: config.maxConnections,
    handshake_timeout_ms: config.handshakeTimeoutMs,
    fd_limit: checkDescriptorBudget(config, logger),
    services: listed,
  });

  let stopping: Promise<void> | undefined;
  const shutdown = (graceMs: number = config.shutdownGraceMs): Promise<void> =>
    (stopping ??= (async () => {
      logger.info('shutting down', { grace_ms: graceMs });
      health.setNotServing('shutting down');
      listeners.api?.stopAccepting();
      await tryShutdown(server, graceMs);
      gates.api.destroyAll(); // connections grpc-js never took over (mid-handshake)
      // The probe server goes last, so probes keep seeing NOT_SERVING while calls drain.
      listeners.health?.stopAccepting();
      if (healthServer) await tryShutdown(healthServer, 0);
      gates.health.destroyAll();
      if (metricsServer) await closeHttp(metricsServer);
      if (bound.api.kind === 'unix') await removeUnixSocket(bound.api.path);
      logger.info('stopped');
    })());

  return { server, addresses: bound, services: listed, shutdown };
}

/**
 * The metrics listener could not bind: say that it is the metrics listener and how to move it, since
 * the usual cause is a second vcpud on the same host with the default --metrics-listen.
 */
export function metricsListenError(address: string, e: NodeJS.ErrnoException): Error {
  const hint =
    e.code === 'EADDRINUSE'
      ? `the port is in use (another vcpud on this host?): give this vcpud its own --metrics-listen HOST:PORT (127.0.0.1:0 picks a free port) or --metrics-listen '' for no metrics endpoint`
      : `check --metrics-listen (or VCPUD_METRICS_LISTEN; '' turns the endpoint off)`;
  return new Error(`cannot serve metrics on ${address} (--metrics-listen): ${e.code ?? e.message}: ${hint}`);
}
