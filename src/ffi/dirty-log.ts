/**
 * KVM dirty-page logging for one VM's memory slots (mechanism; the migration engine decides when).
 *
 * Modes, VM-wide while any slot logs (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is a VM setting that
 * KVM_GET_DIRTY_LOG consults on every call):
 * - 'get': KVM_GET_DIRTY_LOG returns the bits and re-protects the pages in one call.
 * - 'manual': GET only reads; the caller re-protects with clear() (KVM_CLEAR_DIRTY_LOG, 64-page
 *   chunks) right before it copies those pages, so a page written after the read is not reported twice.
 * - 'manual-initially-set': as 'manual', and every bit starts set instead of write-protecting the
 *   whole slot when logging starts (the pages are protected chunk by chunk as they are cleared).
 * The kernel (6.x) accepts KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2) at any time: before any slot,
 * after vCPUs exist, and while slots log (test/kvm/dirty-log.test.ts checks it), with args[0] = 0,
 * ENABLE or ENABLE|INITIALLY_SET (INITIALLY_SET alone is EINVAL). So it is set right before the
 * slot gets its flag, and the mode is kept VM-wide here because a change would switch how GET
 * behaves for slots already logging.
 */
import { VcpudError } from '../errors';
import { kvmCall, kvmCallAsync, native, type NativeGuestMemory } from './native';

export type DirtyLogMode = 'get' | 'manual' | 'manual-initially-set';

export interface DirtyLogCaps {
  manualProtect: boolean;
  initiallySet: boolean;
}

const PAGE = 4096;

/** Bytes of a dirty bitmap for a slot of `size` bytes: one bit per page in whole u64 words, as KVM accesses it. */
export function dirtyBitmapBytes(size: number): number {
  return Math.ceil(size / PAGE / 64) * 8;
}

/** What DirtyLog needs of its VM (ffi/vm.ts's Vm). */
export interface DirtyLogHost {
  readonly fd: number;
  checkExtension(cap: 'MANUAL_DIRTY_LOG_PROTECT2'): number;
  enableCap(cap: 'MANUAL_DIRTY_LOG_PROTECT2', args: bigint[]): void;
  slot(slot: number): { slot: number; guestPhysAddr: number; size: number; flags: number; memory: NativeGuestMemory };
}

export class DirtyLog {
  private readonly logging = new Set<number>();
  private mode?: DirtyLogMode;
  /** The MANUAL_DIRTY_LOG_PROTECT2 bits currently enabled on the VM. */
  private enabledBits = 0n;

  constructor(private readonly vm: DirtyLogHost) {}

  caps(): DirtyLogCaps {
    const v = this.vm.checkExtension('MANUAL_DIRTY_LOG_PROTECT2');
    return {
      manualProtect: (v & native.dirtyLogFlags.manualProtectEnable) !== 0,
      initiallySet: (v & native.dirtyLogFlags.initiallySet) !== 0,
    };
  }

  /** The mode while any slot logs, else undefined. */
  get currentMode(): DirtyLogMode | undefined {
    return this.logging.size ? this.mode : undefined;
  }

  isLogging(slot: number): boolean {
    return this.logging.has(slot);
  }

  start(slot: number, mode: DirtyLogMode): void {
    const r = this.vm.slot(slot);
    if (this.logging.has(slot)) throw new VcpudError('failed_precondition', `memory slot ${slot} already logs dirty pages (mode ${this.mode})`);
    if (this.logging.size && mode !== this.mode)
      throw new VcpudError('failed_precondition', `dirty logging runs in mode ${this.mode} on this VM; slot ${slot} cannot start in ${mode}`);
    const bits = this.requiredBits(mode);
    if (bits !== this.enabledBits) {
      this.vm.enableCap('MANUAL_DIRTY_LOG_PROTECT2', [bits]);
      this.enabledBits = bits;
    }
    this.setFlags(r, r.flags | native.dirtyLogFlags.memLogDirtyPages);
    this.logging.add(slot);
    this.mode = mode;
  }

  stop(slot: number): void {
    const r = this.vm.slot(slot);
    if (!this.logging.has(slot)) return;
    this.setFlags(r, r.flags & ~native.dirtyLogFlags.memLogDirtyPages);
    this.logging.delete(slot);
  }

  /** KVM_GET_DIRTY_LOG into `out` (dirtyBitmapBytes(slot size) or more), on the libuv pool. */
  async harvest(slot: number, out: Buffer): Promise<void> {
    const r = this.loggingSlot(slot, 'harvest');
    await kvmCallAsync('KVM_GET_DIRTY_LOG', () => native.getDirtyLogAsync(this.vm.fd, slot, r.memory, out));
  }

  /**
   * KVM_CLEAR_DIRTY_LOG of the pages of [firstPage, +pages) set in `bitmap`, a slot-wide bitmap
   * (bit i = page i, as harvest fills it). firstPage and pages are multiples of 64, except that the
   * range may end at the slot's last page.
   */
  async clear(slot: number, firstPage: number, pages: number, bitmap: Buffer): Promise<void> {
    const r = this.loggingSlot(slot, 'clear');
    if (this.mode === 'get') throw new VcpudError('failed_precondition', `slot ${slot} logs in mode 'get': its harvest already cleared the log`);
    const slotPages = r.size / PAGE;
    if (firstPage % 64 !== 0 || (pages % 64 !== 0 && firstPage + pages !== slotPages))
      throw new VcpudError(
        'invalid_argument',
        `KVM_CLEAR_DIRTY_LOG works on 64-page chunks: first page ${firstPage}, ${pages} pages (the slot has ${slotPages})`,
      );
    await kvmCallAsync('KVM_CLEAR_DIRTY_LOG', () => native.clearDirtyLogAsync(this.vm.fd, slot, r.memory, firstPage, pages, bitmap));
  }

  private requiredBits(mode: DirtyLogMode): bigint {
    if (mode === 'get') return 0n;
    const caps = this.caps();
    if (!caps.manualProtect)
      throw new VcpudError('unsupported', 'KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is not available on this host', {
        capability: 'KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2',
      });
    if (mode === 'manual') return BigInt(native.dirtyLogFlags.manualProtectEnable);
    if (!caps.initiallySet)
      throw new VcpudError('unsupported', 'KVM_DIRTY_LOG_INITIALLY_SET is not available on this host', { capability: 'KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2' });
    return BigInt(native.dirtyLogFlags.manualProtectEnable | native.dirtyLogFlags.initiallySet);
  }

  private loggingSlot(slot: number, what: string) {
    const r = this.vm.slot(slot);
    if (!this.logging.has(slot))
      throw new VcpudError('failed_precondition', `cannot ${what} the dirty log of memory slot ${slot}: it does not log dirty pages`);
    return r;
  }

  /** Re-registers the slot with new flags (same address and memory): how logging starts and stops. */
  private setFlags(r: ReturnType<DirtyLogHost['slot']>, flags: number): void {
    kvmCall('KVM_SET_USER_MEMORY_REGION', () => native.setUserMemoryRegion(this.vm.fd, r.slot, flags, r.guestPhysAddr, r.memory));
    r.flags = flags;
  }
}
