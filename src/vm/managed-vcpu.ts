/**
 * A vCPU owned by vcpud: its ffi handle, its run thread, its run state and a mutex that serializes
 * every operation on it. State is only ever read or written while the vCPU is out of KVM_RUN with
 * its pending I/O completed.
 */
import { EventEmitter } from 'node:events';
import { failedPrecondition, notFound } from '../errors';
import type { NativeVcpuRunner, RunStateName } from '../ffi/native';
import type { Vcpu } from '../ffi/vcpu';
import { Mutex } from './mutex';

export interface VcpuStatus {
  id: number;
  state: RunStateName;
  reason?: string;
  details: Record<string, number>;
  /** A stopped vCPU: what happened, in words, when the numbers alone say little (stop-explanation.ts). */
  description?: string;
  exits: number;
  /** Percent of each slice the run thread sleeps (setThrottle); absent when 0. */
  throttle?: number;
}

export interface StateAccessOptions {
  /** Refuse (failed_precondition) rather than pause a running vCPU. */
  noImplicitPause?: boolean;
}

export interface ManagedVcpuEvents {
  console: [Buffer];
  debug: [{ vcpu: number; value: number; done: boolean }];
  state: [VcpuStatus];
}

const NOT_PAUSED = Object.freeze({ implicitlyPaused: false });
const PAUSED = Object.freeze({ implicitlyPaused: true });

export class ManagedVcpu extends EventEmitter<ManagedVcpuEvents> {
  private readonly runner: NativeVcpuRunner;
  private readonly mutex = new Mutex();
  private destroyed = false;

  /**
   * `heldBy` says why resuming is refused right now (the VM is held by a snapshot), if it is;
   * `explainStop` may restate a stop with what the VM knows and the runner does not (a lost page).
   */
  constructor(
    readonly vcpu: Vcpu,
    private readonly heldBy: () => string | undefined = () => undefined,
    private readonly explainStop: (s: VcpuStatus) => VcpuStatus = (s) => s,
  ) {
    super();
    this.runner = vcpu.createRunner(() => this.drain());
  }

  get id(): number {
    return this.vcpu.id;
  }

  /** The current state, after delivering every console byte and event that preceded it. */
  status(): VcpuStatus {
    // The state is read first and delivered after: the other order let a vCPU write its last bytes and stop
    // between the two, so a 'stopped' status came back with those bytes still queued in the runner.
    const status = this.snapshotStatus();
    this.drain();
    return status;
  }

  private snapshotStatus(): VcpuStatus {
    if (this.destroyed) return { id: this.id, state: 'stopped', reason: 'destroyed', details: {}, exits: 0 };
    const s = this.runner.status();
    const exits = Object.values(this.runner.exitCounts()).reduce((a, b) => a + b, 0);
    const status: VcpuStatus = { id: this.id, state: s.state, reason: s.reason, details: s.details, exits };
    if (s.throttle) status.throttle = s.throttle;
    return this.explainStop(status);
  }

  /** Live migration's auto-converge: the vCPU sleeps `percent`% of each 10 ms slice (0 = off). */
  setThrottle(percent: number): void {
    if (this.destroyed) return;
    this.runner.setThrottle(percent);
  }

  /** Exit counts keyed by KVM_EXIT_* number, for metrics. */
  exitCounts(): Record<string, number> {
    return this.destroyed ? {} : this.runner.exitCounts();
  }

  /** Starts or continues the vCPU (from created, paused, halted or stopped). */
  resume(): Promise<VcpuStatus> {
    return this.mutex.run(() => {
      this.assertAlive();
      const held = this.heldBy();
      if (held) throw failedPrecondition(`cannot run vCPU ${this.id}: its VM is held (${held})`, 'WRONG_RUN_STATE');
      this.runner.resume();
      return this.status();
    });
  }

  /** Kicks the vCPU out of KVM_RUN, completes pending I/O, and holds it. */
  async pause(): Promise<VcpuStatus> {
    return (await this.pauseFrom()).after;
  }

