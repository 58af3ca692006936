/**
 * Scalar checks shared by every converter: one u64 parser, one bounded-integer check, one length check. A
 * Checker collects violations so a request reports all of its bad fields at once; the standalone helpers
 * (u64, safeNumber) throw on the first.
 *
 * Field paths are proto paths in snake_case ("state.regs.rax", "state.fpu.fpr[3]"), as clients spell them.
 */
import { invalidArgument, type Violation } from '../../errors';

/** The shape of a protobufjs Long, without depending on the long package. */
export interface LongLike {
  low: number;
  high: number;
  unsigned?: boolean;
}

/**
 * A u64 as the Long-like protobufjs encodes directly. A decimal string (what proto-loader gives clients) costs
 * a bigint-to-decimal conversion here and a decimal parse in the serializer, about 0.5 us per field: a full
 * GetState carries ~100 of them.
 */
export function u64ToLong(v: bigint): LongLike {
  return { low: Number(v & 0xffffffffn) | 0, high: Number(v >> 32n) | 0, unsigned: true };
}

/** What a uint64 field may hold on input: a decimal string (the loader's output), a number or a Long. */
export type U64Input = string | number | LongLike;

export const U64_MAX = (1n << 64n) - 1n;

/** Rule ids of the violations this module reports. */
export const RULES = {
  uint64: 'uint64',
  safeInteger: 'safe_integer',
  bool: 'bool',
  bytes: 'bytes',
  length: 'length',
  list: 'list',
  maxItems: 'max_items',
  enum: 'enum',
} as const;

const isLongLike = (v: unknown): v is LongLike =>
  typeof v === 'object' && v !== null && typeof (v as LongLike).low === 'number' && typeof (v as LongLike).high === 'number';

const show = (v: unknown): string => {
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}...` : v);
  if (Buffer.isBuffer(v)) return `${v.length} bytes`;
  return Array.isArray(v) ? `a list of ${v.length}` : String(v);
};

/** The rule id of an integer check of `bits` bits: uint8/uint16/uint32, or "range" for narrower fields. */
const uintRule = (bits: number): string => ([8, 16, 32].includes(bits) ? `uint${bits}` : 'range');

/** Parses a u64 or explains why not (a message without the field). */
export function parseU64(v: unknown): bigint | string {
  if (typeof v === 'string') {
    if (!/^[0-9]+$/.test(v)) return `expected a decimal integer in [0, 2^64), got ${show(v)}`;
    const n = BigInt(v);
    return n > U64_MAX ? `${show(v)} is not below 2^64` : n;
  }
  if (typeof v === 'number') {
    if (!Number.isInteger(v) || v < 0) return `expected an integer in [0, 2^64), got ${show(v)}`;
    if (!Number.isSafeInteger(v)) return `${v} is beyond 2^53 as a number: pass it as a decimal string`;
    return BigInt(v);
  }
  if (typeof v === 'bigint') return v >= 0n && v <= U64_MAX ? v : `expected an integer in [0, 2^64), got ${v}`;
  if (isLongLike(v)) {
    if (v.unsigned === false && v.high < 0) return 'expected an unsigned integer, got a negative Long';
    return (BigInt(v.high >>> 0) << 32n) | BigInt(v.low >>> 0);
  }
  return `expected a decimal integer string, got ${show(v)}`;
}

export function violationMessage(violations: readonly Violation[]): string {
  const parts = violations.map((v) => `${v.field}: ${v.message}`);
  return violations.length === 1 ? parts[0] : `${violations.length} invalid fields: ${parts.join('; ')}`;
}

/** Collects violations; every check returns a usable placeholder (0, 0n, empty) when its input is bad. */
export class Checker {
  readonly violations: Violation[] = [];

  add(rule: string, field: string, message: string): void {
    this.violations.push({ rule, field, message });
  }

  u64(v: unknown, field: string): bigint {
    const r = parseU64(v);
    if (typeof r === 'bigint') return r;
    this.add(RULES.uint64, field, r);
    return 0n;
  }

  /** An integer in [0, 2^bits). */
  uint(v: unknown, bits: number, field: string): number {
    const max = 2 ** bits - 1;
    if (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= max) return v;
    this.add(uintRule(bits), field, `expected an integer in [0, ${max}], got ${show(v)}`);
    return 0;
  }

  bool(v: unknown, field: string): boolean {
    if (typeof v === 'boolean') return v;
    this.add(RULES.bool, field, `expected a boolean, got ${show(v)}`);
    return false;
  }

  /** A copy of `v` when it is bytes of a length in [min, max]. */
  bytes(v: unknown, field: string, min: number, max = min): Buffer {
    if (!(v instanceof Uint8Array)) {
      this.add(RULES.bytes, field, `expected bytes, got ${show(v)}`);
      return Buffer.alloc(min);
    }
    if (v.length < min || v.length > max) {
      const want = min === max ? `exactly ${min}` : max === Infinity ? `at least ${min}` : `${min} to ${max}`;
      this.add(RULES.length, field, `expected ${want} bytes, got ${v.length}`);
    }
    const out = Buffer.alloc(v.length);
    out.set(v);
    return out;
  }

  /** `v` when it is a list of at most `max` (exactly `max` when `exact`) entries; else as much of it as fits. */
  list<T>(v: readonly T[] | null | undefined, field: string, max: number, exact = false): readonly T[] {
    const items = Array.isArray(v) ? v : [];
    if (v !== null && v !== undefined && !Array.isArray(v)) this.add(RULES.list, field, `expected a list, got ${show(v)}`);
    else if (exact ? items.length !== max : items.length > max)
      this.add(exact ? RULES.length : RULES.maxItems, field, `expected ${exact ? 'exactly' : 'at most'} ${max} entries, got ${items.length}`);
    return items.slice(0, max);
  }

  /** Throws one invalid_argument listing every violation collected, if any. */
  throwIfAny(): void {
    if (this.violations.length) throw invalidArgument(violationMessage(this.violations), [...this.violations]);
  }
}

/** Runs `fn` with a fresh Checker and throws its violations, if any, after it returns. */
export function checked<T>(fn: (c: Checker) => T): T {
  const c = new Checker();
  const out = fn(c);
  c.throwIfAny();
  return out;
}

/** A uint64 request field as a bigint; invalid_argument naming `field` unless it is a decimal integer in [0, 2^64). */
export function u64(v: U64Input, field: string): bigint {
  return checked((c) => c.u64(v, field));
}

/**
 * A uint64 request field that must fit a JS number exactly (an address, a length, a size): invalid_argument
 * naming `field` when it is not a u64 or is beyond Number.MAX_SAFE_INTEGER.
 */
export function safeNumber(v: U64Input, field: string): number {
  const n = u64(v, field);
  if (n > BigInt(Number.MAX_SAFE_INTEGER))
    throw invalidArgument(`${field}: ${n} is beyond ${Number.MAX_SAFE_INTEGER} (2^53 - 1), the largest value this server handles`, [
      { rule: RULES.safeInteger, field, message: `${n} is beyond 2^53 - 1` },
    ]);
  return Number(n);
}
