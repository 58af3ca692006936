/**
 * Incremental snapshots' chains, read from the snapshot directory: an ancestor is found by the name
 * its child's link records and accepted only when it is the snapshot the child was taken against
 * (snapshot-format.ts: satisfiesLink). Every ancestor is read through loadLayer, all of them at
 * once, each child's pages applied over its parent's (mapped lazily from the files where the layout
 * allows, each page once from the newest layer storing it: snapshot-page-plan.ts) while their
 * checksums run; the restore goes on only once every checksum matched
 * (loadSnapshot awaits `verified`). Errors name the link ("CHILD -> PARENT").
 */
import fs from 'node:fs';
import { VcpudError } from '../errors';
import { MAX_CHAIN_DEPTH, satisfiesLink, type ParentLink, type SnapshotHeader } from './snapshot-format';
import { FileSource, loadLayer, type LoadedLayer, type LoadOptions } from './snapshot-reader';
import type { SnapshotStore } from './snapshot-store';

/** SNAPSHOT_CHAIN_BROKEN: FAILED_PRECONDITION for a missing ancestor, DATA_LOSS for a changed one. */
export function chainBroken(kind: 'failed_precondition' | 'data_loss', child: string, parent: string, why: string): VcpudError {
  return new VcpudError(kind, `the snapshot chain is broken at link ${JSON.stringify(child)} -> ${JSON.stringify(parent)}: ${why}`, {
    reason: 'SNAPSHOT_CHAIN_BROKEN',
    field: 'name',
  });
}

const ANNOTATED = Symbol('chain link named');

type Allocate = NonNullable<LoadOptions['allocate']>;

/** loadSnapshot's loadParent for a snapshot named `childName` ("(streamed)" for a stream). */
export function chainLoader(store: SnapshotStore, childName: string, opts: { lazy?: boolean } = {}): NonNullable<LoadOptions['loadParent']> {
  const load = async (link: ParentLink, child: SnapshotHeader, name: string, depth: number, allocate?: Allocate): Promise<LoadedLayer> => {
    const broken = (kind: 'failed_precondition' | 'data_loss', why: string) => chainBroken(kind, name, link.name, why);
    if (depth > MAX_CHAIN_DEPTH) throw broken('data_loss', `the chain is deeper than ${MAX_CHAIN_DEPTH} links`);
    let fd: number;
    try {
      ({ fd } = await store.openForRead(link.name));
    } catch (e) {
      if ((e as VcpudError).kind === 'not_found') throw broken('failed_precondition', 'the parent is missing from the snapshot directory');
      throw e;
    }
    /** A corrupt ancestor's error says which one, once (its children's loaders pass it on). */
    const named = (e: unknown) => {
      const err = e as VcpudError & { [ANNOTATED]?: boolean };
      if (err instanceof VcpudError && err.details?.reason === 'SNAPSHOT_CORRUPT' && !err[ANNOTATED]) {
        err.message = `ancestor ${JSON.stringify(link.name)} (link ${JSON.stringify(name)} -> ${JSON.stringify(link.name)}): ${err.message}`;
        err[ANNOTATED] = true;
      }
      return e;
    };
    let loaded: LoadedLayer | undefined;
    try {
      loaded = await loadLayer(
        new FileSource(fd),
        {
          check: (h) => {
            // The id first (cheap, before any memory is read); the whole identity once END is read.
            if (h.snapshotId !== link.snapshotId)
              throw broken(
                'data_loss',
                `the file there is another snapshot (id ${h.snapshotId ?? 'none, format 1'}, the child was taken of ${link.snapshotId}): it was replaced`,
              );
            if (h.vm.memoryBytes !== child.vm.memoryBytes || h.vm.vcpuCount !== child.vm.vcpuCount)
              throw broken(
                'data_loss',
                `the parent has ${h.vm.memoryBytes} bytes of memory and ${h.vm.vcpuCount} vCPUs, the child ${child.vm.memoryBytes} and ${child.vm.vcpuCount}`,
              );
          },
          lazy: opts.lazy,
          asAncestor: true,
          allocate,
          loadParent: (l, h, a) => load(l, h, link.name, depth + 1, a),
        },
        fd,
      );
      const verified = loaded.verified.catch((e) => {
        throw named(e);
      });
      verified.catch(() => {}); // awaited by the restore (loadSnapshot), unless a failure here comes first
      if (!satisfiesLink(loaded.header, loaded.identity, link)) {
        loaded.plan?.settle();
        loaded.memory.release();
        throw broken('data_loss', 'the file there has the same id but other contents than the child was taken against: it was rewritten');
      }
      return { ...loaded, verified };
    } catch (e) {
      throw named(e);
    } finally {
      // Mappings of the file outlive the descriptor; the layer's checksums read through it until they
      // settle, and the restored snapshot maps or reads this layer's pages through it (plan.done).
      const close = () => fs.closeSync(fd);
      if (loaded) Promise.allSettled([loaded.verified, loaded.plan?.done]).then(close);
      else close();
    }
  };
  return (link, child, allocate) => load(link, child, childName, 1, allocate);
}
