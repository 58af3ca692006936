/**
 * What the guest (through KVM's dirty log) and vcpud itself (memory writes it makes) dirtied since
 * the last harvest, per memory slot, as one bitmap per region (bit i: page i of the region).
 *
 * Harvested bits are consumed from KVM; bits the caller has not seen acknowledged by the destination
 * are merged back (mergeBack) so a retried pass still sends them.
 */
import { dirtyBitmapBytes } from '../../ffi/dirty-log';
import type { Vm } from '../../ffi/vm';

export class DirtyTracker {
  private readonly carry: Buffer[];
  private started = false;

  constructor(private readonly vm: Vm) {
    this.carry = vm.regions.map((r) => Buffer.alloc(dirtyBitmapBytes(r.size)));
  }

  /**
   * Starts logging every slot (the first harvest then covers writes from now on). Mode 'get': a
   * harvest re-protects in the same ioctl; at this host's figures (BENCHMARKS.md, dirty logging) a
   * harvest costs well under 1 ms/GiB in every mode, so the simplest one is used.
   */
  start(): void {
    this.started = true;
    for (const r of this.vm.regions) {
      r.memory.trackWrites(true);
      this.vm.startDirtyLog(r.slot, 'get');
    }
  }

  /** Pages dirtied since the previous harvest (plus merged-back bits), one fresh bitmap per region. */
  async harvest(): Promise<Buffer[]> {
    const out: Buffer[] = [];
    for (let i = 0; i < this.vm.regions.length; i++) {
      const region = this.vm.regions[i];
      const result = Buffer.alloc(dirtyBitmapBytes(region.size));
      await this.vm.harvestDirtyLog(region.slot, result);
      region.memory.takeWrittenPages(result); // ORs vcpud's own writes in
      orInto(result, this.carry[i]);
      this.carry[i].fill(0);
      out.push(result);
    }
    return out;
  }

  /** Bits harvested but not acknowledged by the destination: the next harvest returns them again. */
  mergeBack(bitmaps: Buffer[]): void {
    bitmaps.forEach((b, i) => orInto(this.carry[i], b));
  }

  /** Stops logging (idempotent; errors of a VM being destroyed are ignored). */
  stop(): void {
    if (!this.started) return;
    this.started = false;
    for (let i = 0; i < this.vm.regions.length; i++) {
      try {
        this.vm.regions[i].memory.trackWrites(false);
        this.vm.stopDirtyLog(this.vm.regions[i].slot);
      } catch {
        // the VM went away: nothing left to stop
      }
    }
  }
}

export function orInto(into: Buffer, from: Buffer): void {
  const n = Math.min(into.length, from.length);
  for (let i = 0; i < n; i++) into[i] |= from[i];
}
