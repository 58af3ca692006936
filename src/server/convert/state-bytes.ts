/**
 * SetState's request sections checked and written straight into the kernel's structs.
 *
 * Why: stateFromProto builds a JS object per struct (a bigint per u64, an object per segment) from the
 * request, over a base decoded the same way, and the ffi then encodes those objects into the structs
 * the ioctls take: about two thirds of SetState's CPU was that JS around the ioctls
 * (bench/setstate-stages.ts). Here each struct section is written field by field from the request into
 * a zeroed struct, the fields the proto does not carry copied from the base's bytes (the vCPU's current
 * struct, as GetState reads it), so no intermediate objects are made.
 *
 * The rules are stateFromProto's, field for field and in the same order (so one request lists the same
 * violations with the same messages): the same field tables (convert/state.ts FIELD_TABLES) joined with
 * the ffi layouts (their offsets and C types), the same Checker. The bytes are those the ffi's encoder
 * writes for stateFromProto's values: reserved and padding bytes zero, an absent sub-message or an empty
 * repeated field of fixed length the base's, a `true` over a non-zero base byte that byte.
 * test/unit/state-bytes.test.ts compares both over fuzzed requests and bases.
 * Sections whose value is not a struct (xsave, lapic, msrs, mp_state, tsc_khz) go through the converters.
 */
import { snakeCase } from '../../case';
import { compiledPerKey, compileFunction } from '../../codegen';
import {
  CPUID2_HEADER_LAYOUT,
  CPUID_ENTRY2_LAYOUT,
  DEBUGREGS_LAYOUT,
  EVENTS_EXCEPTION_LAYOUT,
  EVENTS_TRIPLE_FAULT_LAYOUT,
  FPU_LAYOUT,
  KVM_MAX_XCRS,
  layoutField,
  offsetOf,
  REGS_LAYOUT,
  SECTION_NAMES,
  SECTIONS,
  SREGS2_LAYOUT,
  SREGS_LAYOUT,
  VCPU_EVENTS_LAYOUT,
  XCR_LAYOUT,
  XCRS_LAYOUT,
  type Field,
  type FieldType,
  type Layout,
  type SectionName,
  type SectionValues,
} from '../../ffi/sections';
import { BYTE_SECTIONS, type ByteSection } from '../../ffi/vcpu';
import { parseU64, RULES, checked, type Checker } from './scalars';
import type { Fields, Kind } from './schema';
import { FIELD_TABLES as T, MAX_CPUID_ENTRIES, parseSection, protoKey, stateFromProto, stateToProto } from './state';
import type { VcpuState__Output } from '../../api/generated/vcpud/v1/VcpuState';
import type { BytesReadResult } from '../../vm/vcpu-state';

type Obj = Record<string, unknown>;

/** A request's sections as SetState writes them: the struct sections and cpuid2 as kernel bytes. */
export type StateBytes = { [N in SectionName]?: N extends ByteSection ? Buffer : SectionValues[N] };

/** The vCPU's current sections (bases), as readStateBytes reads them: the struct sections and cpuid2 as the kernel's bytes. */
export type BaseBytes = BytesReadResult['values'];

/** One field of a converter table at its place in a struct: offsets from the enclosing struct's start. */
interface Place {
  readonly key: string;
  /** How the field extends its parent's path: ".snake_name". */
  readonly seg: string;
  readonly kind: Kind;
  readonly off: number;
  readonly type: FieldType;
  /** A struct's fields; an array's element (one place, at offset 0). */
  readonly fields?: readonly Place[];
  readonly of?: Place;
}

function mismatch(where: string, what: string): never {
  throw new Error(`state bytes: ${where}: ${what}`);
}

const SCALAR_SIZES = { u8: 1, u16: 2, u32: 4 } as const;

