/** What a migration source sends PrepareIncomingMigration, for tests that play the source themselves. */
import { probeCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { anonymousMemory } from '../../src/vm/guest-memory';
import { VmRegistry } from '../../src/vm/registry';
import { snapshotHeader } from '../../src/vm/snapshot-writer';

/** A snapshot-format header of a `bytes` VM of this host (one paused vCPU), as JSON (the VM made to describe is gone). */
export function migrationHeaderJson(bytes: number): Buffer {
  const kvm = Kvm.open();
  const registry = new VmRegistry(kvm, undefined, anonymousMemory);
  try {
    const vm = registry.create({ memoryBytes: bytes, vcpuCount: 1 });
    const vcpus = vm.vcpus.map((v) => ({ id: v.id, runState: 'paused' as const, sections: [], nestedSize: 0, msrsUnreadable: [] }));
    return Buffer.from(JSON.stringify(snapshotHeader(vm, probeCapabilities(kvm), vcpus, [])));
  } finally {
    registry.destroyAll();
    kvm.close();
  }
}
