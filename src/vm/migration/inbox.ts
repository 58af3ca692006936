/**
 * Bytes received on a migration connection and not read yet, in one reused buffer: a socket chunk
 * costs a copy into it, not an allocation (a new buffer per 16 KiB TLS record made V8 run a full
 * collection every 18 MiB received, a third of the destination's CPU, BENCHMARKS.md).
 */
export class Inbox {
  private buf: Buffer;
  private start = 0;
  private end = 0;

  constructor(initialBytes: number) {
    this.buf = Buffer.allocUnsafe(initialBytes);
  }

  get length(): number {
    return this.end - this.start;
  }

  /**
   * The free space after the unread bytes, at least `min` bytes (compacted or grown to make room).
   * It stays where it is until commit: reads (take) never move it.
   */
  space(min: number): Buffer {
    if (this.start === this.end) this.start = this.end = 0;
    if (this.buf.length - this.end < min) {
      const target = this.length + min <= this.buf.length ? this.buf : Buffer.allocUnsafe(Math.max(2 * this.buf.length, this.length + min));
      this.buf.copy(target, 0, this.start, this.end);
      this.buf = target;
      this.end -= this.start;
      this.start = 0;
    }
    return this.buf.subarray(this.end);
  }

  /** Counts `n` bytes written at the start of space() as received. */
  commit(n: number): void {
    this.end += n;
  }

  append(chunk: Buffer): void {
    chunk.copy(this.space(chunk.length), 0);
    this.end += chunk.length;
  }

  /** Moves the first `n` unread bytes into `out` (n <= length). */
  take(out: Buffer, n: number): void {
    this.buf.copy(out, 0, this.start, this.start + n);
    this.start += n;
  }

  /** The unread bytes (a view, valid until the next space, append or take). */
  peek(): Buffer {
    return this.buf.subarray(this.start, this.end);
  }

  clear(): void {
    this.start = this.end = 0;
  }
}
