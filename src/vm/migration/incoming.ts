/**
 * The destination side of a migration: an empty VM prepared for the incoming guest (its memory
 * allocated after the compatibility check and the limits, its KVM VM made meanwhile in the
 * background: the source's pages need only the memory), filled from one data connection
 * (page frames pass after pass, then the state records), and committed: the VM is created in the
 * registry with that state and its vCPUs resumed. Until the commit nothing of it is visible; any
 * failure, an abort, the source's connection closing or silence beyond the stall timeout frees
 * everything it allocated.
 */
import { randomBytes, randomUUID, timingSafeEqual } from 'node:crypto';
import { VcpudError } from '../../errors';
import type { HostCapabilities } from '../../ffi/capabilities';
import { applyFrames, receiveFrames } from '../../ffi/page-frames';
import { warmStateCodecs } from '../../ffi/sections/warm-up';
import type { NativeGuestMemory } from '../../ffi/native';
import { PopulateError, populateMemory } from '../../ffi/populate';
import type { Vm } from '../../ffi/vm';
import { ManagedVm } from '../managed-vm';
import type { VmRegistry } from '../registry';
import { assertCompatible } from '../snapshot-compat';
import type { SnapshotHeader } from '../snapshot-format';
import { restoreIntoNewVm, restoreSpec } from '../snapshot-restore';
import type { Channel } from './channel';
import { EnvelopeType, type Commit, type Committed, type EnvelopeHead, type PassAck, type PassEnd } from './protocol';
import { decodeState, type DecodedState } from './state-records';

export type IncomingState = 'waiting' | 'receiving' | 'committed' | 'aborted';

/** Page envelopes applied at once (the libuv pool has 4 threads). */
const MAX_APPLYING = 3;

/**
 * What the server layer adds to a migration's COMMITTED message: the committed VM as its API
 * describes it, so the source reports it without asking the destination again.
 */
export type DescribeVm = (vm: ManagedVm) => unknown;

const MiB = 1024 * 1024;

/**
 * Faults in all of a prepared VM's memory (preallocate_memory). The host's refusal is answered
 * with the guest's size and the errno: ENOMEM (or EFAULT: a full tmpfs behind --state-dir memory)
 * is RESOURCE_EXHAUSTED, EINVAL a kernel without MADV_POPULATE_WRITE (before 5.14). `signal`
 * stops it between chunks (the prepare's caller gave up): CANCELLED, naming how far it got.
 */
async function commitMemory(memory: NativeGuestMemory, bytes: number, signal?: AbortSignal): Promise<void> {
  const cancel = Buffer.alloc(1);
  const onAbort = () => void (cancel[0] = 1);
  if (signal?.aborted) onAbort();
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await populateMemory(memory, 0, bytes, cancel);
  } catch (e) {
    if (!(e instanceof PopulateError)) throw e;
    if (e.code === 'ECANCELED')
      throw new VcpudError(
        'cancelled',
        `${(signal?.reason as Error | undefined)?.message ?? 'cancelled'} while committing guest memory, ${e.committedBytes / MiB} of ${bytes / MiB} MiB: the incoming migration was discarded`,
        { reason: 'MIGRATION_FAILED', field: 'preallocate_memory' },
        { cause: e },
      );
    const message =
      `the destination could not commit the guest's ${bytes / MiB} MiB of memory (preallocate_memory): ` +
      `${e.code} beyond the first ${e.committedBytes / MiB} MiB (${e.message})`;
    if (e.code === 'EINVAL') throw new VcpudError('unsupported', message, { capability: 'MADV_POPULATE_WRITE', errno: e.code }, { cause: e });
    throw new VcpudError('resource_exhausted', message, { reason: 'HOST_RESOURCES_EXHAUSTED', errno: e.code, field: 'preallocate_memory' }, { cause: e });
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
}

/** A receive that ended because the source closed its connection, stopped sending or reported giving up. */
function sourceGone(e: unknown): boolean {
  return e instanceof VcpudError && (e.kind === 'unavailable' || e.kind === 'cancelled');
}

