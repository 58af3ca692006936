/**
 * vcpud's heap limits under GetState load (src/server/heap-limits.ts), read from its own default
 * metrics after a bounded load: the young generation stays at its cap (V8 would double its
 * semi-spaces up to 32 MiB together, and the RSS with them), and the old generation is collected
 * (V8 left to itself ran no full collection under that load while its garbage, and the RSS, grew).
 */
import { pausedCounterVm } from '../../bench/floors';
import { runLoad } from '../../bench/loadgen';
import { YOUNG_GENERATION_CAP } from '../../src/server/heap-limit-values';
import { describeKvm } from '../support/kvm';
import { startVcpud, type VcpudProcess } from '../support/vcpud-process';

const metric = (text: string, series: string): number => {
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? Number.NaN : Number(line.slice(series.length + 1));
};
const NEW_SPACE = 'nodejs_heap_space_size_total_bytes{space="new"}';
const FULL_COLLECTIONS = 'nodejs_gc_duration_seconds_count{kind="major"}';
const CALLS = 20_000;

describeKvm('heap limits under GetState load', () => {
  let d: VcpudProcess;
  beforeAll(async () => {
    d = await startVcpud();
  });
  afterAll(() => d.stop());

  it(`64 clients, ${CALLS} GetStates: the young generation ends at most at its cap, the old one is collected`, async () => {
    const vm = await pausedCounterVm(d.client('VmService'));
    const before = await d.scrape();
    const load = await runLoad({ target: d.serving.api, vmId: vm.id, clients: 64, count: CALLS });
    expect(load.codes).toEqual({ OK: CALLS });
    const after = await d.scrape();
    const young = metric(after, NEW_SPACE);
    const full = metric(after, FULL_COLLECTIONS) - (metric(before, FULL_COLLECTIONS) || 0);
    console.log(
      `after ${CALLS} GetStates: young generation ${young / 2 ** 20} MiB (cap ${YOUNG_GENERATION_CAP / 2 ** 20} MiB), ${full} full collections during the load`,
    );
    expect(young).toBeGreaterThan(0);
    expect(young).toBeLessThanOrEqual(YOUNG_GENERATION_CAP);
    expect(full).toBeGreaterThanOrEqual(1);
  }, 120_000);
});