function place(key: string, kind: Kind, type: FieldType, off: number): Place {
  const at = { key, seg: `.${snakeCase(key)}`, kind, off, type };
  switch (kind.t) {
    case 'struct':
      if (type.kind !== 'struct') return mismatch(key, `struct over ${type.kind}`);
      return { ...at, fields: places(kind.fields, type.layout.fields) };
    case 'array':
      if (type.kind !== 'array' || type.count !== kind.count) return mismatch(key, `array of ${kind.count} over ${type.kind}`);
      return { ...at, of: place(key, kind.of, type.of, 0) };
    case 'u64':
      return type.kind === 'u64' ? at : mismatch(key, `u64 over ${type.kind}`);
    case 'uint':
      return (type.kind === 'u8' || type.kind === 'u16' || type.kind === 'u32') && kind.bits <= 8 * SCALAR_SIZES[type.kind]
        ? at
        : mismatch(key, `uint(${kind.bits}) over ${type.kind}`);
    case 'bool':
      return type.kind === 'u8' ? at : mismatch(key, `bool over ${type.kind}`);
    case 'bytes':
      return type.kind === 'bytes' && type.size === kind.size ? at : mismatch(key, `bytes(${kind.size}) over ${type.kind}`);
  }
}

/** A converter field table joined with the layout of the struct it fills (its fields from `base` on). */
function places(table: Fields, layout: readonly Field[], base = 0): Place[] {
  return table.map((f) => {
    const lf = layoutField(layout, f.ffi);
    return place(f.proto, f.kind, lf.type, base + lf.offset);
  });
}

/** Copies the bytes `p` describes (its fields', not its padding) from `base` to `out`, at `at`; zeros without a base or past its end. */
function copyPlace(p: Place, base: Buffer | undefined, out: Buffer, at: number): void {
  if (!base) return;
  if (p.fields) for (const f of p.fields) copyPlace(f, base, out, at + f.off);
  else if (p.of) for (let i = 0, n = (p.kind as { count: number }).count; i < n; i++) copyPlace(p.of, base, out, at + i * p.of.type.size);
  else if (at + p.type.size <= base.length) base.copy(out, at, at, at + p.type.size);
}

/** Message `m`'s fields written into the struct at `at` (checked into `c`); an absent message takes base's bytes. */
function writeMessage(fields: readonly Place[], m: Obj | null | undefined, base: Buffer | undefined, out: Buffer, at: number, c: Checker, path: string): void {
  if (m === null || m === undefined) for (const f of fields) copyPlace(f, base, out, at + f.off);
  else compiledMessage(fields)(m, base, out, at, c, path);
}

type MessageWriter = (m: Obj, base: Buffer | undefined, out: Buffer, at: number, c: Checker, path: string) => void;

const UINT_WRITES = {
  u8: (v: string, off: string) => `out[${off}] = ${v};`,
  u16: (v: string, off: string) => `out.writeUInt16LE(${v}, ${off});`,
  u32: (v: string, off: string) => `out.writeUInt32LE(${v}, ${off});`,
};

/** The statements writing field `i` (`f`) of a message: scalars inline, the rest through writeValue. */
function fieldStatements(f: Place, i: number): string {
  const v = `m[${JSON.stringify(f.key)}]`;
  const off = `at + ${f.off}`;
  const seg = JSON.stringify(f.seg);
  const k = f.kind;
  switch (k.t) {
    case 'u64':
      return `{ const r = parseU64(${v}); if (typeof r === 'bigint') out.writeBigUInt64LE(r, ${off}); else c.add(RULE_U64, path + ${seg}, r); }`;
    case 'uint': {
      const write = UINT_WRITES[f.type.kind as keyof typeof UINT_WRITES];
      const max = 2 ** k.bits - 1;
      return `{ const v = ${v}; ${write(`typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= ${max} ? v : c.uint(v, ${k.bits}, path + ${seg})`, off)} }`;
    }
    case 'bool':
      return `{ const v = ${v}; out[${off}] = (typeof v === 'boolean' ? v : c.bool(v, path + ${seg})) ? (base !== undefined && base[${off}]) || 1 : 0; }`;
    default:
      return `writeValue(fields[${i}], ${v}, base, out, ${off}, c, path, ${seg});`;
  }
}

/**
 * A message's writer, generated once per field table as the ffi's struct codecs are (src/codegen.ts): a
 * walk of the table per field cost as much as the ioctls. Violations build their field's path only then.
 */
const compiledMessage = compiledPerKey(
  (fields: readonly Place[]): MessageWriter =>
    compileFunction<MessageWriter>('writeMessage', ['m', 'base', 'out', 'at', 'c', 'path'], fields.map(fieldStatements).join('\n'), {
      fields,
      parseU64,
      writeValue,
      RULE_U64: RULES.uint64,
    }),
);

