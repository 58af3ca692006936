/**
 * VM scope: memory slots, the in-kernel irqchip, vCPUs, capabilities. Owns every fd and mapping
 * it creates; close() releases them all (vCPUs first, then memory, then the VM fd).
 */
import { notFound, VcpudError } from '../errors';
import { DirtyLog, type DirtyLogCaps, type DirtyLogMode } from './dirty-log';
import { capNumber, checkExtensionCached, type CapName, type CapSource } from './caps';
import { FdHandle } from './fd-handle';
import type { Kvm } from './kvm';
import { kvmCall, kvmCallAsync, native, type NativeGuestMemory } from './native';
import { Vcpu } from './vcpu';

export interface MemoryRegion {
  slot: number;
  guestPhysAddr: number;
  size: number;
  /** KVM_MEM_* flags the slot is registered with (dirty logging adds KVM_MEM_LOG_DIRTY_PAGES). */
  flags: number;
  memory: NativeGuestMemory;
}

export class Vm implements CapSource {
  readonly vcpus = new Map<number, Vcpu>();
  readonly regions: MemoryRegion[] = [];
  private irqchip = false;
  private readonly extensions = new Map<number, number>();
  private readonly handle: FdHandle;
  private readonly dirtyLog = new DirtyLog(this);

  constructor(
    readonly kvm: Kvm,
    fd: number,
  ) {
    this.handle = new FdHandle(fd, () => notFound('the VM is closed: it was deleted', 'VM_NOT_FOUND'));
  }

  /** The VM fd; throws once the VM is closed (the number may belong to another VM by then). */
  get fd(): number {
    return this.handle.get();
  }

  /** KVM_CHECK_EXTENSION on the VM fd: some answers (XSAVE2, NESTED_STATE) are per VM type. */
  checkExtension(cap: CapName | number): number {
    return checkExtensionCached(this.extensions, this.handle, cap);
  }

  /**
   * Registers memory as a slot at `guestPhysAddr`: a new anonymous mapping, or `prepared` (e.g. a
   * snapshot's memory, already loaded or mapped), which the VM then owns and releases.
   */
  addMemory(guestPhysAddr: number, size: number, flags = 0, prepared?: NativeGuestMemory): MemoryRegion {
    if (prepared && prepared.size !== size) throw new VcpudError('internal', `prepared guest memory is ${prepared.size} bytes, the slot ${size}`);
    const memory = prepared ?? kvmCall('mmap', () => new native.GuestMemory(size));
    const slot = this.regions.length;
    try {
      kvmCall('KVM_SET_USER_MEMORY_REGION', () => native.setUserMemoryRegion(this.fd, slot, flags, guestPhysAddr, memory));
    } catch (e) {
      memory.release();
      throw e;
    }
    const region = { slot, guestPhysAddr, size, flags, memory };
    this.regions.push(region);
    return region;
  }

  /**
   * addMemory with an existing mapping, KVM_SET_USER_MEMORY_REGION on the libuv pool: for a large
   * slot it takes milliseconds (the kernel sizes its per-page metadata), which a restore overlaps
   * with checksumming the memory.
   */
  async addMemoryAsync(guestPhysAddr: number, memory: NativeGuestMemory, flags = 0): Promise<MemoryRegion> {
    const slot = this.regions.length;
    const region = { slot, guestPhysAddr, size: memory.size, flags, memory };
    this.regions.push(region); // reserved now: close() releases it whatever happens below
    await this.handle.useAsync((fd) =>
      kvmCallAsync('KVM_SET_USER_MEMORY_REGION', () => native.setUserMemoryRegionAsync(fd, slot, flags, guestPhysAddr, memory)),
    );
    return region;
  }

  /** The region registered as `slot`, or a clear error. */
  slot(slot: number): MemoryRegion {
    const r = this.regions[slot];
    if (!r) throw new VcpudError('invalid_argument', `memory slot ${slot} does not exist (the VM has ${this.regions.length})`);
    return r;
  }

  /** Which dirty-log modes this VM's KVM offers beyond plain KVM_GET_DIRTY_LOG (see ffi/dirty-log.ts). */
  dirtyLogCaps(): DirtyLogCaps {
    return this.dirtyLog.caps();
  }

