/** The VMs this vcpud owns, with the configured limits enforced at creation. */
import { invalidArgument, notFound } from '../errors';
import type { Kvm } from '../ffi/kvm';
import type { CpuidEntry2 } from '../ffi/sections';
import { checkCreate, DEFAULT_LIMITS, type Limits } from './limits';
import { ManagedVm, type VmPrepared, type VmSpec } from './managed-vm';
import { checkVmName } from './vm-name';

const PAGE = 4096;

export class VmRegistry {
  private readonly vms = new Map<string, ManagedVm>();
  private supported?: CpuidEntry2[];
  /** Exit counts of destroyed VMs, so exit counters never go down. */
  private readonly retiredExits: Record<string, number> = {};

  constructor(
    readonly kvm: Kvm,
    readonly limits: Limits = DEFAULT_LIMITS,
  ) {}

  /** Refuses (invalid_argument or resource_exhausted) a VM this registry would not create. */
  checkSpec(spec: VmSpec): void {
    checkVmName(spec.name, 'name');
    if (!Number.isSafeInteger(spec.memoryBytes) || spec.memoryBytes <= 0 || spec.memoryBytes % PAGE !== 0)
      throw invalidArgument(`memory_bytes must be a positive multiple of ${PAGE}, got ${spec.memoryBytes}`, [
        { rule: 'page_multiple', field: 'memory_bytes', message: `must be a positive multiple of ${PAGE}` },
      ]);
    if (!Number.isInteger(spec.vcpuCount) || spec.vcpuCount < 1)
      throw invalidArgument(`vcpu_count must be at least 1, got ${spec.vcpuCount}`, [
        { rule: 'min', field: 'vcpu_count', message: 'must be at least 1' },
      ]);
    checkCreate(this.limits, this.usage(), spec.vcpuCount, spec.memoryBytes);
  }

  /** KVM_GET_SUPPORTED_CPUID, asked once. */
  supportedCpuid(): CpuidEntry2[] {
    return (this.supported ??= this.kvm.supportedCpuid());
  }

  /** Creates a VM within the limits; `prepared` (a restore) brings its memory and CPUID. */
  create(spec: VmSpec, prepared?: VmPrepared): ManagedVm {
    try {
      this.checkSpec(spec);
    } catch (e) {
      prepared?.memory?.release();
      prepared?.vm?.close();
      throw e;
    }
    const vm = ManagedVm.create(this.kvm, spec, this.supportedCpuid(), prepared);
    this.vms.set(vm.id, vm);
    return vm;
  }

  get(id: string): ManagedVm {
    const vm = this.vms.get(id);
    if (!vm) throw notFound(`no VM with id "${id}"`, 'VM_NOT_FOUND', 'vm_id');
    return vm;
  }

  list(): ManagedVm[] {
    return [...this.vms.values()];
  }

  destroy(id: string): void {
    const vm = this.get(id);
    addCounts(this.retiredExits, vm.vcpus.map((v) => v.exitCounts()));
    vm.destroy();
    this.vms.delete(id);
  }

  /** vCPU exits by KVM_EXIT_* number since start, destroyed VMs included (a monotonic counter). */
  exitCounts(): Record<string, number> {
    const out = { ...this.retiredExits };
    addCounts(out, this.list().flatMap((vm) => vm.vcpus.map((v) => v.exitCounts())));
    return out;
  }

  destroyAll(): void {
    for (const id of [...this.vms.keys()]) this.destroy(id);
  }

  usage(): { vms: number; vcpus: number; memoryBytes: number } {
    let vcpus = 0;
    let memoryBytes = 0;
    for (const vm of this.vms.values()) {
      vcpus += vm.vcpus.length;
      memoryBytes += vm.memoryBytes;
    }
    return { vms: this.vms.size, vcpus, memoryBytes };
  }
}

function addCounts(into: Record<string, number>, counts: Record<string, number>[]): void {
  for (const c of counts) for (const [k, n] of Object.entries(c)) into[k] = (into[k] ?? 0) + n;
}
