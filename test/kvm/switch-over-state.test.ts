/**
 * The vCPU state a migration's switch-over moves (and a snapshot stores), on the real kernel: how it
 * is read on the source (captureState) and written on the destination (restoreIntoNewVm), the two
 * fixed costs of the guest's paused window. The records are the bytes each section's codec encodes,
 * read in one native call per vCPU; the restore writes each section of the new vCPU without reading
 * it first (nothing to roll back: a failed restore destroys the new VM), into vCPUs made (with their
 * CPUID) while the KVM VM was prepared, before the switch-over.
 */
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { native } from '../../src/ffi/native';
import { setIoctlObserver } from '../../src/ffi/observe';
import { SECTIONS, type SectionName } from '../../src/ffi/sections';
import { ManagedVm } from '../../src/vm/managed-vm';
import { decodeState, encodeState } from '../../src/vm/migration/state-records';
import { VmRegistry } from '../../src/vm/registry';
import { restoreIntoNewVm, restoreSpec } from '../../src/vm/snapshot-restore';
import { captureState, holdAndPause } from '../../src/vm/snapshot-writer';
import { readState } from '../../src/vm/vcpu-state';
import { describeKvm, testMemorySource } from '../support/kvm';
import { loadGuest, waitUntil } from '../support/runtime';

const MiB = 1 << 20;
const MEMORY = 16 * MiB;
const VCPUS = 2;
/** The TSC moves on between two reads; every other MSR of a paused vCPU stays. */
const IA32_TSC = 0x10;
/** A section's codec, by a record's name. */
const codec = (name: string) => SECTIONS[name as SectionName] as unknown as { decode(b: Buffer): unknown; encode(v: unknown): Buffer };

/** The GET ioctl of every section: a restore that reads one first (for a rollback) issues it. */
const SECTION_GETS = new Set([
  'KVM_GET_REGS',
  'KVM_GET_SREGS',
  'KVM_GET_SREGS2',
  'KVM_GET_FPU',
  'KVM_GET_XSAVE',
  'KVM_GET_XSAVE2',
  'KVM_GET_XCRS',
  'KVM_GET_LAPIC',
  'KVM_GET_MSRS',
  'KVM_GET_VCPU_EVENTS',
  'KVM_GET_MP_STATE',
  'KVM_GET_DEBUGREGS',
  'KVM_GET_CPUID2',
  'KVM_GET_TSC_KHZ',
]);

