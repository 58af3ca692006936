/**
 * VM scope: memory slots, the in-kernel irqchip, vCPUs, capabilities. Owns every fd and mapping
 * it creates; close() releases them all (vCPUs first, then memory, then the VM fd).
 */
import { VcpudError } from '../errors';
import type { CapName, Kvm } from './kvm';
import { capNumber } from './kvm';
import { kvmCall, native, type NativeGuestMemory } from './native';
import { Vcpu } from './vcpu';

export interface MemoryRegion {
  slot: number;
  guestPhysAddr: number;
  size: number;
  memory: NativeGuestMemory;
}

export class Vm {
  readonly vcpus = new Map<number, Vcpu>();
  readonly regions: MemoryRegion[] = [];
  private irqchip = false;
  private closed = false;

  constructor(
    readonly kvm: Kvm,
    readonly fd: number,
  ) {}

  /** KVM_CHECK_EXTENSION on the VM fd: some answers (XSAVE2, NESTED_STATE) are per VM type. */
  checkExtension(cap: CapName | number): number {
    const n = typeof cap === 'number' ? cap : capNumber(cap);
    return kvmCall('KVM_CHECK_EXTENSION', () => native.checkExtension(this.fd, n));
  }

  /** Maps anonymous memory and registers it as a slot at `guestPhysAddr`. */
  addMemory(guestPhysAddr: number, size: number, flags = 0): MemoryRegion {
    const memory = kvmCall('mmap', () => new native.GuestMemory(size));
    const slot = this.regions.length;
    try {
      kvmCall('KVM_SET_USER_MEMORY_REGION', () =>
        native.setUserMemoryRegion(this.fd, slot, flags, guestPhysAddr, memory),
      );
    } catch (e) {
      memory.release();
      throw e;
    }
    const region = { slot, guestPhysAddr, size, memory };
    this.regions.push(region);
    return region;
  }

  /** The region holding [gpa, gpa+len), or a clear error naming the range. */
  regionFor(gpa: number, len: number): { region: MemoryRegion; offset: number } {
    for (const region of this.regions) {
      const offset = gpa - region.guestPhysAddr;
      if (offset >= 0 && offset + len <= region.size) return { region, offset };
    }
    throw new VcpudError(
      'invalid_argument',
      `guest-physical range 0x${gpa.toString(16)}+0x${len.toString(16)} is outside guest memory`,
    );
  }

  readMemory(gpa: number, len: number): Buffer {
    const { region, offset } = this.regionFor(gpa, len);
    const buf = Buffer.alloc(len);
    region.memory.read(offset, buf);
    return buf;
  }

  writeMemory(gpa: number, data: Buffer): void {
    const { region, offset } = this.regionFor(gpa, data.length);
    region.memory.write(offset, data);
  }

  /** KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and LAPICs. Must precede vCPU creation. */
  createIrqchip(): void {
    kvmCall('KVM_CREATE_IRQCHIP', () => native.createIrqchip(this.fd));
    this.irqchip = true;
  }

  get hasIrqchip(): boolean {
    return this.irqchip;
  }

  /** Real mode on VMX needs a TSS page inside the guest-physical space but outside RAM. */
  setTssAddr(addr: number): void {
    kvmCall('KVM_SET_TSS_ADDR', () => native.setTssAddr(this.fd, addr));
  }

  /** KVM_ENABLE_CAP on the VM: cap plus up to four u64 arguments. */
  enableCap(cap: CapName | number, args: bigint[] = [], flags = 0): void {
    kvmCall('KVM_ENABLE_CAP', () => native.enableCap(this.fd, encodeEnableCap(cap, args, flags)));
  }

  createVcpu(id: number): Vcpu {
    if (this.vcpus.has(id)) throw new VcpudError('failed_precondition', `vCPU ${id} already exists`);
    const fd = kvmCall('KVM_CREATE_VCPU', () => native.createVcpu(this.fd, id));
    const vcpu = new Vcpu(this, id, fd);
    this.vcpus.set(id, vcpu);
    return vcpu;
  }

  /** Releases vCPUs, memory and the VM fd; safe to call twice. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const vcpu of this.vcpus.values()) vcpu.close();
    this.vcpus.clear();
    native.closeFd(this.fd);
    for (const r of this.regions) r.memory.release();
    this.regions.length = 0;
  }
}

/** struct kvm_enable_cap: u32 cap, u32 flags, u64 args[4], u8 pad[64]. */
export function encodeEnableCap(cap: CapName | number, args: bigint[], flags: number): Buffer {
  if (args.length > 4) throw new VcpudError('invalid_argument', 'KVM_ENABLE_CAP takes at most 4 arguments');
  const buf = Buffer.alloc(native.sizes.kvm_enable_cap);
  buf.writeUInt32LE(typeof cap === 'number' ? cap : capNumber(cap), 0);
  buf.writeUInt32LE(flags, 4);
  args.forEach((a, i) => buf.writeBigUInt64LE(a, 8 + i * 8));
  return buf;
}
