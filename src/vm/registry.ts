/** The VMs this vcpud owns, with the configured limits enforced at creation. */
import { invalidArgument, notFound } from '../errors';
import type { Kvm } from '../ffi/kvm';
import type { CpuidEntry2 } from '../ffi/sections';
import { checkCreate, DEFAULT_LIMITS, type Limits } from './limits';
import { ManagedVm, type VmSpec } from './managed-vm';

const PAGE = 4096;

export class VmRegistry {
  private readonly vms = new Map<string, ManagedVm>();
  private supported?: CpuidEntry2[];

  constructor(
    readonly kvm: Kvm,
    readonly limits: Limits = DEFAULT_LIMITS,
  ) {}

  create(spec: VmSpec): ManagedVm {
    if (!Number.isSafeInteger(spec.memoryBytes) || spec.memoryBytes <= 0 || spec.memoryBytes % PAGE !== 0)
      throw invalidArgument(`memory_bytes must be a positive multiple of ${PAGE}, got ${spec.memoryBytes}`);
    if (!Number.isInteger(spec.vcpuCount) || spec.vcpuCount < 1)
      throw invalidArgument(`vcpu_count must be at least 1, got ${spec.vcpuCount}`);
    checkCreate(this.limits, this.usage(), spec.vcpuCount, spec.memoryBytes);
    this.supported ??= this.kvm.supportedCpuid();
    const vm = ManagedVm.create(this.kvm, spec, this.supported);
    this.vms.set(vm.id, vm);
    return vm;
  }

  get(id: string): ManagedVm {
    const vm = this.vms.get(id);
    if (!vm) throw notFound(`no VM with id "${id}"`);
    return vm;
  }

  list(): ManagedVm[] {
    return [...this.vms.values()];
  }

  destroy(id: string): void {
    this.get(id).destroy();
    this.vms.delete(id);
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
