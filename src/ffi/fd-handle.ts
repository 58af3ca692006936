/**
 * A kernel file descriptor that cannot be used after close and is not closed while in use.
 *
 * Linux hands a closed descriptor's number to the next open: a KVM_CREATE_VCPU right after a VM was
 * deleted gets the deleted VM's numbers back, so an ioctl through a stale number reaches another VM.
 * Every ffi wrapper therefore takes its descriptor from a handle: close() refuses new uses at once,
 * and the number goes back to the kernel only when the last ioctl holding it on the libuv pool is
 * done. (A vCPU's run thread is stopped by Vcpu.close before its handle closes.)
 */
import type { VcpudError } from '../errors';
import { native } from './native';

export class FdHandle {
  private holds = 0;
  private closed = false;
  private released = false;

  /** `closedError` is what a use after close throws. */
  constructor(
    private readonly fd: number,
    private readonly closedError: () => VcpudError,
  ) {}

  get isClosed(): boolean {
    return this.closed;
  }

  /** The descriptor, for a synchronous call (it cannot be closed before control returns). */
  get(): number {
    if (this.closed) throw this.closedError();
    return this.fd;
  }

  /** Runs an asynchronous call (libuv pool) holding the descriptor: close() waits for it. */
  async useAsync<T>(fn: (fd: number) => Promise<T>): Promise<T> {
    const release = this.hold();
    try {
      return await fn(this.fd);
    } finally {
      release();
    }
  }

  /** Keeps the descriptor open until the returned function is called (once). */
  private hold(): () => void {
    this.get();
    this.holds++;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      if (--this.holds === 0 && this.closed) this.release();
    };
  }

  /** Refuses further use; the descriptor is closed now, or when the last hold lets go. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.holds === 0) this.release();
  }

  private release(): void {
    if (this.released) return;
    this.released = true;
    native.closeFd(this.fd);
  }
}
