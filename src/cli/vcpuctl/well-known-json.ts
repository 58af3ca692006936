/**
 * The proto3 JSON mapping of google.protobuf.Timestamp (an RFC 3339 string, "2026-11-24T16:57:53Z")
 * and Duration ("1.500s") for vcpuctl's --json output, which otherwise prints proto-loader's
 * `{ seconds, nanos }` objects. Which fields hold them comes from the protos themselves.
 */
import protobuf from 'protobufjs';
import { protobufRoot } from './client';

interface WellKnownFields {
  timestamp: Set<string>;
  duration: Set<string>;
}

let fields: WellKnownFields | undefined;

/** Every field name (camelCase, as proto-loader gives them) typed Timestamp or Duration in the vcpud protos. */
function wellKnownFields(): WellKnownFields {
  if (fields) return fields;
  const found: WellKnownFields = { timestamp: new Set(), duration: new Set() };
  const visit = (ns: protobuf.NamespaceBase) => {
    for (const nested of ns.nestedArray) {
      if (nested instanceof protobuf.Type)
        for (const f of nested.fieldsArray) {
          const type = f.resolve().resolvedType?.fullName;
          if (type === '.google.protobuf.Timestamp') found.timestamp.add(f.name);
          if (type === '.google.protobuf.Duration') found.duration.add(f.name);
        }
      if (nested instanceof protobuf.Namespace) visit(nested);
    }
  };
  visit(protobufRoot().lookup('vcpud') as protobuf.Namespace);
  return (fields = found);
}

type SecondsNanos = { seconds: string | number; nanos?: number | null };

function isSecondsNanos(v: unknown): v is SecondsNanos {
  return typeof v === 'object' && v !== null && 'seconds' in v && Object.keys(v).every((k) => k === 'seconds' || k === 'nanos');
}

/** 0, 3, 6 or 9 fractional digits, as the proto3 JSON mapping generates them. */
function fraction(nanos: number): string {
  if (!nanos) return '';
  const digits = String(nanos).padStart(9, '0');
  return `.${nanos % 1_000_000 === 0 ? digits.slice(0, 3) : nanos % 1000 === 0 ? digits.slice(0, 6) : digits}`;
}

export function timestampJson(t: SecondsNanos): string {
  const date = new Date(Number(t.seconds) * 1000).toISOString().replace(/\.\d{3}Z$/, '');
  return `${date}${fraction(t.nanos ?? 0)}Z`;
}

export function durationJson(d: SecondsNanos): string {
  const seconds = BigInt(d.seconds);
  const nanos = d.nanos ?? 0;
  const negative = seconds < 0n || nanos < 0;
  const abs = seconds < 0n ? -seconds : seconds;
  return `${negative ? '-' : ''}${abs}${fraction(Math.abs(nanos))}s`;
}

/** The JSON form of `value` under field `key` when it is a Timestamp or Duration; otherwise `value`. */
export function wellKnownJson(key: string, value: unknown): unknown {
  if (!isSecondsNanos(value)) return value;
  const f = wellKnownFields();
  if (f.timestamp.has(key)) return timestampJson(value);
  if (f.duration.has(key)) return durationJson(value);
  return value;
}
