/**
 * The switch-over of a pre-copy migration (src/vm/migration/outgoing.ts), in one process on the real
 * kernel: what goes into the paused window. Pages dirtied once go in a pass while the guest runs
 * (a pass that halved the dirty set is followed by another, not by the pause), the heap is
 * collected before the pause, not inside it, and the window's progress is written after the commit.
 */
import fs from 'node:fs';
import { constants, performance, PerformanceObserver, type PerformanceEntry } from 'node:perf_hooks';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { migrateVm, type DestinationControl, type MigrationProgress } from '../../src/vm/migration/outgoing';
import { EnvelopeType } from '../../src/vm/migration/protocol';
import { native } from '../../src/ffi/native';
import { inProcessMigration } from '../support/in-process-migration';
import { describeKvm } from '../support/kvm';

const MiB = 1 << 20;
const MEMORY = 32 * MiB;
const STALL_MS = 2000;
/** The pages vcpud writes into the source while pass 1 runs (tracked as dirty like a guest's writes). */
const DIRTIED = { at: 16 * MiB, pages: 256 };

describeKvm('live migration switch-over: what the paused window holds (real KVM, in process)', () => {
  const m = inProcessMigration(MEMORY, STALL_MS);
  afterEach(() => jest.restoreAllMocks());

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

  it("the data connection's send buffer is widened before the pages go (the kernel's default made the two sides take turns)", async () => {
    const widen = jest.spyOn(native, 'setSendBuffer');
    await migrateDirtiedOnce();
    expect(widen).toHaveBeenCalledTimes(1);
    expect(widen.mock.calls[0][1]).toBe(1024 * 1024);
    const wmemMax = Number(fs.readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    expect(widen.mock.results[0].value).toBe(2 * Math.min(1024 * 1024, wmemMax)); // what the kernel granted, doubled
  });

  /** The destination, recording in `events` the type of every envelope the source writes to it. */
  const recordingDestination = (events: string[]): DestinationControl => ({
    ...destination,
    async connect(endpoint) {
      const socket = await m.connect(endpoint);
      const write = socket.write.bind(socket) as (b: Buffer, ...rest: unknown[]) => boolean;
      // Every envelope's header starts a write: "VMIG", then its type.
      socket.write = ((b: Buffer, ...rest: unknown[]) => {
        if (Buffer.isBuffer(b) && b.length >= 16 && b.readUInt32LE(0) === 0x47494d56) events.push(EnvelopeType[b.readUInt32LE(4)]);
        return write(b, ...rest);
      }) as typeof socket.write;
      return socket;
    },
  });

  it("the paused window's progress (last pass, state, commit) is written once the destination has committed, not inside the downtime", async () => {
    // What the source does, in order: the envelopes it writes on the data connection and its progress reports.
    const events: string[] = [];
    const spied = recordingDestination(events);
    const committedWhenReported: boolean[] = [];
    const vm = m.source.create({ memoryBytes: MEMORY, vcpuCount: 1 });
    vm.writeMemory(4 * MiB, Buffer.alloc(MiB, 1));
    const report = await migrateVm(
      vm,
      spied,
      m.options(vm, {
        onProgress: (p) => {
          events.push(p.switchingOver ? `progress ${p.phase} (switching over)` : `progress ${p.phase}`);
          // The destination's registry has the VM once it committed.
          if (p.switchingOver) committedWhenReported.push(m.dest.list().length === 1);
        },
      }),
    );
    expect(
      m.dest
        .get(report.destinationVmId)
        .readMemory(4 * MiB, MiB)
        .equals(Buffer.alloc(MiB, 1)),
    ).toBe(true);
    const fromPause = events.slice(events.findIndex((e) => e.endsWith('(switching over)')) - 1);
    console.log(`the switch-over as the source made it: ${fromPause.join(', ')}`);
    const commit = events.indexOf('Commit');
    expect(events.indexOf('State')).toBeLessThan(commit);
    const windowProgress = events.filter((e) => e.endsWith('(switching over)'));
    expect(windowProgress).toEqual([
      'progress memory (switching over)',
      'progress state (switching over)',
      'progress sync (switching over)',
      'progress resume (switching over)',
    ]);
    expect(events.findIndex((e) => e.endsWith('(switching over)'))).toBeGreaterThan(commit);
    expect(committedWhenReported).toEqual([true, true, true, true]);
  });

  it("the vCPUs' state is read while the paused pass's pages are sent, before that pass ends", async () => {
    const events: string[] = [];
    const vm = m.source.create({ memoryBytes: MEMORY, vcpuCount: 1 });
    const batchRead = native.getBatch.bind(native);
    jest.spyOn(native, 'getBatch').mockImplementation((...args) => {
      events.push('state read'); // captureState reads each vCPU's sections in one batch
      return batchRead(...args);
    });
    const dirtied = Buffer.alloc(16 * 4096, 0x5a);
    let pausedPassBytes = 0;
    const report = await migrateVm(
      vm,
      recordingDestination(events),
      m.options(vm, {
        onProgress: (p) => {
          events.push(p.switchingOver ? `progress ${p.phase} (switching over)` : `progress ${p.phase}`);
          if (p.switchingOver && p.phase === 'memory') pausedPassBytes = p.bytesRemaining;
          // Written after every harvest, the last one's pages go in the paused pass.
          if (!p.switchingOver && p.expectedDowntimeMs > 0) vm.vm.regions[0].memory.write(DIRTIED.at, dirtied);
        },
      }),
    );
    expect(m.dest.get(report.destinationVmId).readMemory(DIRTIED.at, dirtied.length).equals(dirtied)).toBe(true);
    const paused = events.slice(events.lastIndexOf('PagesStream'));
    console.log(`the paused pass and the state as the source made them: ${paused.join(', ')}`);
    expect(events.filter((e) => e === 'state read')).toEqual(['state read']);
    // The paused pass had pages, and the state was read before that pass's end was written.
    expect(pausedPassBytes).toBe(dirtied.length);
    expect(paused.indexOf('state read')).toBeGreaterThan(0);
    expect(paused.indexOf('state read')).toBeLessThan(paused.indexOf('PassEnd'));
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
