/** The VMs this vcpud owns, with the configured limits enforced at creation. */
import { invalidArgument, notFound, VcpudError } from '../errors';
import type { Kvm } from '../ffi/kvm';
import type { CpuidEntry2 } from '../ffi/sections';
import { anonymousMemory, type GuestMemorySource } from './guest-memory';
import { checkCreate, DEFAULT_LIMITS, type Limits } from './limits';
import { ManagedVm, type VmPrepared, type VmSpec } from './managed-vm';
import { checkVmName } from './vm-name';

const PAGE = 4096;

/**
 * A VM's share of the limits (one VM, its memory) held before the VM exists: an upload takes the VM
 * when it starts and its memory from the snapshot's header, so concurrent uploads are refused up
 * front, not after their memory arrived. create() converts it into the VM; release() gives it back
 * (idempotent).
 */
export interface Reservation {
  readonly memoryBytes: number;
  release(): void;
}

interface HeldReservation extends Reservation {
  memoryBytes: number;
}

export class VmRegistry {
  private readonly vms = new Map<string, ManagedVm>();
  private supported?: CpuidEntry2[];
  /** Exit counts of destroyed VMs, so exit counters never go down. */
  private readonly retiredExits: Record<string, number> = {};
  /** Limits held by reservations whose VM does not exist yet. */
  private readonly outstanding = new Set<HeldReservation>();
  private readonly reserved = { vms: 0, memoryBytes: 0 };

  constructor(
    readonly kvm: Kvm,
    readonly limits: Limits = DEFAULT_LIMITS,
    /** Where every VM's guest memory comes from (a new VM, a restore, an incoming migration). */
    readonly memory: GuestMemorySource = anonymousMemory,
  ) {}

  /**
   * Refuses (invalid_argument or resource_exhausted) a VM this registry would not create, counting the
   * existing VMs and every outstanding reservation but `own` (the one this VM is created under).
   */
  checkSpec(spec: VmSpec, own?: Reservation): void {
    checkVmName(spec.name, 'name');
    if (!Number.isSafeInteger(spec.memoryBytes) || spec.memoryBytes <= 0 || spec.memoryBytes % PAGE !== 0)
      throw invalidArgument(`memory_bytes must be a positive multiple of ${PAGE}, got ${spec.memoryBytes}`, [
        { rule: 'page_multiple', field: 'memory_bytes', message: `must be a positive multiple of ${PAGE}` },
      ]);
    if (!Number.isInteger(spec.vcpuCount) || spec.vcpuCount < 1)
      throw invalidArgument(`vcpu_count must be at least 1, got ${spec.vcpuCount}`, [{ rule: 'min', field: 'vcpu_count', message: 'must be at least 1' }]);
    checkCreate(this.limits, this.usageBesides(own), spec.vcpuCount, spec.memoryBytes);
  }

  /** VMs and memory held (VMs and reservations), leaving out the reservation `own`. */
  private usageBesides(own?: Reservation): { vms: number; memoryBytes: number } {
    const held = this.usage();
    const mine = own && this.outstanding.has(own as HeldReservation) ? { vms: 1, memoryBytes: own.memoryBytes } : { vms: 0, memoryBytes: 0 };
    return { vms: held.vms + this.reserved.vms - mine.vms, memoryBytes: held.memoryBytes + this.reserved.memoryBytes - mine.memoryBytes };
  }

  /**
   * Holds a VM's share of the limits until create() or release(): a VM with no memory yet (no `spec`:
   * only max_vms is checked), or `spec`'s VM count and memory. With `own` (a reservation still held)
   * that reservation is resized to `spec` instead.
   */
  reserve(spec?: VmSpec, own?: Reservation): Reservation {
    if (spec) this.checkSpec(spec, own);
    else checkCreate(this.limits, this.usageBesides(), 0, 0);
    const memoryBytes = spec?.memoryBytes ?? 0;
    const held = own && this.outstanding.has(own as HeldReservation) ? (own as HeldReservation) : undefined;
    if (held) {
      this.reserved.memoryBytes += memoryBytes - held.memoryBytes;
      held.memoryBytes = memoryBytes;
      return held;
    }
    const r: HeldReservation = {
      memoryBytes,
      release: () => {
        if (!this.outstanding.delete(r)) return;
        this.reserved.vms -= 1;
        this.reserved.memoryBytes -= r.memoryBytes;
      },
    };
    this.outstanding.add(r);
    this.reserved.vms += 1;
    this.reserved.memoryBytes += memoryBytes;
    return r;
  }

  /** KVM_GET_SUPPORTED_CPUID, asked once. */
  supportedCpuid(): CpuidEntry2[] {
    return (this.supported ??= this.kvm.supportedCpuid());
  }

  /**
   * Creates a VM within the limits; `prepared` (a restore) brings its memory and CPUID, `reservation`
   * the share of the limits it was given beforehand (released here either way).
   */
  create(spec: VmSpec, prepared?: VmPrepared, reservation?: Reservation): ManagedVm {
    try {
      try {
        this.checkSpec(spec, reservation);
      } catch (e) {
        prepared?.memory?.release();
        prepared?.vm?.close();
        throw e;
      }
      if (prepared?.id !== undefined && this.vms.has(prepared.id)) {
        prepared.memory?.release();
        prepared.vm?.close();
        throw new VcpudError('failed_precondition', `a VM with id ${prepared.id} exists`);
      }
      const memory = prepared?.memory ?? (prepared?.vm ? undefined : this.memory.allocate(spec.memoryBytes));
      const vm = ManagedVm.create(this.kvm, spec, this.supportedCpuid(), { ...prepared, memory });
      this.vms.set(vm.id, vm);
      return vm;
    } finally {
      reservation?.release(); // the VM now counts itself, or it was not made
    }
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
    addCounts(
      this.retiredExits,
      vm.vcpus.map((v) => v.exitCounts()),
    );
    vm.destroy();
    this.vms.delete(id);
  }

  /** vCPU exits by KVM_EXIT_* number since start, destroyed VMs included (a monotonic counter). */
  exitCounts(): Record<string, number> {
    const out = { ...this.retiredExits };
    addCounts(
      out,
      this.list().flatMap((vm) => vm.vcpus.map((v) => v.exitCounts())),
    );
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
