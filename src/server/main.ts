#!/usr/bin/env node
/**
 * The vcpud entry point: configuration, /dev/kvm and its capabilities, the VM registry, the gRPC
 * services, metrics and health; graceful shutdown on SIGTERM/SIGINT.
 *
 * Without a usable /dev/kvm vcpud stays up (unless --exit-on-kvm-error) so that health reports
 * NOT_SERVING with the reason and the VcpuState/Vm RPCs answer UNAVAILABLE naming it.
 */
import { VcpudError } from '../errors';
import { probeCapabilities, type HostCapabilities } from '../ffi/capabilities';
import { Kvm } from '../ffi/kvm';
import { setIoctlObserver } from '../ffi/observe';
import { VmRegistry } from '../vm/registry';
import { ConfigError, HelpRequested, loadConfig, usage, type Config } from './config';
import { exitReasonName } from './convert';
import { Health } from './health';
import { createLogger, type Logger } from './logging';
import { Metrics } from './metrics';
import { createVcpudServer, type RunningServer } from './server';
import type { ServiceContext } from './services/context';
import { VcpuStateService } from './services/state-service';
import { MigrationService } from './services/migration-service';
import { SnapshotService } from './services/snapshot-service';
import { VmService } from './services/vm-service';


interface Host {
  kvm: Kvm;
  caps: HostCapabilities;
  registry: VmRegistry;
}

function openHost(config: Config): Host {
  const kvm = Kvm.open(config.kvmPath);
  try {
    const caps = probeCapabilities(kvm);
    return { kvm, caps, registry: new VmRegistry(kvm, config.limits) };
  } catch (e) {
    kvm.close();
    throw e;
  }
}

/**
 * Service context whose host facts fail with UNAVAILABLE, reason KVM_UNAVAILABLE (naming why, with the
 * errno when there was one) when KVM could not be opened.
 */
function serviceContext(host: Host | undefined, kvmError: unknown, metrics: Metrics, shuttingDown: () => boolean, config: Config): ServiceContext {
  const need = (): Host => {
    if (host) return host;
    const errno = kvmError instanceof VcpudError ? kvmError.details.errno : undefined;
    throw new VcpudError('unavailable', `vcpud has no usable KVM: ${(kvmError as Error).message}`, { reason: 'KVM_UNAVAILABLE', errno }, { cause: kvmError });
  };
  return {
    get registry() {
      return need().registry;
    },
    get caps() {
      return need().caps;
    },
    recordStateBytes: (section, bytes) => metrics.recordStateBytes(section, bytes),
    shuttingDown,
    allowUnvalidatedNested: config.testAllowUnvalidatedNested,
  };
}

function exitsByReason(registry: VmRegistry): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [k, n] of Object.entries(registry.exitCounts())) out[exitReasonName(k)] = n;
  return out;
}

async function start(config: Config, logger: Logger): Promise<void> {
  const metrics = new Metrics();
  setIoctlObserver(metrics.ioctlObserver());
  const health = new Health({ logger });

  let host: Host | undefined;
  let kvmFailure: unknown;
  let kvmError = '';
  try {
    host = openHost(config);
  } catch (e) {
    kvmFailure = e;
    kvmError = (e as Error).message;
    logger.error('cannot use KVM', { kvm_path: config.kvmPath, error: kvmError });
    if (config.exitOnKvmError) process.exit(1);
  }

  let shuttingDown = false;
  const ctx = serviceContext(host, kvmFailure, metrics, () => shuttingDown, config);
  if (config.testAllowUnvalidatedNested)
    logger.warn('TEST ONLY: SetNestedState honours x-vcpud-skip-validation: 1 (--test-allow-unvalidated-nested); never use this in production');
  if (host) {
    const h = host;
    metrics.setCapabilities(h.caps.caps);
    metrics.setSources({
      vms: () => h.registry.usage().vms,
      vcpus: () => h.registry.usage().vcpus,
      exitsByReason: () => exitsByReason(h.registry),
    });
  }

  const migration = new MigrationService(ctx, { stallMs: config.migrationStallTimeoutMs, tls: config.tls, metrics });
  const running: RunningServer = await createVcpudServer(config, {
    logger,
    metrics,
    health,
    services: [
      new VcpuStateService(ctx),
      new VmService(ctx),
      new SnapshotService(ctx, { snapshotDir: config.snapshotDir, migrationTls: config.migrationTls, uploadStallTimeoutMs: config.uploadStallTimeoutMs, migration }),
      migration,
    ],
  });
  migration.setApiAddress(running.addresses.api);
  if (host) health.setServing();
  else health.setNotServing(`no usable KVM: ${kvmError}`);
  logger.info('vcpud serving', {
    api: running.addresses.api.address,
    metrics: running.addresses.metrics?.address ?? '',
    health: running.addresses.health?.address ?? '',
    kvm: host ? `${host.caps.kvmPath} (${host.caps.kvmModule}, ${host.caps.vendor})` : `unavailable: ${kvmError}`,
    nested: host ? (host.caps.nested.supported ? `max ${host.caps.nested.maxSize} bytes` : host.caps.nested.reason) : '',
  });

  const stop = async (signal: string) => {
    if (shuttingDown) return;
    shuttingDown = true;
    logger.info('shutting down', { signal, grace_ms: config.shutdownGraceMs });
    await running.shutdown(config.shutdownGraceMs);
    host?.registry.destroyAll();
    host?.kvm.close();
    logger.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

function main(): void {
  let config: Config;
  try {
    config = loadConfig(process.argv.slice(2), process.env);
  } catch (e) {
    if (e instanceof HelpRequested) {
      process.stdout.write(usage() + '\n');
      process.exit(0);
    }
    if (e instanceof ConfigError) {
      process.stderr.write(`vcpud: ${e.message}\n\n${usage()}\n`);
      process.exit(2);
    }
    throw e;
  }
  const logger = createLogger({ level: config.logLevel });
  start(config, logger).catch((e) => {
    logger.error('vcpud failed to start', { error: (e as Error).message });
    process.exit(1);
  });
}

main();
