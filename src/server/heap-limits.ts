/**
 * vcpud's V8 heap limits, set in-process (main.ts imports this first, before start-up allocates):
 * they bound its RSS under a steady RPC load (issue 17: 64 clients calling GetState) without
 * NODE_OPTIONS, which is the operator's. Measured in BENCHMARKS.md ("vcpud's RSS under GetState load").
 *
 * Young generation: under that load V8 doubles its two semi-spaces up to their 16 MiB maximum and
 * touches every page: 32 MiB of RSS that a GetState, whose garbage dies within the call, does not
 * need. The maximum can't be lowered once the isolate exists (--max-semi-space-size is read at its
 * creation), but V8 reads --semi-space-growth-factor at each growth: while the young generation is
 * at the cap, a factor of 1 stops it there. Stopping it at V8's initial size instead cost ~6x the
 * scavenges' time.
 *
 * Old generation: left to itself, V8 ran no full collection under that load, and the garbage the
 * scavenges promote (with the native memory of closed connections it holds) added ~9 MiB of RSS
 * per 4 s of load. A full collection once the old generation is 1.2x what survived the last one
 * keeps it bounded for ~1.5% of a GetState's CPU. Bulk streams raise it while they run (bulk-heap.ts).
 */
import { PerformanceObserver } from 'node:perf_hooks';
import v8 from 'node:v8';
import { setHeapGrowingPercent } from '../bulk-heap';
import { RPC_HEAP_GROWING_PERCENT, YOUNG_GENERATION_CAP } from './heap-limit-values';

const youngGenerationSize = (): number => v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space')?.space_size ?? 0;

/** V8's default --semi-space-growth-factor: the young generation doubles when it grows. */
const V8_GROWTH_FACTOR = 2;
let capped = false;

/**
 * Lets the young generation grow (doubling, as V8 does) while it is under the cap, and stops it once it
 * reaches it. From V8's initial size the doublings land on the cap; from a size a shrink left, the
 * last one may pass it, up to V8's own maximum. Checked after every collection, for as long as the
 * process runs: V8 shrinks the young generation when a collection sees little allocation (an idle
 * vcpud), and with growth stopped for good it stayed at 1-2 MiB under the next load, 7x the
 * scavenges and 20-40 us more server CPU per GetState (BENCHMARKS.md).
 */
function holdYoungGenerationAtCap(): void {
  const atCap = youngGenerationSize() >= YOUNG_GENERATION_CAP;
  if (atCap === capped) return;
  capped = atCap;
  v8.setFlagsFromString(`--semi-space-growth-factor=${atCap ? 1 : V8_GROWTH_FACTOR}`);
}

setHeapGrowingPercent(RPC_HEAP_GROWING_PERCENT);
holdYoungGenerationAtCap();
// Growth and shrinking happen only at a collection.
new PerformanceObserver(holdYoungGenerationAtCap).observe({ entryTypes: ['gc'] });
