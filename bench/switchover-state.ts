/**
 * The switch-over's per-vCPU state work, in this process (no migration): what the source does with a
 * paused vCPU's state and what the destination's commit does to apply it, each the way it is done now
 * beside the way it was (kept here as the reference). CPU microseconds per call (process.cpuUsage,
 * median of 5 batches): other processes on a loaded host inflate CPU time less than wall time.
 *
 * - capture: every section of one vCPU as snapshot records. Before: readState (an ioctl call per
 *   section, decoded) and each section's codec encode; now: readStateBytes (one native call, the
 *   kernel's bytes are the records) as captureState does.
 * - write: those sections into a new vCPU. Before: writeState (each section read back first, for a
 *   rollback); now: writeFreshState (nothing to roll back in a VM destroyed on failure).
 * - create: the VM made from a prepared KVM VM (its memory slot in place). Before: create makes the
 *   vCPUs and sets their CPUID; now: prepareKvmVm made them while memory arrived.
 *
 *   npx tsc -p tsconfig.json && node dist/bench/switchover-state.js      (BENCH_N calls per batch, default 200; create: N/10)
 */
import { probeCapabilities } from '../src/ffi/capabilities';
import { Kvm } from '../src/ffi/kvm';
import { SECTIONS, type SectionName } from '../src/ffi/sections';
import { anonymousMemory } from '../src/vm/guest-memory';
import { ManagedVm } from '../src/vm/managed-vm';
import { VmRegistry } from '../src/vm/registry';
import { sectionRecord } from '../src/vm/snapshot-writer';
import { readState, readStateBytes, writeFreshState, writeState } from '../src/vm/vcpu-state';
import { fatal, knob, median, table } from './floors';
import { cpuUsPerCallAsync } from './getstate-stages';

const N = Number(knob('BENCH_N', '200', 'switchover-state: calls per batch (5 batches per stage)'));
const MiB = 1024 * 1024;
const MEMORY = 16 * MiB;

/** CPU microseconds per call of `fn` (awaited when it returns a promise): median of 5 batches of N. */
const cpuUsPerCall = (fn: () => unknown) => cpuUsPerCallAsync(async () => fn(), N);

async function main(): Promise<void> {
  const kvm = Kvm.open();
  const caps = probeCapabilities(kvm);
  const registry = new VmRegistry(kvm, { maxVms: 4, maxVcpusPerVm: 1, maxMemoryPerVmBytes: MEMORY, maxMemoryTotalBytes: 4 * MEMORY }, anonymousMemory);
  try {
    const vm = registry.create({ memoryBytes: MEMORY, vcpuCount: 1 });
    const vcpu = vm.vcpus[0].vcpu;
    const ctx = { caps, irqchip: vm.vm.hasIrqchip };
    const encode = (name: string, value: unknown) => (SECTIONS[name as SectionName] as unknown as { encode(v: unknown): Buffer }).encode(value);
    const capture = {
      before: await cpuUsPerCall(() => {
        for (const [name, value] of Object.entries(readState(vcpu, ctx, []).values)) encode(name, value);
      }),
      readBytes: await cpuUsPerCall(() => readStateBytes(vcpu, ctx, [])),
      after: await cpuUsPerCall(() => {
        for (const [name, value] of Object.entries(readStateBytes(vcpu, ctx, []).values)) sectionRecord(name as SectionName, value);
      }),
    };

    const values = readState(vcpu, ctx, []).values;
    const target = registry.create({ memoryBytes: MEMORY, vcpuCount: 1 }).vcpus[0].vcpu;
    const write = {
      before: await cpuUsPerCall(() => writeState(target, ctx, values)),
      after: await cpuUsPerCall(() => writeFreshState(target, ctx, values)),
    };

    const spec = { memoryBytes: MEMORY, vcpuCount: 1 };
    const createFrom = async (cpuid?: typeof vm.cpuid): Promise<number> => {
      const times: number[] = [];
      for (let i = 0; i < Math.max(5, N / 10); i++) {
        const prepared = await ManagedVm.prepareKvmVm(kvm, spec, registry.memory.allocate(MEMORY), cpuid);
        const t = process.cpuUsage();
        const made = registry.create(spec, { vm: prepared, cpuid: vm.cpuid });
        const u = process.cpuUsage(t);
        times.push(u.user + u.system);
        registry.destroy(made.id);
      }
      return median(times);
    };
    const create = { before: await createFrom(), after: await createFrom(vm.cpuid) };

    console.log(
      table(
        ['stage (one vCPU)', 'before, CPU us', 'now, CPU us', 'now / before'],
        [
          ['capture: sections as records', capture.before, capture.after, (capture.after / capture.before).toFixed(2)],
          ['  of which readStateBytes', '', capture.readBytes, ''],
          ['write: sections into a new vCPU', write.before, write.after, (write.after / write.before).toFixed(2)],
          ['create: the VM from a prepared KVM VM', create.before, create.after, (create.after / create.before).toFixed(2)],
        ],
      ),
    );
  } finally {
    registry.destroyAll();
    kvm.close();
  }
}

if (require.main === module) main().catch(fatal);