describeKvm('switch-over state: capture and restore of every vCPU section (real KVM)', () => {
  let kvm: Kvm;
  let caps: HostCapabilities;
  let registry: VmRegistry;
  const memorySource = testMemorySource();

  beforeAll(() => {
    kvm = Kvm.open();
    caps = probeCapabilities(kvm);
    registry = new VmRegistry(kvm, { maxVms: 2, maxVcpusPerVm: VCPUS, maxMemoryPerVmBytes: MEMORY, maxMemoryTotalBytes: 2 * MEMORY }, memorySource);
  });
  afterEach(() => {
    setIoctlObserver(undefined);
    jest.restoreAllMocks();
    registry.destroyAll();
  });
  afterAll(() => kvm.close());

  /** A counting guest on every vCPU, held and paused as a migration's switch-over holds it. */
  async function pausedCounter(): Promise<{ vm: ManagedVm; before: Awaited<ReturnType<typeof holdAndPause>>['before'] }> {
    const vm = registry.create({ memoryBytes: MEMORY, vcpuCount: VCPUS });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitUntil(() => vm.console.bytesWritten > 2000, 'counter output');
    const held = await holdAndPause(vm, 'the test');
    return { vm, before: held.before };
  }

  const readAll = (vm: ManagedVm, id: number) => vm.vcpu(id).withState(() => readState(vm.vcpu(id).vcpu, { caps, irqchip: vm.vm.hasIrqchip }, []).values);
  const withoutTsc = <T extends { msrs?: { index: number }[] }>(v: T) => ({ ...v, msrs: (v.msrs ?? []).filter((m) => m.index !== IA32_TSC) });

  it("captures each vCPU's sections with one native call, as the bytes each section's codec encodes", async () => {
    const { vm, before } = await pausedCounter();
    const batches = jest.spyOn(native, 'getBatch');
    const { vcpus } = await captureState(vm, caps, before);
    expect(batches).toHaveBeenCalledTimes(VCPUS);
    for (const [id, captured] of vcpus.entries()) {
      const decoded = Object.fromEntries(captured.records.filter(([name]) => name !== 'nested').map(([name, bytes]) => [name, codec(name).decode(bytes)]));
      const read = await readAll(vm, id);
      expect(Object.keys(decoded)).toEqual(Object.keys(read));
      expect(withoutTsc(decoded)).toEqual(withoutTsc(read));
      // Each record is what the codec makes of its value: a snapshot reader (or an older vcpud) reads it as before.
      for (const [name, bytes] of captured.records)
        if (name !== 'nested') expect({ name, bytes: codec(name).encode(codec(name).decode(bytes)) }).toEqual({ name, bytes });
    }
  });

  it('restores into a new VM writing every section without reading any first, and the copy has the state captured', async () => {
    const { vm, before } = await pausedCounter();
    const state = decodeState(encodeState(await captureState(vm, caps, before)), { memoryBytes: MEMORY, vcpuCount: VCPUS });
    const loaded = { ...state, memory: registry.memory.allocate(MEMORY) };
    const ioctls: string[] = [];
    setIoctlObserver({ onIoctl: (ioctl) => void ioctls.push(ioctl), onNegotiationRetry: () => {} });
    const { vm: copy } = await restoreIntoNewVm(registry, caps, loaded);
    setIoctlObserver(undefined);
    // Every section writable here is written (SET) and none is read: only an unwritable section is
    // read, to check that the restore asks for the value it already has.
    const unwritableGets = new Set(
      Object.entries(caps.sections)
        .filter(([, c]) => c.readable && !c.writable)
        .map(([s]) => s),
    );
    const reads = ioctls.filter((i) => SECTION_GETS.has(i) && !(i === 'KVM_GET_TSC_KHZ' && unwritableGets.has('tsc_khz')));
    expect(reads).toEqual([]);
    expect(ioctls.filter((i) => i === 'KVM_SET_REGS')).toHaveLength(VCPUS);
    for (let id = 0; id < VCPUS; id++) expect(withoutTsc(await readAll(copy, id))).toEqual(withoutTsc(await readAll(vm, id)));
  });

  it("a KVM VM prepared with the snapshot's CPUID has its vCPUs made and set: creating the VM from it makes and sets none", async () => {
    const { vm, before } = await pausedCounter();
    const { header } = await captureState(vm, caps, before);
    const spec = restoreSpec(header, 'copy');
    const prepared = await ManagedVm.prepareKvmVm(kvm, spec, registry.memory.allocate(MEMORY), header.vm.cpuid);
    expect([...prepared.vcpus.keys()]).toEqual([...Array(VCPUS).keys()]);
    const ioctls: string[] = [];
    setIoctlObserver({ onIoctl: (ioctl) => void ioctls.push(ioctl), onNegotiationRetry: () => {} });
    const copy = registry.create(spec, { vm: prepared, cpuid: structuredClone(header.vm.cpuid) });
    setIoctlObserver(undefined);
    expect(ioctls.filter((i) => i === 'KVM_CREATE_VCPU' || i === 'KVM_SET_CPUID2')).toEqual([]);
    expect(copy.vcpus.map((v) => v.vcpu)).toEqual([...prepared.vcpus.values()]);
  });

  it('a KVM VM prepared with another CPUID than the one due gets the one due', async () => {
    const { vm, before } = await pausedCounter();
    const { header } = await captureState(vm, caps, before);
    const spec = restoreSpec(header, 'copy');
    const other = header.vm.cpuid.filter((e) => e.function !== 0x80000008); // a leaf fewer
    const prepared = await ManagedVm.prepareKvmVm(kvm, spec, registry.memory.allocate(MEMORY), other);
    const ioctls: string[] = [];
    setIoctlObserver({ onIoctl: (ioctl) => void ioctls.push(ioctl), onNegotiationRetry: () => {} });
    registry.create(spec, { vm: prepared, cpuid: header.vm.cpuid });
    setIoctlObserver(undefined);
    expect(ioctls.filter((i) => i === 'KVM_CREATE_VCPU' || i === 'KVM_SET_CPUID2')).toEqual(Array(VCPUS).fill('KVM_SET_CPUID2'));
  });
});