export class IncomingMigration {
  readonly id = randomUUID();
  readonly token = randomBytes(32);
  state: IncomingState = 'waiting';
  error = '';
  /**
   * Discarded because the source went away or gave up (its abort, its prepare call gone, its
   * connection closed or silent beyond the stall timeout), not for a failure here.
   */
  abandoned = false;
  pagesReceived = 0;
  bytesReceived = 0;
  passes = 0;
  vm?: ManagedVm;
  /** The KVM VM once made (slot 0 = `memory`), until the commit takes it. */
  private kvmVm?: Vm;
  /** Resolves when the KVM VM is made; rejects (the migration discarded) when that fails. */
  private kvmVmReady!: Promise<Vm>;
  private channel?: Channel;
  private timer?: NodeJS.Timeout;
  private readonly settled: Promise<void>;
  private settle!: () => void;

  private constructor(
    private readonly registry: VmRegistry,
    private readonly caps: HostCapabilities,
    readonly header: SnapshotHeader,
    readonly name: string | undefined,
    readonly stallMs: number,
    private readonly memory: NativeGuestMemory,
    private readonly describe?: DescribeVm,
  ) {
    this.settled = new Promise((r) => (this.settle = r));
  }

  /**
   * Checks that the VM the header describes can run here and fits `checkLimits`, then allocates its
   * memory and starts making its KVM VM (slot 0), which the commit awaits: the source connects and
   * sends pages meanwhile (making the KVM VM took 5-14 ms here, 75 ms on a loaded host). Waits
   * `stallMs` for the data connection before discarding itself. With `preallocate` it first commits
   * all of the memory (commitMemory): a host that cannot hold it, or a `signal` aborted meanwhile
   * (the caller gone), fails here, everything freed.
   */
  static async prepare(
    registry: VmRegistry,
    caps: HostCapabilities,
    header: SnapshotHeader,
    opts: {
      name?: string;
      stallMs: number;
      checkLimits(spec: ReturnType<typeof restoreSpec>): void;
      describe?: DescribeVm;
      preallocate?: boolean;
      signal?: AbortSignal;
    },
  ): Promise<IncomingMigration> {
    assertCompatible(header, caps, registry.supportedCpuid());
    const spec = restoreSpec(header, opts.name);
    registry.checkSpec(spec);
    opts.checkLimits(spec);
    if (header.vm.memory.length !== 1 || header.vm.memory[0].guestPhysAddr !== 0 || header.vm.memory[0].size !== header.vm.memoryBytes)
      throw new VcpudError('invalid_argument', 'a migrating VM must have its memory as one slot at guest physical address 0');
    const memory = registry.memory.allocate(header.vm.memoryBytes);
    const m = new IncomingMigration(registry, caps, header, opts.name, opts.stallMs, memory, opts.describe);
    m.makeKvmVm(ManagedVm.prepareKvmVm(registry.kvm, spec, memory, header.vm.cpuid));
    if (opts.preallocate) {
      try {
        await commitMemory(memory, header.vm.memoryBytes, opts.signal);
      } catch (e) {
        m.discard((e as Error).message); // frees the memory (with the KVM VM, once made)
        throw e;
      }
    }
    m.armTimer();
    return m;
  }

  private makeKvmVm(making: Promise<Vm>): void {
    this.kvmVmReady = making.then(
      (vm) => {
        if (this.state === 'aborted') {
          vm.close(); // discarded while it was made: the memory goes with it
          throw new VcpudError('unavailable', `incoming migration ${this.id} was aborted: ${this.error}`);
        }
        this.kvmVm = vm;
        return vm;
      },
      (e: Error) => {
        this.memory.release();
        this.channel?.fail(e); // tells the source why
        this.discard(`the destination could not make the KVM VM: ${e.message}`, { keepChannel: true });
        throw e;
      },
    );
    this.kvmVmReady.catch(() => {}); // awaited by the commit
  }

  get memoryBytes(): number {
    return this.header.vm.memoryBytes;
  }

  /** Resolves when the migration is committed or discarded. */
  done(): Promise<void> {
    return this.settled;
  }

  tokenMatches(token: Buffer): boolean {
    return token.length === this.token.length && timingSafeEqual(token, this.token);
  }

