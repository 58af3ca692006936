/**
 * Histogram observations and counter increments for one fixed label set, counted here and added to
 * prom-client's series when the metric is collected (a scrape, or get()).
 *
 * Why: prom-client's observe() validates the labels, hashes them into a string and looks the series up
 * on every call, and even a series kept aside is a dictionary keyed by strings (bucket bounds as
 * property names). A GetState makes 25 observations (12 ioctl durations, 13 section sizes) and the RPC's
 * own; served between gRPC calls they cost ~300 ns each, 2-3% of its server CPU (BENCHMARKS.md). Here an
 * observation is a bound search over numbers and three additions to a typed array and two numbers.
 *
 * The exposition is prom-client's own for the same observations: at collection each bound label set's
 * pending counts are added to its series (made with zero() if prom-client has none), and the sum is
 * carried as the running total prom-client's per-observation `sum += value` gives, so it is the same
 * float. A reset() drops what is pending with the series. This relies on prom-client 15's internals
 * (hashMap of { labels, bucketValues keyed by upper bound, sum, count } for histograms and of
 * { labels, value } for counters; the `collect` hook get() calls), pinned in package.json;
 * test/unit/bound-histogram.test.ts checks the exposition against prom-client's own observe() and inc().
 */
import type { Counter, Histogram, LabelValues } from 'prom-client';

export type Observe = (value: number) => void;

interface HistogramSeries {
  labels: LabelValues<string>;
  bucketValues: Record<string, number>;
  sum: number;
  count: number;
}

interface CounterSeries {
  labels: LabelValues<string>;
  value: number;
}

/** What this module reaches into: the series by label hash, the bounds, and the collect and reset hooks. */
interface MetricInternals<S> {
  hashMap: Record<string, S>;
  upperBounds?: readonly number[];
  collect?: () => unknown;
  reset(): void;
  zero?(labels: LabelValues<string>): void;
}

function internals<S>(metric: object, what: string): MetricInternals<S> {
  const m = metric as Partial<MetricInternals<S>>;
  if (typeof m.hashMap !== 'object' || m.hashMap === null || typeof m.reset !== 'function')
    throw new Error(`bound ${what}: prom-client internals changed (no hashMap/reset); update src/server/bound-histogram.ts`);
  return m as MetricInternals<S>;
}

const sameLabels = (a: LabelValues<string>, b: LabelValues<string>): boolean => {
  const ka = Object.keys(a);
  return ka.length === Object.keys(b).length && ka.every((k) => String(a[k]) === String(b[k]));
};

function seriesOf<S extends { labels: LabelValues<string> }>(map: Record<string, S>, labels: LabelValues<string>): S | undefined {
  for (const k in map) if (sameLabels(map[k].labels, labels)) return map[k];
  return undefined;
}

/** The pending label sets of one metric, added in at its collection and dropped at its reset (hooks installed once). */
interface Deferred {
  flush(): void;
  drop(): void;
}
const deferredOf = new WeakMap<object, { parts: Deferred[] }>();

function defer(metric: object, what: string, part: Deferred): void {
  let d = deferredOf.get(metric);
  if (!d) {
    const m = internals(metric, what);
    const parts: Deferred[] = [];
    const collect = m.collect;
    const reset = m.reset.bind(metric);
    m.collect = function (this: unknown) {
      for (const p of parts) p.flush();
      return collect?.call(this);
    };
    m.reset = () => {
      for (const p of parts) p.drop();
      reset();
    };
    deferredOf.set(metric, (d = { parts }));
  }
  d.parts.push(part);
}

/** observe(value) for `labels` on `histogram`, as histogram.observe(labels, value) counts it. */
export function boundObserver<T extends string>(histogram: Histogram<T>, labels: LabelValues<T>): Observe {
  const m = internals<HistogramSeries>(histogram, 'histogram');
  const bounds = m.upperBounds;
  if (!Array.isArray(bounds) || typeof m.zero !== 'function')
    throw new Error('bound histogram: prom-client Histogram internals changed (no upperBounds/zero); update src/server/bound-histogram.ts');
  const n = bounds.length;
  const keys = bounds.map(String);
  // Per bucket: observations whose first bound at or above them is bounds[i]; [n]: above them all (+Inf only).
  const counts = new Float64Array(n + 1);
  let count = 0;
  // The series' sum as prom-client would hold it (base plus each value, in order), and the sum last added in.
  let sum = 0;
  let base = 0;
  // The series exists from this label set's first observation (after a reset, its first since), as
  // prom-client makes it: the exposition lists series in the order they were made.
  let made = false;
  const make = () => {
    let series = seriesOf(m.hashMap, labels);
    if (!series) {
      m.zero!(labels);
      series = seriesOf(m.hashMap, labels)!;
    }
    made = true;
    sum = base = series.sum;
    return series;
  };
  defer(histogram, 'histogram', {
    flush() {
      if (count === 0) return;
      const series = seriesOf(m.hashMap, labels) ?? make();
      series.sum = series.sum === base ? sum : series.sum + (sum - base);
      series.count += count;
      for (let i = 0; i < n; i++) if (counts[i]) series.bucketValues[keys[i]] += counts[i];
      counts.fill(0);
      count = 0;
      sum = base = series.sum;
    },
    drop() {
      counts.fill(0);
      count = 0;
      made = false;
    },
  });
  return (value) => {
    // Refused, and counted nowhere, as prom-client refuses it (a TypeError).
    if (!Number.isFinite(value)) return histogram.observe(labels, value);
    if (!made) make();
    let i = 0;
    while (i < n && value > bounds[i]) i++;
    counts[i] += 1;
    count += 1;
    sum += value;
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

/** inc() by 1 for `labels` on `counter`, as counter.inc(labels) counts it (the RPC counters take four per call). */
export function boundIncrement<T extends string>(counter: Counter<T>, labels: LabelValues<T>): () => void {
  const m = internals<CounterSeries>(counter, 'counter');
  let pending = 0;
  // Made at the first increment (after a reset, the first since), in prom-client's order (boundObserver).
  let made = false;
  defer(counter, 'counter', {
    flush() {
      if (pending === 0) return;
      const series = seriesOf(m.hashMap, labels);
      if (series) series.value += pending;
      else counter.inc(labels, pending);
      pending = 0;
    },
    drop() {
      pending = 0;
      made = false;
    },
  });
  return () => {
    if (!made) {
      if (!seriesOf(m.hashMap, labels)) counter.inc(labels, 0);
      made = true;
    }
    pending += 1;
  };
}
