/**
 * Compiles every section codec ahead of use. The struct readers and writers are generated on their
 * first call (codegen.ts); a migration's first switch-over otherwise generates them while the guest
 * is paused: the first capture on a source took 8.5 ms and the first restore on a destination
 * 11.7 ms here, against 2.5-4 ms warm, a share of it compiling codecs (cpu profiles of both vcpuds).
 */
import { CPUID2 } from './cpuid';
import { SECTIONS } from './index';
import { MSRS } from './msrs';
import type { Codec, ListCodec } from './struct';

/** The list sections, with one entry each so that the entry codec is compiled too. */
const LISTS: readonly ListCodec<unknown>[] = [MSRS as ListCodec<unknown>, CPUID2 as ListCodec<unknown>];

function zeroValueBytes(codec: Codec<unknown>): Buffer {
  const list = LISTS.find((l) => l.name === codec.name);
  if (!list) return Buffer.alloc(codec.size);
  const bytes = Buffer.alloc(list.sizeFor(1));
  (list.header.encode as (v: unknown) => Buffer)({ [list.countField]: 1 }).copy(bytes);
  return bytes;
}

let warmed = false;

/** Decodes and re-encodes a zero value of every section once per process; never throws. */
export function warmStateCodecs(): void {
  if (warmed) return;
  warmed = true;
  for (const codec of Object.values(SECTIONS) as Codec<unknown>[]) {
    try {
      codec.encode(codec.decode(zeroValueBytes(codec)));
    } catch {
      // A codec that refuses a zero value compiles on first use instead.
    }
  }
}
