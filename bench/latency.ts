/** Latency summaries of a load run: percentiles and a log-scale histogram, printable as text. */
import { percentileSorted } from './floors';

export interface HistogramBucket {
  /** Upper bound of the bucket in milliseconds (inclusive); the lower bound is the previous bucket's. */
  leMs: number;
  count: number;
}

export interface LatencySummary {
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
  /** Consecutive 1-2-5 buckets from the first to the last non-empty one: counts sum to the calls. */
  histogram: HistogramBucket[];
}

/** 1-2-5 steps per decade from 10 us: log scale, yet bounds a person reads at a glance. */
function bucketBounds(maxMs: number): number[] {
  const bounds: number[] = [];
  for (let decade = 0.01; ; decade *= 10) {
    for (const m of [1, 2, 5]) {
      const b = Number((m * decade).toPrecision(1));
      bounds.push(b);
      if (b >= maxMs) return bounds;
    }
  }
}

/** Summarizes latencies in milliseconds (the array is sorted in place). */
export function summarize(latenciesMs: Float64Array): LatencySummary {
  const n = latenciesMs.length;
  if (!n) return { p50: 0, p90: 0, p99: 0, max: 0, mean: 0, histogram: [] };
  const sorted = latenciesMs.sort();
  const bounds = bucketBounds(sorted[n - 1]);
  const counts = new Array<number>(bounds.length).fill(0);
  let b = 0;
  let sum = 0;
  for (const v of sorted) {
    while (v > bounds[b]) b++; // sorted input: one pass, the bucket index only moves forward
    counts[b]++;
    sum += v;
  }
  const first = counts.findIndex((c) => c > 0);
  const histogram = bounds.map((leMs, i) => ({ leMs, count: counts[i] })).slice(first);
  return {
    p50: percentileSorted(sorted, 50),
    p90: percentileSorted(sorted, 90),
    p99: percentileSorted(sorted, 99),
    max: sorted[n - 1],
    mean: sum / n,
    histogram,
  };
}

/** A few lines of "<= 0.5 ms   1234  ########": bars scaled to the fullest bucket. */
export function histogramText(histogram: HistogramBucket[], width = 40): string {
  const most = Math.max(1, ...histogram.map((h) => h.count));
  const labels = histogram.map((h) => `<= ${h.leMs} ms`);
  const counts = histogram.map((h) => String(h.count));
  const lw = Math.max(...labels.map((l) => l.length));
  const cw = Math.max(...counts.map((c) => c.length));
  return histogram
    .map((h, i) => {
      const bar = '#'.repeat(h.count ? Math.max(1, Math.round((h.count / most) * width)) : 0);
      return `  ${labels[i].padEnd(lw)}  ${counts[i].padStart(cw)}  ${bar}`;
    })
    .join('\n');
}