  private armTimer(): void {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.discard(`no data from the source for ${this.stallMs} ms`, { abandoned: true }), this.stallMs);
    this.timer.unref();
  }

  /** Takes the source's data connection (after its HELLO) and receives until commit or failure. */
  async receive(channel: Channel): Promise<void> {
    if (this.state !== 'waiting') {
      channel.fail(new VcpudError('failed_precondition', `incoming migration ${this.id} is ${this.state}${this.error ? `: ${this.error}` : ''}`));
      return;
    }
    this.state = 'receiving';
    this.channel = channel;
    clearTimeout(this.timer); // the channel's own reads are bounded by the stall timeout from here on
    let state: DecodedState | undefined;
    // Page envelopes of one pass hold disjoint pages (each selected once), so they are applied
    // several at a time on the libuv pool while the next ones are read; the pass's end is the
    // barrier: every apply settles before it is acknowledged, so no older copy of a page can land
    // after a newer one from a later pass.
    const applying: Promise<void>[] = [];
    let applyError: unknown;
    // Payloads are gathered into buffers reused once their apply settles (a fresh 1 MiB buffer per
    // envelope costs a page fault per 4 KiB). At most MAX_APPLYING + 1 are out at once.
    const spare: Buffer[] = [];
    let lent: Buffer | undefined;
    const lend = (head: EnvelopeHead) => {
      if (head.type !== EnvelopeType.Pages) return undefined;
      const i = spare.findIndex((b) => b.length >= head.length);
      lent = i >= 0 ? spare.splice(i, 1)[0] : Buffer.allocUnsafe(head.length);
      return lent;
    };
    const barrier = async () => {
      await Promise.all(applying.splice(0));
      if (applyError) throw applyError;
    };
    try {
      for (;;) {
        lent = undefined;
        const { head, payload } = await channel.next('waiting for the source', lend);
        const gathered = lent;
        if ((this.state as IncomingState) !== 'receiving')
          throw new VcpudError('unavailable', `incoming migration ${this.id} was ${this.state}: ${this.error}`);
        this.bytesReceived = channel.bytesIn;
        if (head.type === EnvelopeType.Pages) {
          // [u32 region index][u32 0] then frames; a migrating VM has one region.
          if (payload.length < 8 || payload.readUInt32LE(0) !== 0)
            throw new VcpudError('data_loss', 'page frames for a memory region the VM does not have', { reason: 'MIGRATION_FAILED' });
          const frames = payload.subarray(8);
          const applied = applyFrames(this.memory, frames).then((r) => {
            if (r.consumed !== frames.length)
              throw new VcpudError('data_loss', `a page envelope ends inside a frame (${frames.length - r.consumed} bytes left over)`, {
                reason: 'MIGRATION_FAILED',
              });
            this.pagesReceived += r.pages;
          });
          if (gathered) void applied.finally(() => spare.push(gathered)).catch(() => {});
          applying.push(applied.catch((e) => void (applyError ??= e)));
          warmStateCodecs(); // as for a stream pass below
          if (applying.length >= MAX_APPLYING) await applying.shift();
          if (applyError) throw applyError;
        } else if (head.type === EnvelopeType.PagesStream) {
          // Frames follow on the socket itself, read natively straight into guest memory.
          await barrier();
          const receiving = channel.receiveStream('waiting for page frames from the source', (fd, prefix, cancel) =>
            receiveFrames(this.memory, fd, prefix, { stallMs: this.stallMs, cancel }),
          );
          // The commit decodes and writes the state with the section codecs: compiled while a pool
          // thread receives, not while the guest is paused (only a process's first call does work).
          warmStateCodecs();
          const r = await receiving;
          this.pagesReceived += r.pages;
          this.bytesReceived = channel.bytesIn;
        } else if (head.type === EnvelopeType.PassEnd) {
          await barrier();
          const { pass } = JSON.parse(payload.toString()) as PassEnd;
          this.passes = pass;
          this.checkTornCarried(pass);
          const ack: PassAck = { pass, pagesApplied: this.pagesReceived, tornPages: this.memory.tornPages().count };
          await channel.sendJson(EnvelopeType.PassAck, ack);
        } else if (head.type === EnvelopeType.State) {
          await barrier();
          this.checkNoTornPages();
          state = decodeState(payload, { memoryBytes: this.memoryBytes, vcpuCount: this.header.vm.vcpuCount });
        } else if (head.type === EnvelopeType.Commit) {
          if (!state) throw new VcpudError('internal', 'COMMIT before the state');
          const { run } = JSON.parse(payload.toString()) as Commit;
          await this.commit(state, run);
          return;
        } else {
          throw new VcpudError('internal', `unexpected ${EnvelopeType[head.type]} from the source`);
        }
      }
    } catch (e) {
      await Promise.all(applying); // no apply may still write into memory being freed
      if ((this.state as IncomingState) !== 'committed') {
        channel.fail(e as Error); // tells the source why, then closes
        this.discard((e as Error).message, { keepChannel: true, abandoned: sourceGone(e) });
      }
    }
  }

  /**
   * A page that arrives torn (its CRC failed in a tearable frame, native/page_frames.h) was
   * rewritten by the guest after the harvest that selected it, so the next pass carries it again.
   * One that the next pass did not carry was not rewritten: it was damaged in transit.
   */
  private checkTornCarried(pass: number): void {
    const stale = this.memory.closeTornPass();
    if (!stale.count) return;
    throw new VcpudError(
      'data_loss',
      `${stale.count} page(s) failed their CRC in pass ${pass - 1} and pass ${pass} did not carry them again (the lowest: page ${stale.first}): damaged in transit, not rewritten by the guest`,
      { reason: 'MIGRATION_FAILED' },
    );
  }

  /** Once the last pass is in: no page may still be torn (the paused last pass cannot tear). */
  private checkNoTornPages(): void {
    const torn = this.memory.tornPages();
    if (!torn.count) return;
    throw new VcpudError(
      'data_loss',
      `${torn.count} page(s) failed their CRC in the last pass (the lowest: page ${torn.first}), which the paused guest could not have rewritten: damaged in transit`,
      { reason: 'MIGRATION_FAILED' },
    );
  }

  private async commit(state: DecodedState, run: boolean): Promise<void> {
    const channel = this.channel as Channel;
    const t0 = process.hrtime.bigint();
    await this.kvmVmReady;
    if (this.state !== 'receiving') throw new VcpudError('unavailable', `incoming migration ${this.id} was ${this.state}: ${this.error}`);
    const kvmVm = this.kvmVm as Vm;
    this.kvmVm = undefined; // owned by the restore from here on (it destroys it on failure)
    const loaded = {
      header: state.header,
      vcpuState: state.vcpuState,
      vmState: state.vmState,
      memory: this.memory,
      end: { records: 0, memoryPages: 0, pagesStored: 0 },
      mappedBytes: 0,
      copiedBytes: 0,
      bytes: 0,
    };
    const { vm, notes } = await restoreIntoNewVm(this.registry, this.caps, loaded, { vm: kvmVm, name: this.name });
    const t1 = process.hrtime.bigint();
    if (this.state !== 'receiving') {
      // aborted while the state was applied: the abort won
      this.registry.destroy(vm.id);
      throw new VcpudError('unavailable', `incoming migration ${this.id} was aborted during the commit: ${this.error}`);
    }
    // Committed from here: the VM is this server's. A source that does not hear the answer asks
    // AbortIncomingMigration, which says so.
    this.vm = vm;
    this.state = 'committed';
    this.settle();
    if (run) await Promise.all(state.header.vcpus.filter((c) => c.runState === 'running').map((c) => vm.vcpu(c.id).resume()));
    const t2 = process.hrtime.bigint();
    const committed: Committed = { vmId: vm.id, restoreMs: Number(t1 - t0) / 1e6, resumeMs: Number(t2 - t1) / 1e6, notes, vm: this.describe?.(vm) };
    await channel.sendJson(EnvelopeType.Committed, committed).catch(() => {});
    channel.close();
  }

  /** Discards the migration unless committed (`abandoned`: see the field); answers the resulting state. Idempotent. */
  discard(reason: string, opts: { keepChannel?: boolean; abandoned?: boolean } = {}): IncomingState {
    if (this.state === 'committed' || this.state === 'aborted') return this.state;
    this.state = 'aborted';
    this.error = reason;
    this.abandoned = !!opts.abandoned;
    clearTimeout(this.timer);
    if (!opts.keepChannel) this.channel?.destroy();
    this.kvmVm?.close(); // frees the memory too (a KVM VM still being made is closed once made)
    this.kvmVm = undefined;
    this.settle();
    return this.state;
  }
}
