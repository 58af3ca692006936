/**
 * The V8 heap setting for bulk byte streams (snapshot streams, on both ends).
 *
 * Why: V8 counts the ArrayBuffers a process allocates (each gRPC message grpc-js frames or
 * reassembles, every socket read of Node's HTTP/2) against the old generation's limit until the next
 * full collection. vcpud's heap is small and steady (~12 MiB live), so V8 sets that limit close above
 * it, and moving 1 GiB through grpc-js ran a full collection every ~8 MiB: about half of vcpud's CPU
 * time for a snapshot stream (BENCHMARKS.md, "Snapshot streams"). A trivial grpc-js process never
 * reaches its first limit. While a bulk stream runs, the limit grows 4x the live heap instead of
 * V8's own choice (--heap-growing-percent, read at each full collection); the last stream to end
 * gives back the setting in force before (vcpud's own for RPC load, src/server/heap-limits.ts; V8's
 * choice elsewhere).
 */
import v8 from 'node:v8';

const BULK_HEAP_GROWING_PERCENT = 300;
let streams = 0;
/** --heap-growing-percent outside bulk streams; 0: V8 chooses. */
let basePercent = 0;

/** Sets the heap growing percent in force outside bulk streams (now, or when the last one ends). */
export function setHeapGrowingPercent(percent: number): void {
  basePercent = percent;
  if (streams === 0) v8.setFlagsFromString(`--heap-growing-percent=${percent}`);
}

/** Runs `fn` (a bulk stream) with the bulk heap setting in force. */
export async function withBulkHeap<T>(fn: () => Promise<T>): Promise<T> {
  if (streams++ === 0) v8.setFlagsFromString(`--heap-growing-percent=${BULK_HEAP_GROWING_PERCENT}`);
  try {
    return await fn();
  } finally {
    if (--streams === 0) v8.setFlagsFromString(`--heap-growing-percent=${basePercent}`);
  }
}

/** Bulk streams running now (tests). */
export const bulkStreams = (): number => streams;