/** One value (the checks of convert/scalars.ts's Checker; the field's path is built only for a violation). */
function writeValue(f: Place, v: unknown, base: Buffer | undefined, out: Buffer, at: number, c: Checker, parent: string, seg: string): void {
  const k = f.kind;
  switch (k.t) {
    case 'u64': {
      const r = parseU64(v);
      if (typeof r === 'bigint') out.writeBigUInt64LE(r, at);
      else c.add(RULES.uint64, parent + seg, r);
      return;
    }
    case 'uint': {
      const n = typeof v === 'number' && Number.isInteger(v) && v >= 0 && v < 2 ** k.bits ? v : c.uint(v, k.bits, parent + seg);
      if (f.type.kind === 'u8') out[at] = n;
      else if (f.type.kind === 'u16') out.writeUInt16LE(n, at);
      else out.writeUInt32LE(n, at);
      return;
    }
    case 'bool': {
      const b = typeof v === 'boolean' ? v : c.bool(v, parent + seg);
      out[at] = b ? base?.[at] || 1 : 0;
      return;
    }
    case 'bytes':
      if (v instanceof Uint8Array && v.length === k.size) out.set(v, at);
      else c.bytes(v, parent + seg, k.size);
      return;
    case 'struct':
      writeMessage(f.fields!, v as Obj | null | undefined, base, out, at, c, parent + seg);
      return;
    case 'array': {
      // As schema.ts: protobuf cannot tell an empty repeated field from an absent one, so empty keeps the base's.
      if (base && (v === null || v === undefined || (Array.isArray(v) && v.length === 0))) return copyPlace(f, base, out, at);
      const path = parent + seg;
      const items = c.list(v as unknown[], path, k.count, true);
      const of = f.of!;
      for (let i = 0; i < k.count; i++) {
        if (i < items.length) writeValue(of, items[i], base, out, at + i * of.type.size, c, path, `[${i}]`);
        else copyPlace(of, base, out, at + i * of.type.size);
      }
      return;
    }
  }
}

const placesOf = (table: Fields, layout: Layout<unknown>) => places(table, layout.fields);

/** A section that is one message of `table` over struct `layout`. */
function tableSection(table: Fields, layout: Layout<unknown>) {
  const fields = placesOf(table, layout);
  return (m: Obj, base: Buffer | undefined, c: Checker, path: string): Buffer => {
    const out = Buffer.alloc(layout.size);
    writeMessage(fields, m, base, out, 0, c, path);
    return out;
  };
}

const EVENTS = placesOf(T.EVENTS, VCPU_EVENTS_LAYOUT);
const EXCEPTION_PAYLOAD = placesOf(T.EXCEPTION_PAYLOAD, VCPU_EVENTS_LAYOUT);
const EXCEPTION = places(T.EXCEPTION, EVENTS_EXCEPTION_LAYOUT.fields, offsetOf(VCPU_EVENTS_LAYOUT, 'exception'));
const TRIPLE_FAULT = places(T.TRIPLE_FAULT, EVENTS_TRIPLE_FAULT_LAYOUT.fields, offsetOf(VCPU_EVENTS_LAYOUT, 'tripleFault'));
const XCRS = placesOf(T.XCRS, XCRS_LAYOUT);
const XCR = placesOf(T.XCR, XCR_LAYOUT);
const XCRS_AT = offsetOf(XCRS_LAYOUT, 'xcrs');
const NR_XCRS_AT = offsetOf(XCRS_LAYOUT, 'nrXcrs');
const CPUID_ENTRY = placesOf(T.CPUID_ENTRY, CPUID_ENTRY2_LAYOUT);
const NENT_AT = offsetOf(CPUID2_HEADER_LAYOUT, 'nent');

type ByteConverter = (m: Obj, base: Buffer | undefined, c: Checker, path: string) => Buffer;

