#!/usr/bin/env node
/**
 * The vcpud entry point: configuration, /dev/kvm and its capabilities, the VM registry, the gRPC
 * services, metrics and health; graceful shutdown on SIGTERM/SIGINT.
 *
 * Without a usable /dev/kvm vcpud stays up (unless --exit-on-kvm-error) so that health reports
 * NOT_SERVING with the reason and the VcpuState/Vm RPCs answer UNAVAILABLE naming it.
 */
import './heap-limits'; // first: before start-up allocates
import { VcpudError } from '../errors';
import { probeCapabilities, type HostCapabilities } from '../ffi/capabilities';
import { Kvm } from '../ffi/kvm';
import { setIoctlObserver } from '../ffi/observe';
import fs from 'node:fs';
import { anonymousMemory, StateDirMemory } from '../vm/guest-memory';
import { restoreHandover, saveHandover } from '../vm/handover';
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
  /** With --state-dir: guest memory files there, and the restart handover. */
  stateDir?: StateDirMemory;
}

function openHost(config: Config, stateDir?: StateDirMemory): Host {
  const kvm = Kvm.open(config.kvmPath);
  try {
    const caps = probeCapabilities(kvm);
    return { kvm, caps, registry: new VmRegistry(kvm, config.limits, stateDir ?? anonymousMemory), stateDir };
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
    stateBytes: (section) => metrics.stateBytesRecorder(section),
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

  // A signal during the start (a restore can take a while) is obeyed once the server is up, so a
  // SIGTERM then still hands the VMs over instead of killing the process with them.
  let stopOnSignal: ((signal: string) => void) | undefined;
  let early: string | undefined;
  const onSignal = (signal: string) => (stopOnSignal ? stopOnSignal(signal) : (early ??= signal));
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));

  // Before KVM: a state directory another vcpud uses stops the start (its VMs' files are at stake).
  const stateDir = config.stateDir ? StateDirMemory.lock(config.stateDir) : undefined;
  let host: Host | undefined;
  let kvmFailure: unknown;
  let kvmError = '';
  try {
    host = openHost(config, stateDir);
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

  if (host?.stateDir) await resumeHandedOver(host, host.stateDir, logger, metrics);

  const migration = new MigrationService(ctx, { stallMs: config.migrationStallTimeoutMs, tls: config.tls, metrics });
  const running: RunningServer = await createVcpudServer(config, {
    logger,
    metrics,
    health,
    services: [
      new VcpuStateService(ctx),
      new VmService(ctx),
      new SnapshotService(ctx, {
        snapshotDir: config.snapshotDir,
        migrationTls: config.migrationTls,
        uploadStallTimeoutMs: config.uploadStallTimeoutMs,
        migration,
      }),
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
    state_dir: config.stateDir ?? '',
  });

  const stop = async (signal: string) => {
    if (shuttingDown) return;
    shuttingDown = true;
    logger.info('shutting down', { signal, grace_ms: config.shutdownGraceMs });
    await running.shutdown(config.shutdownGraceMs);
    if (host?.stateDir && signal === 'SIGTERM') await handOver(host, host.stateDir, logger);
    else host?.registry.destroyAll();
    host?.kvm.close();
    logger.info('stopped');
    process.exit(0);
  };
  stopOnSignal = (signal) => void stop(signal);
  if (early) stopOnSignal(early);
}

/** A file system whose pages are memory (tmpfs, hugetlbfs): elsewhere guest memory is written back to disk. */
const MEMORY_FS = new Set([0x01021994, 0x958458f6]);

/** Start: the VMs a SIGTERM handed over, running again before the API serves (a refused manifest stops the start). */
async function resumeHandedOver(host: Host, stateDir: StateDirMemory, logger: Logger, metrics: Metrics): Promise<void> {
  const type = fs.statfsSync(stateDir.dir).type;
  if (!MEMORY_FS.has(type))
    logger.warn('the state directory is not on tmpfs or hugetlbfs: guest memory there is written back to its disk', {
      state_dir: stateDir.dir,
      fs_type: `0x${type.toString(16)}`,
    });
  const r = await restoreHandover(host.registry, host.caps, stateDir);
  metrics.recordHandover(r.restored.length, r.failed.length, r.discarded.length, r.ms / 1000);
  if (r.manifest === 'corrupt')
    logger.error('handover manifest is corrupt: no VM was restored, its files were moved aside', { error: r.error ?? '', aside: r.aside ?? '' });
  for (const f of r.failed)
    logger.error('handed-over VM could not be restored: its files were moved aside', { vm_id: f.id, vm_name: f.name, error: f.error, aside: f.aside });
  if (r.discarded.length)
    logger.warn('memory files without a handover manifest were removed: the previous vcpud was killed or crashed and those VMs are lost', {
      files: r.discarded.length,
      state_dir: stateDir.dir,
    });
  if (r.manifest !== 'none')
    logger.info('handover restored', {
      vms: r.restored.length,
      failed: r.failed.length,
      ms: Math.round(r.ms * 10) / 10,
      ids: r.restored.map((v) => v.id).join(','),
    });
}

/** SIGTERM with a state directory: every VM saved for the next start (its memory stays in the files). */
async function handOver(host: Host, stateDir: StateDirMemory, logger: Logger): Promise<void> {
  try {
    const r = await saveHandover(host.registry, host.caps, stateDir);
    for (const f of r.failed) logger.error('VM could not be handed over: it is lost', { vm_id: f.id, vm_name: f.name, error: f.error });
    logger.info('handover saved', { vms: r.saved.length, failed: r.failed.length, ms: Math.round(r.ms * 10) / 10 });
  } catch (e) {
    // No manifest: the next start removes the memory files (the VMs are lost, as after a crash).
    logger.error('handover failed: the VMs will not survive this restart', { error: (e as Error).message });
  }
}

function main(): void {
  let config: Config;
  try {
    config = loadConfig(process.argv.slice(2), process.env);
  } catch (e) {
    if (e instanceof HelpRequested) {
      process.stdout.write(`${usage()}\n`);
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
