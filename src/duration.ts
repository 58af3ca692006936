/**
 * google.protobuf.Duration <-> milliseconds, for the server (snapshot and migration reports, the
 * migration knobs it reads) and vcpuctl (the knobs it sends) alike.
 */

/** The Duration message as proto-loader gives and takes it (longs as strings). */
export interface DurationMessage {
  seconds?: string | number | null;
  nanos?: number | null;
}

/** A non-negative number of milliseconds as a Duration (whole seconds, the rest in nanos). */
export function msToDuration(ms: number): { seconds: string; nanos: number } {
  const seconds = Math.floor(ms / 1000);
  return { seconds: String(seconds), nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

/** A Duration in milliseconds; `fallback` when the field is unset. */
export function durationToMs(d: DurationMessage | null | undefined, fallback: number): number {
  if (!d) return fallback;
  return Number(d.seconds ?? 0) * 1000 + (d.nanos ?? 0) / 1e6;
}