/** Each byte section, in the order its converter in convert/state.ts checks its fields. */
const BYTE_CONVERTERS: { readonly [S in ByteSection]: ByteConverter } = {
  regs: tableSection(T.REGS, REGS_LAYOUT),
  sregs: tableSection(T.SREGS, SREGS_LAYOUT),
  sregs2: tableSection(T.SREGS2, SREGS2_LAYOUT),
  fpu: tableSection(T.FPU, FPU_LAYOUT),
  debugregs: tableSection(T.DEBUGREGS, DEBUGREGS_LAYOUT),
  vcpu_events(m, base, c, path) {
    const out = Buffer.alloc(VCPU_EVENTS_LAYOUT.size);
    const exception = m.exception as Obj | null | undefined;
    writeMessage(EVENTS, m, base, out, 0, c, path);
    writeMessage(EXCEPTION_PAYLOAD, exception, base, out, 0, c, `${path}.exception`);
    writeMessage(EXCEPTION, exception, base, out, 0, c, `${path}.exception`);
    writeMessage(TRIPLE_FAULT, m, base, out, 0, c, path);
    return out;
  },
  xcrs(m, base, c, path) {
    const out = Buffer.alloc(XCRS_LAYOUT.size);
    const listPath = `${path}.xcrs`;
    const listed = c.list(m.xcrs as Obj[] | undefined, listPath, KVM_MAX_XCRS);
    for (let i = 0; i < KVM_MAX_XCRS; i++) {
      const at = XCRS_AT + i * XCR_LAYOUT.size;
      if (i < listed.length) writeMessage(XCR, listed[i], base, out, at, c, `${listPath}[${i}]`);
      else for (const f of XCR) copyPlace(f, base, out, at + f.off);
    }
    writeMessage(XCRS, m, base, out, 0, c, path);
    out.writeUInt32LE(listed.length, NR_XCRS_AT);
    return out;
  },
  cpuid2(m, base, c, path) {
    const listPath = `${path}.entries`;
    const entries = c.list(m.entries as Obj[] | undefined, listPath, MAX_CPUID_ENTRIES);
    const stride = CPUID_ENTRY2_LAYOUT.size;
    const out = Buffer.alloc(CPUID2_HEADER_LAYOUT.size + entries.length * stride);
    out.writeUInt32LE(entries.length, NENT_AT);
    for (let i = 0; i < entries.length; i++) writeMessage(CPUID_ENTRY, entries[i], base, out, CPUID2_HEADER_LAYOUT.size + i * stride, c, `${listPath}[${i}]`);
    return out;
  },
};

const BYTE_SECTION_SET: ReadonlySet<SectionName> = new Set(BYTE_SECTIONS);

/**
 * Sections whose base is never consulted: msrs and tsc_khz carry every byte, and each cpuid2 entry is a
 * message of scalars only (present on the wire or defaulted), so stateBytesFromProto writes the same
 * bytes with or without their base (test/unit/state-bytes.test.ts). Their GET ioctls only copy state out.
 */
export const BASE_UNUSED: ReadonlySet<SectionName> = new Set(['msrs', 'cpuid2', 'tsc_khz']);

/** A byte section's base as bytes (encoded when a caller gives it decoded). */
function baseBytes(name: ByteSection, base: unknown): Buffer | undefined {
  return base === undefined || Buffer.isBuffer(base) ? base : SECTIONS[name].encode(base as never);
}

/**
 * stateFromProto for SetState: the sections present (non-null) in `p`, validated (one invalid_argument
 * lists every violation); the struct sections and cpuid2 as the bytes their SET ioctl takes, built over
 * `base` (the same sections' current kernel bytes; without one, zeros), the others as stateFromProto returns them.
 */
export function stateBytesFromProto(p: VcpuState__Output, base: BaseBytes): StateBytes {
  return checked((c) => {
    const out: Record<string, unknown> = {};
    for (const name of SECTION_NAMES) {
      const section = p[protoKey(name)] as unknown as Obj | null | undefined;
      if (section === null || section === undefined) continue;
      out[name] = BYTE_SECTION_SET.has(name)
        ? BYTE_CONVERTERS[name as ByteSection](section, baseBytes(name as ByteSection, base[name]), c, `state.${name}`)
        : parseSection(name, section, base[name] as never, c);
    }
    return out as StateBytes;
  });
}

/**
 * A section value of stateBytesFromProto as stateFromProto returns it (writeState's AsRequested): the
 * error of a refused write lists the request's changed fields in the order of that object's keys, the
 * converters' order, which is not always the struct's. stateFromProto(stateToProto(v), v) is v itself.
 */
export function asRequested(s: SectionName, value: unknown): unknown {
  if (!Buffer.isBuffer(value) || !BYTE_SECTION_SET.has(s)) return value;
  const v = { [s]: SECTIONS[s as ByteSection].decode(value) } as Partial<SectionValues>;
  return stateFromProto(stateToProto(v) as VcpuState__Output, v)[s];
}
