/**
 * Keeping chains of incremental snapshots bounded and whole: MergeSnapshot folds a chain into one
 * full snapshot (atomically, by the writer's temporary-file-and-rename), DeleteSnapshot refuses to
 * orphan children unless asked to remove them too.
 */
import path from 'node:path';
import { VcpudError } from '../errors';
import { snapshotWriteError } from './snapshot-write-error';
import { chainLoader } from './snapshot-chain';
import type { SnapshotEnd, SnapshotHeader } from './snapshot-format';
import { FileSource, loadSnapshot } from './snapshot-reader';
import type { SnapshotStore } from './snapshot-store';
import { AtomicFileSink, writeSnapshot } from './snapshot-writer';
import { closeFd } from '../ffi/fs-at';

/** Names of the snapshots whose parent link names `name`, then theirs, ... (children before their parents' parents: deepest last). */
async function descendants(store: SnapshotStore, name: string): Promise<string[]> {
  const children = new Map<string, string[]>();
  for (const e of await store.allEntries()) {
    const p = e.header?.parent?.name;
    if (p) children.set(p, [...(children.get(p) ?? []), e.name]);
  }
  const out: string[] = [];
  const seen = new Set([name]);
  for (let frontier = [name]; frontier.length; ) {
    const next: string[] = [];
    for (const n of frontier) for (const c of children.get(n) ?? []) if (!seen.has(c)) seen.add(c), next.push(c);
    out.push(...next);
    frontier = next;
  }
  return out;
}

/**
 * Removes snapshot `name`; with children, only with `cascade` (SNAPSHOT_HAS_CHILDREN otherwise), and
 * then the deepest descendants first, so a failure midway leaves only whole chains.
 */
export async function deleteSnapshot(store: SnapshotStore, name: string, cascade: boolean): Promise<{ deleted: string[] }> {
  store.components(name);
  const below = await descendants(store, name);
  if (below.length && !cascade)
    throw new VcpudError(
      'failed_precondition',
      `snapshot ${JSON.stringify(name)} is the parent of ${below.map((n) => JSON.stringify(n)).join(', ')}: delete with cascade to remove them too, or merge them first`,
      {
        reason: 'SNAPSHOT_HAS_CHILDREN',
        field: 'name',
      },
    );
  const deleted: string[] = [];
  for (const n of [...below.reverse(), name]) {
    await store.remove(n);
    deleted.push(n);
  }
  return { deleted };
}

export interface MergeResult {
  name: string;
  header: SnapshotHeader;
  end: SnapshotEnd;
  bytes: number;
  chainLength: number;
}

/**
 * Folds the chain ending at `name` into one full snapshot written to `target` (atomically; `target`
 * may be `name`). Every checksum and link is verified while the chain is read; the merged snapshot
 * keeps the snapshot's id and state and records the identity it replaces (mergedFrom), so children
 * of `name` still link to it.
 */
export async function mergeSnapshot(store: SnapshotStore, name: string, target: string): Promise<MergeResult> {
  if (target !== name) {
    // Replacing a snapshot that has children would break their links.
    const below = await descendants(store, target);
    if (below.length)
      throw new VcpudError(
        'failed_precondition',
        `target ${JSON.stringify(target)} is the parent of ${below.map((n) => JSON.stringify(n)).join(', ')}: merging over it would break their chains`,
        {
          reason: 'SNAPSHOT_HAS_CHILDREN',
          field: 'target',
        },
      );
  }
  const { fd } = await store.openForRead(name);
  let loaded: Awaited<ReturnType<typeof loadSnapshot>>;
  try {
    loaded = await loadSnapshot(new FileSource(fd), { check: () => {}, loadParent: chainLoader(store, name) }, fd);
  } finally {
    await closeFd(fd);
  }
  try {
    const { header } = loaded;
    if (!header.parent && target === name) return { name, header, end: loaded.end, bytes: loaded.bytes, chainLength: 1 };
    const merged: SnapshotHeader = { ...header, chainDepth: 0, ...(header.parent ? { mergedFrom: loaded.identity } : {}) };
    delete merged.parent;
    // Over its own name is what a merge does; a target elsewhere is replaced too (MergeSnapshotRequest.target).
    const out = await store.openForWrite(target, { replace: true }).catch((e) => {
      throw snapshotWriteError(e, target, path.join(store.dir, target)); // mkdir of a subdirectory
    });
    try {
      const sink = await AtomicFileSink.create(out);
      try {
        const { end } = await writeSnapshot(sink, {
          header: merged,
          vcpus: [...loaded.vcpuState].map(([id, records]) => ({ id, records: [...records] })),
          vmState: [...loaded.vmState],
          regions: [{ guestPhysAddr: 0, size: header.vm.memoryBytes, memory: loaded.memory }],
        });
        return { name: target, header: merged, end, bytes: sink.position, chainLength: loaded.chainLength };
      } catch (e) {
        await sink.abort();
        throw snapshotWriteError(e, target, out.displayPath);
      }
    } finally {
      await out.close();
    }
  } finally {
    loaded.memory.release();
  }
}
