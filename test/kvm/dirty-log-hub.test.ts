/**
 * One dirty tracker, several consumers (src/vm/dirty-log-hub.ts) on the real kernel: a live
 * migration's tracker and a VM's incremental-snapshot bases share the VM's KVM dirty log and
 * written-pages record, which both consume what they return. Every consumer sees every page the
 * guest (dirty64) or vcpud (writeMemory) wrote since it last took, whoever harvested first; logging
 * stops with the last consumer only.
 */
import { DirtyLogHub } from '../../src/vm/dirty-log-hub';
import { DirtyTracker } from '../../src/vm/migration/dirty-tracker';
import { DIRTY64, dirty64Control } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { loadGuest, useRegistry, waitForState } from '../support/runtime';

const MiB = 1 << 20;
const MEMORY = 16 * MiB;
const RANGE_START = 8 * MiB;
const N = 77;
const bit = (bm: Buffer, page: number) => (bm[page >> 3] >> (page & 7)) & 1;
const pagesIn = (bm: Buffer, from: number, to: number) => Array.from({ length: to - from }, (_, i) => from + i).filter((p) => bit(bm, p));

describeKvm('dirty log hub: one tracker, several consumers (real KVM)', () => {
  const registry = useRegistry({ maxVms: 1, maxVcpusPerVm: 1, maxMemoryPerVmBytes: MEMORY, maxMemoryTotalBytes: MEMORY });

  it("a migration's tracker and a second consumer each see every page written, whoever harvests first", async () => {
    const vm = registry().create({ memoryBytes: MEMORY, vcpuCount: 1 });
    await loadGuest(vm, 'dirty64');
    vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: RANGE_START, rangePages: 1024, limit: N }));
    const migration = new DirtyTracker(vm.vm);
    migration.start();
    const snapshots = DirtyLogHub.for(vm.vm).subscribe();

    // The guest writes N pages, vcpud one more (4 MiB in).
    await vm.resumeAll();
    await waitForState(vm, 0, 'stopped');
    vm.writeMemory(4 * MiB, Buffer.from('vcpud'));
    const first = RANGE_START / 4096;
    const expected = [1024, ...Array.from({ length: N }, (_, i) => first + i)];

    const [m] = await migration.harvest();
    expect(pagesIn(m, 1024, first + 1024)).toEqual(expected);
    // The migration's harvest consumed KVM's log and the written pages; the other consumer still sees them.
    const [s] = await snapshots.take();
    expect(pagesIn(s, 1024, first + 1024)).toEqual(expected);
    // Each took its own: nothing new for either.
    expect(pagesIn((await migration.harvest())[0], 1024, first + 1024)).toEqual([]);
    expect(pagesIn((await snapshots.take())[0], 1024, first + 1024)).toEqual([]);

    // The migration ends: logging goes on for the other consumer.
    migration.stop();
    expect(vm.vm.dirtyLogMode).toBe('get');
    vm.writeMemory(5 * MiB, Buffer.from('after'));
    expect(pagesIn((await snapshots.take())[0], 1024, first + 1024)).toEqual([1280]);
    snapshots.close();
    expect(vm.vm.dirtyLogMode).toBeUndefined();
  });
});
