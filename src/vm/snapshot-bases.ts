/**
 * The snapshots of one VM that incremental snapshots can be taken against ("bases"), and the pages
 * dirtied since each. Tracking starts with a snapshot taken with track_dirty (or as a parent) and
 * stays on for the VM's life; from then on every snapshot of it to a file becomes a base.
 *
 * One consumer of the VM's DirtyLogHub serves all bases: each snapshot (VM paused) collects what was
 * dirtied since the previous one and ORs it into every base's bitmap, so a base's bitmap is exactly
 * the pages written since that snapshot. Collected bits are never consumed by a snapshot that then
 * fails (a full disk): they stay in the bitmaps, and the next child still stores them.
 */
import { VcpudError } from '../errors';
import { DirtyLogHub, orInto, type DirtyConsumer } from './dirty-log-hub';
import type { ManagedVm } from './managed-vm';
import { MAX_CHAIN_DEPTH, satisfiesLink, type ParentLink, type SnapshotHeader, type SnapshotIdentity } from './snapshot-format';

/** Bases kept per VM (a bit per page each: 32 KiB per GiB); the oldest goes first. */
export const MAX_BASES = 64;

interface Base {
  identity: SnapshotIdentity;
  /** Per region: pages dirtied since the snapshot. */
  dirty: Buffer[];
}

const tracked = new WeakMap<ManagedVm, SnapshotBases>();

/** SNAPSHOT_PARENT_UNTRACKED naming the parent and why. */
function untracked(parent: string, why: string): VcpudError {
  return new VcpudError('failed_precondition', `snapshot ${JSON.stringify(parent)} cannot be the parent: ${why}`, {
    reason: 'SNAPSHOT_PARENT_UNTRACKED',
    field: 'parent',
  });
}

export class SnapshotBases {
  private readonly bases = new Map<string, Base>();

  private constructor(private readonly consumer: DirtyConsumer) {}

  /** The VM's bases, or undefined while it has never been tracked. */
  static of(vm: ManagedVm): SnapshotBases | undefined {
    return tracked.get(vm);
  }

  /** The VM's bases, starting its dirty tracking (the VM must be paused: no write goes unseen). */
  static start(vm: ManagedVm): SnapshotBases {
    let b = tracked.get(vm);
    if (!b) {
      b = new SnapshotBases(DirtyLogHub.for(vm.vm).subscribe());
      tracked.set(vm, b);
      vm.once('destroyed', () => b?.consumer.close());
    }
    return b;
  }

  /**
   * The link and chain depth of an incremental snapshot of `vm` against the snapshot `name` (its
   * header and identity as read from the file), or SNAPSHOT_PARENT_UNTRACKED saying why it cannot be.
   */
  static parentLink(vm: ManagedVm, name: string, header: SnapshotHeader, identity: SnapshotIdentity): { link: ParentLink; depth: number } {
    if (header.vm.id !== vm.id) throw untracked(name, `it is a snapshot of VM ${header.vm.id}${header.vm.name ? ` (${header.vm.name})` : ''}, not of ${vm.id}`);
    if (!header.snapshotId) throw untracked(name, `it is in snapshot format ${header.formatVersion}, taken before incremental snapshots existed`);
    const bases = tracked.get(vm);
    if (!bases) throw untracked(name, `VM ${vm.id}'s dirty tracking is off: it starts with a snapshot taken with track_dirty (take one, then its children)`);
    const base = bases.bases.get(header.snapshotId);
    if (!base)
      throw untracked(
        name,
        `it was taken before VM ${vm.id}'s dirty tracking started (or by an earlier vcpud process, or is older than the last ${MAX_BASES} snapshots tracked)`,
      );
    if (!satisfiesLink(header, identity, base.identity)) throw untracked(name, 'the file was rewritten since it was taken: it is not the snapshot tracked');
    // The file's depth, not the base's: a merge replaced the chain with a full snapshot.
    const depth = header.chainDepth ?? 0;
    if (depth + 1 > MAX_CHAIN_DEPTH)
      throw untracked(name, `its chain is ${depth} links deep already (at most ${MAX_CHAIN_DEPTH}): merge it first (MergeSnapshot)`);
    return { link: { name, ...identity }, depth };
  }

  /** The identity recorded for base `snapshotId` of `vm`, if tracked. */
  static recorded(vm: ManagedVm, snapshotId: string): SnapshotIdentity | undefined {
    return tracked.get(vm)?.bases.get(snapshotId)?.identity;
  }

  /** Collects the pages dirtied since the last collection into every base (the VM paused). */
  async collect(): Promise<void> {
    const bits = await this.consumer.take();
    for (const b of this.bases.values()) for (const [i, d] of b.dirty.entries()) orInto(d, bits[i]);
  }

  /** The pages dirtied since base `snapshotId` (after collect()), a copy per region. */
  dirtySince(snapshotId: string): Buffer[] {
    const base = this.bases.get(snapshotId);
    if (!base) throw new VcpudError('internal', `base ${snapshotId} is not tracked`);
    return base.dirty.map((d) => Buffer.from(d));
  }

  /** Records a snapshot just written (at the collection before it) as a base. */
  add(identity: SnapshotIdentity): void {
    if (this.bases.size >= MAX_BASES) this.bases.delete(this.bases.keys().next().value as string);
    this.bases.set(identity.snapshotId, { identity, dirty: this.consumer.pending.map((p) => Buffer.alloc(p.length)) });
  }
}
