/**
 * The switch-over of a pre-copy migration (src/vm/migration/outgoing.ts), in one process on the real
 * kernel: what goes into the paused window. Pages dirtied once go in a pass while the guest runs
 * (a pass that halved the dirty set is followed by another, not by the pause), and the heap is
 * collected before the pause, not inside it.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { constants, performance, PerformanceObserver, type PerformanceEntry } from 'node:perf_hooks';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { serveDataConnection } from '../../src/server/services/migration-service';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { IncomingMigration } from '../../src/vm/migration/incoming';
import { migrateVm, type DestinationControl, type MigrationProgress } from '../../src/vm/migration/outgoing';
import { VmRegistry } from '../../src/vm/registry';
import { describeKvm, testMemorySource } from '../support/kvm';

const MiB = 1 << 20;
const MEMORY = 32 * MiB;
const STALL_MS = 2000;
/** The pages vcpud writes into the source while pass 1 runs (tracked as dirty like a guest's writes). */
const DIRTIED = { at: 16 * MiB, pages: 256 };

describeKvm('live migration switch-over: what the paused window holds (real KVM, in process)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-mig-switch-'));
  const sockets = new Set<net.Socket>();
  const servers = new Set<net.Server>();
  let kvm: Kvm;
  let caps: HostCapabilities;
  let source: VmRegistry;
  let dest: VmRegistry;
  const memorySource = testMemorySource();

  beforeAll(() => {
    kvm = Kvm.open();
    caps = probeCapabilities(kvm);
    const limits = { maxVms: 2, maxVcpusPerVm: 1, maxMemoryPerVmBytes: MEMORY, maxMemoryTotalBytes: 2 * MEMORY };
    source = new VmRegistry(kvm, limits, memorySource);
    dest = new VmRegistry(kvm, limits, memorySource);
  });
  afterEach(() => {
    source.destroyAll();
    dest.destroyAll();
    for (const s of sockets) s.destroy();
    for (const s of servers) s.close();
  });
  afterAll(() => {
    kvm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const destination: DestinationControl = {
    name: 'the in-process destination',
    async prepare(header) {
      const m = await IncomingMigration.prepare(dest, caps, header, { stallMs: STALL_MS, checkLimits: () => {} });
      const sock = path.join(dir, `dst-${m.id}.sock`);
      const server = net.createServer((s) => serveDataConnection(s, m, STALL_MS, () => server.close()));
      servers.add(server);
      await new Promise<void>((r) => server.listen(sock, r));
      void m.done().then(() => server.close());
      return { migrationId: m.id, endpoint: `unix:${sock}`, token: m.token };
    },
    connect: (endpoint) =>
      new Promise((resolve, reject) => {
        const s = net.connect({ path: endpoint.slice(5) });
        sockets.add(s);
        s.once('connect', () => resolve(s));
        s.once('error', reject);
      }),
    abort: async () => 'aborted',
  };

  /**
   * Migrates a VM whose vCPU never runs; while pass 1 is sent, vcpud writes DIRTIED.pages pages
   * once (nothing writes after). Every progress report is kept with the time it was made.
   */
  async function migrateDirtiedOnce(): Promise<{ vm: ManagedVm; reports: (MigrationProgress & { at: number })[]; moved: ManagedVm }> {
    const vm = source.create({ memoryBytes: MEMORY, vcpuCount: 1 });
    for (let gpa = 4 * MiB; gpa < MEMORY; gpa += MiB) vm.writeMemory(gpa, Buffer.alloc(MiB, gpa / MiB));
    const reports: (MigrationProgress & { at: number })[] = [];
    let written = false;
    const report = await migrateVm(vm, destination, {
      caps,
      mode: 'pre-copy',
      // A budget the pages fit in many times over: the switch waits for the passes, not the budget.
      maxDowntimeMs: 1000,
      bandwidth: 0,
      completionTimeoutPerGiBMs: 150_000,
      abortOnNoProgress: false,
      leavePaused: false,
      stallMs: STALL_MS,
      signal: new AbortController().signal,
      onProgress: (p) => {
        reports.push({ ...p, at: performance.now() });
        if (p.pass !== 1 || written) return;
        written = true; // the VM is held (writeMemory refused): its memory is written as a device would
        vm.vm.regions[0].memory.write(DIRTIED.at, Buffer.alloc(DIRTIED.pages * 4096, 0xa5));
      },
      destroySource: () => source.destroy(vm.id),
    });
    expect(written).toBe(true);
    return { vm, reports, moved: dest.get(report.destinationVmId) };
  }

  it('pages dirtied once during pass 1 go in a pass while the guest runs: the paused pass carries none', async () => {
    const { reports, moved } = await migrateDirtiedOnce();
    // The harvest after pass 1 found them ...
    const afterPass1 = reports.find((r) => r.pass === 1 && r.expectedDowntimeMs > 0);
    expect(afterPass1?.bytesRemaining).toBe(DIRTIED.pages * 4096);
    // ... and the paused pass (its first report) had nothing left to send.
    const paused = reports.find((r) => r.switchingOver && r.phase === 'memory');
    expect(paused).toBeDefined();
    expect(paused?.bytesRemaining).toBe(0);
    expect(paused!.pass).toBeGreaterThan(2);
    expect(moved.readMemory(DIRTIED.at, DIRTIED.pages * 4096).equals(Buffer.alloc(DIRTIED.pages * 4096, 0xa5))).toBe(true);
  });

  it('the heap is collected between the pre-copy passes, before the pause: a major collection ends before the last pre-copy report', async () => {
    const gcs: PerformanceEntry[] = [];
    const observer = new PerformanceObserver((list) => gcs.push(...list.getEntries()));
    observer.observe({ entryTypes: ['gc'] });
    try {
      const { reports } = await migrateDirtiedOnce();
      await new Promise((r) => setTimeout(r, 100)); // the observer hears of entries asynchronously
      const switchAt = reports.findIndex((r) => r.switchingOver);
      const lastPreCopy = reports[switchAt - 1];
      const pass1Done = reports.find((r) => r.pass === 1 && r.expectedDowntimeMs > 0) as { at: number };
      const major = gcs.filter((g) => (g as unknown as { detail: { kind: number } }).detail.kind === constants.NODE_PERFORMANCE_GC_MAJOR);
      const between = major.filter((g) => g.startTime >= pass1Done.at && g.startTime + g.duration <= lastPreCopy.at);
      console.log(
        `major collections between pass 1 and the switch-over: ${between.map((g) => `${g.duration.toFixed(1)} ms`).join(', ') || 'none'}; ` +
          `${reports[switchAt].pass} passes`,
      );
      expect(between.length).toBeGreaterThan(0);
    } finally {
      observer.disconnect();
    }
  });
});
