/**
 * A FIFO async mutex: serializes the operations on one vCPU while different vCPUs run in parallel.
 * A free mutex runs `fn` at once, in the caller's turn (GetState of a paused vCPU, the common case, then
 * costs no promise hops before its ioctls); a held one queues it. On release the lock passes straight to
 * the first waiter, so a caller arriving meanwhile cannot overtake it.
 */
export class Mutex {
  private busy = false;
  private readonly waiters: (() => void)[] = [];

  /** Nobody holds the lock or waits for it. */
  get free(): boolean {
    return !this.busy;
  }

  /** Runs a synchronous `fn` with the lock, which must be free (`free`), and lets go of it when `fn` returns or throws. */
  runNow<T>(fn: () => T): T {
    if (this.busy) throw new Error('Mutex.runNow: the lock is held');
    this.busy = true;
    try {
      return fn();
    } finally {
      this.release();
    }
  }

  run<T>(fn: () => Promise<T> | T): Promise<T> {
    if (this.busy) return new Promise<void>((r) => this.waiters.push(r)).then(() => this.hold(fn));
    this.busy = true;
    return this.hold(fn);
  }

  /** Runs `fn` with the lock held (busy already set) and releases it when `fn` has settled. */
  private hold<T>(fn: () => Promise<T> | T): Promise<T> {
    let result: Promise<T> | T;
    try {
      result = fn();
    } catch (e) {
      this.release();
      return Promise.reject(e);
    }
    if (!(result instanceof Promise)) {
      this.release();
      return Promise.resolve(result);
    }
    return result.then(
      (v) => {
        this.release();
        return v;
      },
      (e) => {
        this.release();
        throw e;
      },
    );
  }

  private release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.busy = false;
  }
}
