/**
 * A VM's console: a bounded history (the newest bytes win) plus live subscribers, who see every
 * byte in order. Memory stays bounded whether or not anyone listens.
 */
export type ConsoleListener = (chunk: Buffer) => void;

/** Console output a VM keeps for StreamConsole's from_start. */
export const CONSOLE_HISTORY_BYTES = 256 * 1024;

export class ConsoleBuffer {
  private chunks: Buffer[] = [];
  private size = 0;
  private total = 0;
  private readonly listeners = new Set<ConsoleListener>();

  constructor(readonly capacity = CONSOLE_HISTORY_BYTES) {}

  append(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.size += chunk.length;
    this.total += chunk.length;
    while (this.size - this.chunks[0].length >= this.capacity) this.size -= this.chunks.shift()!.length;
    for (const l of this.listeners) l(chunk);
  }

  /** The retained history (at most `capacity` bytes, possibly starting mid-line). */
  history(): Buffer {
    const all = Buffer.concat(this.chunks);
    return all.subarray(Math.max(0, all.length - this.capacity));
  }

  /** Bytes ever written, including those no longer retained. */
  get bytesWritten(): number {
    return this.total;
  }

  subscribe(l: ConsoleListener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }
}
