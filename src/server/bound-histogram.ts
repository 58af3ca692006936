/**
 * Histogram observations for one fixed label set without prom-client's per-call work.
 *
 * Why: prom-client's observe() validates the labels, hashes them into a string and looks the series up on
 * every call; a GetState makes 25 of them (12 ioctl durations, 13 section sizes) plus the RPC's own, a
 * few percent of its server CPU. A bound observer makes its first observation through prom-client (which
 * creates the series), keeps that series object, and adds later observations to its bucket counts, sum and
 * count directly, for as long as prom-client still holds the same object (a reset() replaces it: the next
 * observation goes through prom-client again).
 *
 * This relies on prom-client 15's Histogram internals (hashMap of { labels, bucketValues, sum, count },
 * bucketValues keyed by upper bound, counted per bucket and summed at export), pinned in package.json;
 * test/unit/bound-histogram.test.ts checks the exposition against prom-client's own observe().
 */
import type { Counter, Histogram, LabelValues } from 'prom-client';

interface Series {
  labels: LabelValues<string>;
  bucketValues: Record<string, number>;
  sum: number;
  count: number;
}

interface HistogramInternals {
  hashMap: Record<string, Series>;
  upperBounds: readonly number[];
}

function internals(h: Histogram<string>): HistogramInternals {
  const i = h as unknown as Partial<HistogramInternals>;
  if (typeof i.hashMap !== 'object' || i.hashMap === null || !Array.isArray(i.upperBounds))
    throw new Error('bound histogram: prom-client Histogram internals changed (no hashMap/upperBounds); update src/server/bound-histogram.ts');
  return i as HistogramInternals;
}

const sameLabels = (a: LabelValues<string>, b: LabelValues<string>): boolean => {
  const ka = Object.keys(a);
  return ka.length === Object.keys(b).length && ka.every((k) => String(a[k]) === String(b[k]));
};

export type Observe = (value: number) => void;

/** observe(value) for `labels` on `histogram`, as histogram.observe(labels, value) does. */
export function boundObserver<T extends string>(histogram: Histogram<T>, labels: LabelValues<T>): Observe {
  const h = histogram as unknown as Histogram<string>;
  const bounds = internals(h).upperBounds;
  // bucketValues is keyed by the bounds as property names: converted once, not on every observation.
  const keys = bounds.map(String);
  let series: Series | undefined;
  let key = '';
  return (value) => {
    const map = internals(h).hashMap;
    if (series !== undefined && map[key] === series && Number.isFinite(value)) {
      series.sum += value;
      series.count += 1;
      // The first bound at or above the value, as prom-client's findBound; above them all only +Inf counts it.
      for (let i = 0; i < bounds.length; i++) {
        if (value <= bounds[i]) {
          series.bucketValues[keys[i]] += 1;
          break;
        }
      }
      return;
    }
    h.observe(labels, value);
    series = undefined;
    for (const [k, s] of Object.entries(map)) {
      if (sameLabels(s.labels, labels)) {
        series = s;
        key = k;
        break;
      }
    }
  };
}

/** Bound observers of one histogram, made on first use per label value (`name` is the one label). */
export function boundObservers<T extends string>(histogram: Histogram<T>, name: T): (value: string) => Observe {
  const byValue = new Map<string, Observe>();
  return (value) => {
    let o = byValue.get(value);
    if (!o) byValue.set(value, (o = boundObserver(histogram, { [name]: value } as LabelValues<T>)));
    return o;
  };
}

interface CounterSeries {
  value: number;
}

/**
 * inc() by 1 for `labels` on `counter`, as counter.inc(labels) does, without prom-client's per-call label
 * validation and hashing (the RPC counters take four incs per call). Relies on prom-client 15's Counter
 * internals (hashMap of { value, labels }, inc() returning the series' labelHash), like boundObserver; a
 * reset() replaces the series and the next inc goes through prom-client again.
 */
export function boundIncrement<T extends string>(counter: Counter<T>, labels: LabelValues<T>): () => void {
  let series: CounterSeries | undefined;
  let key = '';
  return () => {
    const map = (counter as unknown as { hashMap: Record<string, CounterSeries> }).hashMap;
    if (series !== undefined && map[key] === series) {
      series.value += 1;
      return;
    }
    const { labelHash } = counter.inc(labels) as unknown as { labelHash?: string };
    if (typeof labelHash !== 'string' || typeof map?.[labelHash]?.value !== 'number')
      throw new Error('bound counter: prom-client Counter internals changed (inc() gives no labelHash); update src/server/bound-histogram.ts');
    key = labelHash;
    series = map[key];
  };
}
