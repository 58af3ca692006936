/**
 * vcpud's V8 heap limits, set in-process (main.ts imports this first, before start-up allocates):
 * they bound its RSS under a steady RPC load (issue 17: 64 clients calling GetState) without
 * NODE_OPTIONS, which is the operator's. Measured in BENCHMARKS.md ("vcpud's RSS under GetState load").
 *
 * Young generation: under that load V8 doubles its two semi-spaces up to their 16 MiB maximum and
 * touches every page: 32 MiB of RSS that a GetState, whose garbage dies within the call, does not
 * need. The maximum can't be lowered once the isolate exists (--max-semi-space-size is read at its
 * creation), but V8 reads --semi-space-growth-factor at each growth: once the young generation has
 * reached the cap, a factor of 1 stops it there. Stopping it at V8's initial size instead cost
 * ~6x the scavenges' time.
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

function stopYoungGenerationGrowing(): boolean {
  if (youngGenerationSize() < YOUNG_GENERATION_CAP) return false;
  v8.setFlagsFromString('--semi-space-growth-factor=1');
  return true;
}

setHeapGrowingPercent(RPC_HEAP_GROWING_PERCENT);
if (!stopYoungGenerationGrowing()) {
  // Checked after each collection until the cap is reached: growth happens only at a scavenge.
  const observer = new PerformanceObserver(() => {
    if (stopYoungGenerationGrowing()) observer.disconnect();
  });
  observer.observe({ entryTypes: ['gc'] });
}