  /**
   * Pauses like pause() and also returns the state the pause began from, read under the vCPU's lock:
   * a status read before queueing could see a state access's implicit pause (GetState), which that
   * access undoes before this pause runs.
   */
  pauseFrom(): Promise<{ before: VcpuStatus; after: VcpuStatus }> {
    return this.mutex.run(async () => {
      this.assertAlive();
      const before = this.status();
      await this.runner.pause();
      this.assertAlive(); // deleted while pausing
      this.drain();
      return { before, after: this.status() };
    });
  }

  /**
   * Runs `fn` with the vCPU out of KVM_RUN. A running vCPU is paused for it and resumed after,
   * unless the caller asked for no implicit pause; `fn` is told whether it was (decided under the
   * vCPU's lock, so it is what happened, not what a status read just before suggested).
   */
  withState<T>(fn: (access: { implicitlyPaused: boolean }) => T | Promise<T>, opts: StateAccessOptions = {}): Promise<T> {
    return this.mutex.run(() => {
      this.assertAlive();
      // A vCPU already out of KVM_RUN (the common case: checkpoint loops read paused vCPUs) has nothing to
      // undo after `fn`: no async frame of its own for it.
      if (this.runner.state() !== 'running') return fn(NOT_PAUSED);
      if (opts.noImplicitPause) throw failedPrecondition(`vCPU ${this.id} is running and no_implicit_pause was requested: pause it first`, 'VCPU_RUNNING');
      return this.withImplicitPause(fn);
    });
  }

  /**
   * withState for a synchronous `fn`, run in the caller's turn when it can be: with the lock free and
   * the vCPU out of KVM_RUN (a checkpoint loop reading a paused vCPU), `fn`'s value or error comes back
   * at once, with no promise in between; otherwise withState's promise.
   */
  withStateNow<T>(fn: (access: { implicitlyPaused: boolean }) => T, opts: StateAccessOptions = {}): T | Promise<T> {
    if (this.destroyed || !this.mutex.free || this.runner.state() === 'running') return this.withState(fn, opts);
    return this.mutex.runNow(() => fn(NOT_PAUSED));
  }

  private async withImplicitPause<T>(fn: (access: { implicitlyPaused: boolean }) => T | Promise<T>): Promise<T> {
    await this.runner.pause();
    // Its VM may have been deleted while the vCPU paused: `fn` must not reach its fds, whose
    // numbers the kernel may already have given to another VM.
    this.assertAlive();
    try {
      return await fn(PAUSED);
    } finally {
      if (!this.destroyed) this.runner.resume();
    }
  }

  /**
   * Resumes on behalf of the holder of the VM (a snapshot or migration putting it back as it was),
   * which the hold would otherwise refuse.
   */
  resumeHeld(): Promise<VcpuStatus> {
    return this.mutex.run(() => {
      this.assertAlive();
      this.runner.resume();
      return this.status();
    });
  }

  /** A restored vCPU that had run: CREATED -> PAUSED without running it (ResumeVm then continues it). */
  markPaused(): Promise<VcpuStatus> {
    return this.mutex.run(() => {
      this.assertAlive();
      this.runner.markPaused();
      return this.status();
    });
  }

  /** Stops the run thread and unmaps kvm_run; the vCPU fd is closed by the VM. */
  destroy(): void {
    if (this.destroyed) return;
    this.drain();
    this.destroyed = true;
    this.runner.destroy();
  }

  private drain(): void {
    if (this.destroyed) return;
    const { console, events } = this.runner.drain();
    if (console.length) this.emit('console', console);
    for (const e of events) {
      if (e.kind === 'state') this.emit('state', this.snapshotStatus());
      else this.emit('debug', { vcpu: this.id, value: e.value ?? 0, done: e.kind === 'done' });
    }
  }

  /** A vCPU is destroyed with its VM: from then on the VM is not found. */
  private assertAlive(): void {
    if (this.destroyed) throw notFound(`vCPU ${this.id} was destroyed: its VM was deleted`, 'VM_NOT_FOUND');
  }
}
