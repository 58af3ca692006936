/**
 * Migration between two registries of one process, on the real kernel: the source engine
 * (src/vm/migration/outgoing.ts) and an incoming migration whose data connection is served on a unix
 * socket, as the destination vcpud would serve it. Call inside a describe: it registers the hooks that
 * open KVM and make the registries (beforeAll), destroy every VM and close every socket after each test,
 * and close KVM and remove the sockets' directory at the end.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { serveDataConnection } from '../../src/server/services/migration-service';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { IncomingMigration } from '../../src/vm/migration/incoming';
import type { MigrationOptions } from '../../src/vm/migration/outgoing';
import type { SnapshotHeader } from '../../src/vm/snapshot-format';
import { VmRegistry } from '../../src/vm/registry';
import { testMemorySource } from './kvm';

export interface InProcessMigration {
  /** Set by the beforeAll hook. */
  kvm: Kvm;
  caps: HostCapabilities;
  source: VmRegistry;
  dest: VmRegistry;
  /** Where the data sockets (and any proxy's) go. */
  readonly dir: string;
  /** Sockets and servers closed after each test. */
  readonly sockets: Set<net.Socket>;
  readonly servers: Set<net.Server>;
  /** An incoming migration prepared on `dest`, its data connection served on the returned socket path. */
  prepare(header: SnapshotHeader): Promise<{ incoming: IncomingMigration; socket: string }>;
  /** DestinationControl.connect for a `unix:` endpoint. */
  connect(endpoint: string): Promise<net.Socket>;
  /** migrateVm's options for `vm` as these tests use them (pre-copy, no bandwidth cap), with `overrides`. */
  options(vm: ManagedVm, overrides: Partial<MigrationOptions>): MigrationOptions;
}

export function inProcessMigration(memoryBytes: number, stallMs: number): InProcessMigration {
  const memorySource = testMemorySource();
  const env = {
    dir: fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-mig-')),
    sockets: new Set<net.Socket>(),
    servers: new Set<net.Server>(),
    async prepare(header: SnapshotHeader) {
      const incoming = await IncomingMigration.prepare(env.dest, env.caps, header, { stallMs, checkLimits: () => {} });
      const socket = path.join(env.dir, `dst-${incoming.id}.sock`);
      const server = net.createServer((s) => serveDataConnection(s, incoming, stallMs, () => server.close()));
      env.servers.add(server);
      await new Promise<void>((r) => server.listen(socket, r));
      void incoming.done().then(() => server.close());
      return { incoming, socket };
    },
    connect: (endpoint: string) =>
      new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect({ path: endpoint.slice('unix:'.length) });
        env.sockets.add(s);
        s.once('connect', () => resolve(s));
        s.once('error', reject);
      }),
    options: (vm: ManagedVm, overrides: Partial<MigrationOptions>): MigrationOptions => ({
      caps: env.caps,
      mode: 'pre-copy',
      maxDowntimeMs: 50,
      bandwidth: 0,
      completionTimeoutPerGiBMs: 150_000,
      abortOnNoProgress: false,
      leavePaused: false,
      stallMs,
      signal: new AbortController().signal,
      onProgress: () => {},
      destroySource: () => env.source.destroy(vm.id),
      ...overrides,
    }),
  } as InProcessMigration;

  beforeAll(() => {
    env.kvm = Kvm.open();
    env.caps = probeCapabilities(env.kvm);
    const limits = { maxVms: 2, maxVcpusPerVm: 1, maxMemoryPerVmBytes: memoryBytes, maxMemoryTotalBytes: 2 * memoryBytes };
    env.source = new VmRegistry(env.kvm, limits, memorySource);
    env.dest = new VmRegistry(env.kvm, limits, memorySource);
  });
  afterEach(() => {
    env.source.destroyAll();
    env.dest.destroyAll();
    for (const s of env.sockets) s.destroy();
    for (const s of env.servers) s.close();
  });
  afterAll(() => {
    env.kvm.close();
    fs.rmSync(env.dir, { recursive: true, force: true });
  });
  return env;
}
