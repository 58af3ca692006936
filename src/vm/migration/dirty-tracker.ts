/**
 * What the guest (through KVM's dirty log) and vcpud itself (memory writes it makes) dirtied since
 * the last harvest, per memory slot, as one bitmap per region (bit i: page i of the region): the
 * migration's consumer of the VM's DirtyLogHub (which incremental snapshots may share).
 *
 * Bits the caller has not seen acknowledged by the destination are merged back (mergeBack) so a
 * retried pass still sends them.
 */
import type { Vm } from '../../ffi/vm';
import { DirtyLogHub, type DirtyConsumer } from '../dirty-log-hub';

export { orInto } from '../dirty-log-hub';

export class DirtyTracker {
  private consumer?: DirtyConsumer;

  constructor(private readonly vm: Vm) {}

  /** Starts tracking (the first harvest then covers writes from now on). */
  start(): void {
    this.consumer ??= DirtyLogHub.for(this.vm).subscribe();
  }

  /** Pages dirtied since the previous harvest (plus merged-back bits), one fresh bitmap per region. */
  harvest(): Promise<Buffer[]> {
    if (!this.consumer) throw new Error('DirtyTracker.harvest before start');
    return this.consumer.take();
  }

  /** Bits harvested but not acknowledged by the destination: the next harvest returns them again. */
  mergeBack(bitmaps: Buffer[]): void {
    this.consumer?.mergeBack(bitmaps);
  }

  /** Stops this tracker (idempotent); logging goes on while another consumer tracks. */
  stop(): void {
    this.consumer?.close();
    this.consumer = undefined;
  }
}