  /** Starts logging the slot's dirty pages (KVM_MEM_LOG_DIRTY_PAGES); the mode is VM-wide while any slot logs. */
  startDirtyLog(slot: number, mode: DirtyLogMode): void {
    this.dirtyLog.start(slot, mode);
  }

  stopDirtyLog(slot: number): void {
    this.dirtyLog.stop(slot);
  }

  /** The mode while any slot logs dirty pages, else undefined. */
  get dirtyLogMode(): DirtyLogMode | undefined {
    return this.dirtyLog.currentMode;
  }

  /** KVM_GET_DIRTY_LOG into `out` (ffi/dirty-log.ts dirtyBitmapBytes(slot size) bytes), off the JS thread. */
  harvestDirtyLog(slot: number, out: Buffer): Promise<void> {
    return this.dirtyLog.harvest(slot, out);
  }

  /** KVM_CLEAR_DIRTY_LOG (manual modes) of the pages of [firstPage, +pages) set in the slot-wide `bitmap`. */
  clearDirtyLog(slot: number, firstPage: number, pages: number, bitmap: Buffer): Promise<void> {
    return this.dirtyLog.clear(slot, firstPage, pages, bitmap);
  }

  /** The region holding [gpa, gpa+len), or a clear error naming the range. */
  regionFor(gpa: number, len: number): { region: MemoryRegion; offset: number } {
    this.handle.get(); // a closed VM has no memory: NOT_FOUND, not "outside guest memory"
    for (const region of this.regions) {
      const offset = gpa - region.guestPhysAddr;
      if (offset >= 0 && offset + len <= region.size) return { region, offset };
    }
    throw new VcpudError('invalid_argument', `guest-physical range 0x${gpa.toString(16)}+0x${len.toString(16)} is outside guest memory`);
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

  /** KVM_GET_CLOCK: the kvmclock base (struct kvm_clock_data, raw: clock, flags, realtime, host_tsc). */
  getClock(): Buffer {
    const buf = Buffer.alloc(native.sizes.kvm_clock_data);
    kvmCall('KVM_GET_CLOCK', () => native.getClock(this.fd, buf));
    return buf;
  }

  /**
   * KVM_SET_CLOCK with the clock value of a KVM_GET_CLOCK result. Flags are cleared (only
   * KVM_CLOCK_REALTIME is accepted, and it would advance the guest by the wall time in between):
   * the guest's clock continues from where it was saved.
   */
  setClock(data: Buffer): void {
    if (data.length !== native.sizes.kvm_clock_data)
      throw new VcpudError('invalid_argument', `kvm_clock_data is ${native.sizes.kvm_clock_data} bytes, got ${data.length}`);
    const buf = Buffer.alloc(native.sizes.kvm_clock_data);
    data.copy(buf, 0, 0, 8); // clock
    kvmCall('KVM_SET_CLOCK', () => native.setClock(this.fd, buf));
  }

  /** KVM_GET_IRQCHIP for chip 0 (PIC master), 1 (PIC slave) or 2 (IOAPIC): the raw struct kvm_irqchip. */
  getIrqchip(chipId: number): Buffer {
    const buf = Buffer.alloc(native.sizes.kvm_irqchip);
    buf.writeUInt32LE(chipId, 0);
    kvmCall('KVM_GET_IRQCHIP', () => native.getIrqchip(this.fd, buf));
    return buf;
  }

  /** KVM_SET_IRQCHIP with a struct kvm_irqchip from getIrqchip (its chip_id says which chip). */
  setIrqchip(data: Buffer): void {
    if (data.length !== native.sizes.kvm_irqchip)
      throw new VcpudError('invalid_argument', `kvm_irqchip is ${native.sizes.kvm_irqchip} bytes, got ${data.length}`);
    kvmCall('KVM_SET_IRQCHIP', () => native.setIrqchip(this.fd, data));
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

  /** Releases vCPUs, memory and the VM fd (once no pool ioctl holds it); safe to call twice. */
  close(): void {
    if (this.handle.isClosed) return;
    for (const vcpu of this.vcpus.values()) vcpu.close();
    this.vcpus.clear();
    this.handle.close();
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
  for (const [i, a] of args.entries()) buf.writeBigUInt64LE(a, 8 + i * 8);
  return buf;
}
