/**
 * One dirty-page tracker per VM with several consumers (a live migration, the VM's incremental
 * snapshots), each with a bitmap of its own.
 *
 * KVM's dirty log and vcpud's written-pages record (native/written_pages.h) both consume what they
 * return: two consumers harvesting them directly would each see only the pages the other had not
 * taken yet. So the hub owns logging (started with the first consumer, stopped with the last) and
 * every harvest, whoever asks for it, ORs the bits into every consumer's pending bitmap; a consumer
 * then takes (and clears) its own. A page written once is seen by every consumer exactly once.
 */
import { dirtyBitmapBytes } from '../ffi/dirty-log';
import type { Vm } from '../ffi/vm';
import { bitmapWords } from './snapshot-format';

const hubs = new WeakMap<Vm, DirtyLogHub>();

export class DirtyLogHub {
  private readonly consumers = new Set<DirtyConsumer>();
  /** Harvests run one at a time (KVM_GET_DIRTY_LOG per slot, then the written pages). */
  private harvesting: Promise<void> = Promise.resolve();
  /**
   * Per region, the buffer each harvest reads KVM's log into (harvests run one at a time): a fresh
   * one per harvest cost up to 0.5 ms at 4 GiB inside the migration's paused window (a 128 KiB
   * buffer is mapped anew and faulted in page by page).
   */
  private scratch?: Buffer[];

  private constructor(private readonly vm: Vm) {}

  /** The hub of `vm` (made on first use; it goes with the VM). */
  static for(vm: Vm): DirtyLogHub {
    let hub = hubs.get(vm);
    if (!hub) hubs.set(vm, (hub = new DirtyLogHub(vm)));
    return hub;
  }

  /** Whether any consumer is tracking. */
  get tracking(): boolean {
    return this.consumers.size > 0;
  }

  /** A new consumer: it sees the pages dirtied from now on. Starts logging for the first one. */
  subscribe(): DirtyConsumer {
    if (!this.consumers.size) {
      // Mode 'get': a harvest re-protects in the same ioctl; at this host's figures (BENCHMARKS.md,
      // dirty logging) a harvest costs well under 1 ms/GiB in every mode, so the simplest one is used.
      for (const r of this.vm.regions) {
        r.memory.trackWrites(true);
        this.vm.startDirtyLog(r.slot, 'get');
      }
    }
    const c = new DirtyConsumer(
      this,
      this.vm.regions.map((r) => Buffer.alloc(dirtyBitmapBytes(r.size))),
    );
    this.consumers.add(c);
    return c;
  }

  /** Collects what was dirtied since the last harvest into every consumer's pending bitmaps. */
  harvest(): Promise<void> {
    const run = this.harvesting.then(async () => {
      if (!this.consumers.size) return;
      for (let i = 0; i < this.vm.regions.length; i++) {
        const region = this.vm.regions[i];
        this.scratch ??= this.vm.regions.map((r) => Buffer.alloc(dirtyBitmapBytes(r.size)));
        const bits = this.scratch[i].fill(0);
        await this.vm.harvestDirtyLog(region.slot, bits);
        region.memory.takeWrittenPages(bits); // ORs vcpud's own writes in
        for (const c of this.consumers) orInto(c.pending[i], bits);
      }
    });
    this.harvesting = run.catch(() => {});
    return run;
  }

  /** Drops a consumer; logging stops with the last one (errors of a VM being destroyed are ignored). */
  unsubscribe(c: DirtyConsumer): void {
    if (!this.consumers.delete(c) || this.consumers.size) return;
    for (const r of this.vm.regions) {
      try {
        r.memory.trackWrites(false);
        this.vm.stopDirtyLog(r.slot);
      } catch {
        // the VM went away: nothing left to stop
      }
    }
  }
}

/** One consumer's view: the pages dirtied since it last took them. */
export class DirtyConsumer {
  constructor(
    private readonly hub: DirtyLogHub,
    /** Per region: bits harvested (or merged back) not yet taken. */
    readonly pending: Buffer[],
  ) {}

  /** Pages dirtied since the previous take (plus merged-back bits), one fresh bitmap per region. */
  async take(): Promise<Buffer[]> {
    await this.hub.harvest();
    // Handed over whole, a zeroed buffer in its place: copying a 4 GiB guest's 128 KiB bitmap into
    // a fresh buffer faults all of it in (0.1-0.5 ms while the migration is paused); a fresh zeroed
    // one is only faulted in where later harvests set bits.
    return this.pending.map((p, i) => {
      this.pending[i] = Buffer.alloc(p.length);
      return p;
    });
  }

  /** Bits taken but not consumed after all (a failed pass, write): the next take returns them again. */
  mergeBack(bitmaps: Buffer[]): void {
    for (const [i, b] of bitmaps.entries()) orInto(this.pending[i], b);
  }

  close(): void {
    this.hub.unsubscribe(this);
  }
}

/** ORs `from` into `into` (their common length); zero words of `from` are skipped, so only words with bits are written. */
export function orInto(into: Buffer, from: Buffer): void {
  const n = Math.min(into.length, from.length);
  let i = 0;
  const a = bitmapWords(into.subarray(0, n));
  const b = bitmapWords(from.subarray(0, n));
  if (a && b) {
    for (let w = 0; w < b.length; w++) if (b[w]) a[w] |= b[w];
    i = b.length * 4;
  }
  for (; i < n; i++) into[i] |= from[i];
}
