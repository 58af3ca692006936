/**
 * A full V8 garbage collection on demand, so that a migration collects while its guest still runs
 * instead of inside the paused window: there, traced at 1 and 4 GiB, a major collection took up to
 * 29 ms and scavenges 1-3 ms (BENCHMARKS.md, "Downtime across guest sizes"). vcpud is not started
 * with --expose-gc; the flag exposes gc() to contexts made after it is set, and one such context
 * hands it over. Setting it does not change how or when V8 collects by itself.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let gc: (() => void) | undefined;

/** Runs a full (major) collection synchronously; returns the milliseconds it took. */
export function collectGarbage(): number {
  if (!gc) {
    setFlagsFromString('--expose-gc');
    gc = runInNewContext('gc') as () => void;
  }
  const t = process.hrtime.bigint();
  gc();
  return Number(process.hrtime.bigint() - t) / 1e6;
}
