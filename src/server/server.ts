/**
 * Assembles the vcpud gRPC server: interceptors and options, health, the given services, reflection,
 * the listeners (API, optional plaintext health-only server, metrics HTTP), and an orderly shutdown.
 * It knows nothing about KVM: main.ts builds the services and decides when health turns SERVING.
 */
import fs from 'node:fs';
import type http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { ReflectionService } from '@grpc/reflection';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import type { Config } from './config';
import type { Health } from './health';
import { buildInterceptors, loggingInterceptor, metricsInterceptor, rpcLabels } from './interceptors';
import type { Logger } from './logging';
import type { Metrics } from './metrics';
import { vcpudPackageDefinition } from './proto';
import { bindPlaintextTcp, bindServer, healthServerOptions, removeUnixSocket, serverOptions, type BoundAddress } from './transport';

/** Something that adds its gRPC service(s) to a server (the vcpud services, or a test's). */
export interface ServiceRegistrar {
  register(server: grpc.Server): void;
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

const REFLECTION_SERVICES = ['grpc.reflection.v1.ServerReflection', 'grpc.reflection.v1alpha.ServerReflection'];

/**
 * Descriptors of grpc.health.v1 and of the reflection service itself, so a grpcurl-style listing
 * shows everything the server answers, as grpc-go's servers do.
 */
function infrastructureDefinitions(): protoLoader.PackageDefinition {
  const defs: protoLoader.PackageDefinition[] = [protoLoader.loadSync(healthProtoPath)];
  const reflectionProtos = path.join(path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');
  for (const version of ['v1', 'v1alpha']) {
    const file = path.join('grpc', 'reflection', version, 'reflection.proto');
    if (fs.existsSync(path.join(reflectionProtos, file))) defs.push(protoLoader.loadSync(file, { includeDirs: [reflectionProtos] }));
  }
  return Object.assign({}, ...defs);
}

/** The package name of '/pkg.Service/Method'. */
const serviceOfPath = (p: string) => p.split('/')[1];

/**
 * Records which services get registered (reflection lists exactly those) and creates their metric
 * series at zero. grpc-js offers no listing of registered services, hence the wrapper.
 */
function trackRegistrations(server: grpc.Server, metrics: Metrics): Set<string> {
  const registered = new Set<string>();
  const addService = server.addService.bind(server);
  server.addService = (service, implementation) => {
    addService(service, implementation);
    for (const method of Object.values(service)) {
      registered.add(serviceOfPath(method.path));
      metrics.initializeMethod(rpcLabels(method));
    }
  };
  return registered;
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
  const server = new grpc.Server({ ...serverOptions(config), interceptors: buildInterceptors({ metrics, logger, allowedClients }) });
  const registered = trackRegistrations(server, metrics);

  health.register(server);
  for (const s of deps.services) s.register(server);

  const definition: protoLoader.PackageDefinition = Object.assign(
    {},
    vcpudPackageDefinition(),
    infrastructureDefinitions(),
    ...deps.services.map((s) => s.packageDefinition ?? {}),
  );
  const listed = [...registered, ...REFLECTION_SERVICES].sort();
  new ReflectionService(definition, { services: listed }).addToServer(server);

  let healthServer: grpc.Server | undefined;
  let metricsServer: http.Server | undefined;
  const addresses: Partial<ServerAddresses> = {};
  try {
    addresses.api = await bindServer(server, config);
    if (config.healthListen) {
      healthServer = new grpc.Server({ ...healthServerOptions(), interceptors: [metricsInterceptor(metrics), loggingInterceptor(logger)] });
      health.register(healthServer);
      addresses.health = await bindPlaintextTcp(healthServer, config.healthListen);
    }
    if (config.metricsListen) {
      metricsServer = await metrics.serve(config.metricsListen);
      const a = metricsServer.address() as AddressInfo;
      addresses.metrics = { host: a.address, port: a.port, address: a.family === 'IPv6' ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}` };
    }
  } catch (e) {
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
    services: listed,
  });

  let stopping: Promise<void> | undefined;
  const shutdown = (graceMs: number = config.shutdownGraceMs): Promise<void> =>
    (stopping ??= (async () => {
      logger.info('shutting down', { grace_ms: graceMs });
      health.setNotServing('shutting down');
      await tryShutdown(server, graceMs);
      // The probe server goes last, so probes keep seeing NOT_SERVING while calls drain.
      if (healthServer) await tryShutdown(healthServer, 0);
      if (metricsServer) await closeHttp(metricsServer);
      if (bound.api.kind === 'unix') await removeUnixSocket(bound.api.path);
      logger.info('stopped');
    })());

  return { server, addresses: bound, services: listed, shutdown };
}
