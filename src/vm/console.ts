/**
 * A VM's console history: the newest CONSOLE_HISTORY_BYTES bytes, for StreamConsole's from_start.
 * It is one ring of bytes, so its cost is its capacity and each append copies only what it keeps,
 * whatever the chunk sizes: a history kept as a list of chunks cost ~100 bytes of heap per tiny chunk
 * and, trimmed from the front one chunk at a time, stalled the JS thread for seconds when a large
 * chunk evicted tens of thousands of small ones (RELIABILITY.md, "Console fan-out and the
 * bystander's latency").
 */

/** Console output a VM keeps for StreamConsole's from_start. */
export const CONSOLE_HISTORY_BYTES = 256 * 1024;

export class ConsoleBuffer {
  /** Allocated on the first byte: a VM that never prints costs nothing. */
  private ring?: Buffer;
  /** Where the next byte goes. */
  private head = 0;
  private total = 0;

  constructor(readonly capacity = CONSOLE_HISTORY_BYTES) {}

  append(chunk: Buffer): void {
    if (chunk.length === 0) return;
    const ring = (this.ring ??= Buffer.allocUnsafe(this.capacity));
    this.total += chunk.length;
    const kept = chunk.subarray(Math.max(0, chunk.length - this.capacity));
    const copied = kept.copy(ring, this.head);
    kept.copy(ring, 0, copied);
    this.head = (this.head + kept.length) % this.capacity;
  }

  /** Continues the history of another buffer (a restart's handover): its bytes and its count. */
  restore(history: Buffer, bytesWritten: number): void {
    this.append(history);
    this.total = Math.max(this.total, bytesWritten);
  }

  /** The retained history, a copy (at most `capacity` bytes, possibly starting mid-line). */
  history(): Buffer {
    if (!this.ring) return Buffer.alloc(0);
    if (this.total < this.capacity) return Buffer.from(this.ring.subarray(0, this.total));
    return Buffer.concat([this.ring.subarray(this.head), this.ring.subarray(0, this.head)]);
  }

  /** Bytes ever written, including those no longer retained. */
  get bytesWritten(): number {
    return this.total;
  }
}
