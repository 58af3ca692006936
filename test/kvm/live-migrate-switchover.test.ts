/**
 * The switch-over of a pre-copy migration (src/vm/migration/outgoing.ts), in one process on the real
 * kernel: what goes into the paused window. Pages dirtied once go in a pass while the guest runs
 * (a pass that halved the dirty set is followed by another, not by the pause), and the heap is
 * collected before the pause, not inside it.
 */
import { constants, performance, PerformanceObserver, type PerformanceEntry } from 'node:perf_hooks';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { migrateVm, type DestinationControl, type MigrationProgress } from '../../src/vm/migration/outgoing';
import { inProcessMigration } from '../support/in-process-migration';
import { describeKvm } from '../support/kvm';

const MiB = 1 << 20;
const MEMORY = 32 * MiB;
const STALL_MS = 2000;
/** The pages vcpud writes into the source while pass 1 runs (tracked as dirty like a guest's writes). */
const DIRTIED = { at: 16 * MiB, pages: 256 };

describeKvm('live migration switch-over: what the paused window holds (real KVM, in process)', () => {
  const m = inProcessMigration(MEMORY, STALL_MS);

  const destination: DestinationControl = {
    name: 'the in-process destination',
    async prepare(header) {
      const { incoming, socket } = await m.prepare(header);
      return { migrationId: incoming.id, endpoint: `unix:${socket}`, token: incoming.token };
    },
    connect: m.connect,
    abort: async () => 'aborted',
  };

  /**
   * Migrates a VM whose vCPU never runs; while pass 1 is sent, vcpud writes DIRTIED.pages pages
   * once (nothing writes after). Every progress report is kept with the time it was made.
   */
  async function migrateDirtiedOnce(): Promise<{ vm: ManagedVm; reports: (MigrationProgress & { at: number })[]; moved: ManagedVm }> {
    const vm = m.source.create({ memoryBytes: MEMORY, vcpuCount: 1 });
    for (let gpa = 4 * MiB; gpa < MEMORY; gpa += MiB) vm.writeMemory(gpa, Buffer.alloc(MiB, gpa / MiB));
    const reports: (MigrationProgress & { at: number })[] = [];
    let written = false;
    const report = await migrateVm(
      vm,
      destination,
      m.options(vm, {
        // A budget the pages fit in many times over: the switch waits for the passes, not the budget.
        maxDowntimeMs: 1000,
        onProgress: (p) => {
          reports.push({ ...p, at: performance.now() });
          if (p.pass !== 1 || written) return;
          written = true; // the VM is held (writeMemory refused): its memory is written as a device would
          vm.vm.regions[0].memory.write(DIRTIED.at, Buffer.alloc(DIRTIED.pages * 4096, 0xa5));
        },
      }),
    );
    expect(written).toBe(true);
    return { vm, reports, moved: m.dest.get(report.destinationVmId) };
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
