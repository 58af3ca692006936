/**
 * GetState's response written straight from the bytes the kernel returned.
 *
 * Why: the general path decodes each struct into a JS object (a bigint per u64), converts that into a
 * proto-loader object (a Long per u64) and walks it again to encode: ~1,000 fields and ~2,000 short-lived
 * objects per GetState, more server CPU than the 13 ioctls. Here the fixed-size struct sections are encoded
 * field by field from their buffers (u64s as two u32 reads), by code generated once per section from the
 * same tables the general path uses: the ffi layouts (src/ffi/sections: offsets, C types) joined with the
 * converters' field tables (convert/state.ts: which field goes to which proto key, as which kind) and the
 * proto descriptors (wire-encoder.ts: field numbers, order). The bytes are those the general path writes
 * (test/unit/raw-state.test.ts compares both over fuzzed kernel bytes). cpuid2's list is written from its
 * kvm_cpuid2 the same way, and xsave (its value is its bytes) with its header fields; msrs from their
 * decoded entries (msrsEncoder). The other sections (lapic, mp_state, tsc_khz) keep their converters and
 * object encoders.
 */
import type { PackageDefinition } from '@grpc/proto-loader';
import { snakeCase } from '../../case';
import { compileFunction } from '../../codegen';
import {
  DEBUGREGS_LAYOUT,
  EVENTS_EXCEPTION_LAYOUT,
  EVENTS_TRIPLE_FAULT_LAYOUT,
  FPU_LAYOUT,
  isSectionName,
  KVM_MAX_XCRS,
  MSR_NAMES,
  CPUID2,
  CPUID2_HEADER_LAYOUT,
  CPUID_ENTRY2_LAYOUT,
  readExpr,
  REGS_LAYOUT,
  SECTIONS,
  SREGS2_LAYOUT,
  SREGS_LAYOUT,
  VCPU_EVENTS_LAYOUT,
  XCR_LAYOUT,
  XSAVE_HEADER_LAYOUT,
  XCRS_LAYOUT,
  type Field,
  type FieldType,
  type Layout,
  type MsrEntry,
  type SectionName,
} from '../../ffi/sections';
import type { BytesReadResult } from '../../vm/vcpu-state';
import { BYTE_SECTIONS, type ByteSection } from '../../ffi/vcpu';
import { fieldTag, isPacked, messageEncoders, Writer, type Encode, type FieldPlan, type MessagePlan } from '../wire-encoder';
import type { Fields, Kind } from './schema';
import { FIELD_TABLES as T, sectionMessage, type StateExtras } from './state';

/** Where a proto field's value lies in a section's bytes. Offsets are from the start of the enclosing message's struct. */
type Source =
  | { readonly key: string; readonly t: 'value'; readonly kind: Kind; readonly off: number; readonly type: FieldType }
  /** A message gathered from several places of the struct (VcpuEvents.exception). */
  | { readonly key: string; readonly t: 'message'; readonly children: readonly Source[] }
  /** The whole buffer as one bytes field (xsave's raw). */
  | { readonly key: string; readonly t: 'whole' }
  /** A repeated message whose count is a field of the struct (kvm_xcrs.nr_xcrs, capped at `max`). */
  | {
      readonly key: string;
      readonly t: 'list';
      readonly countOff: number;
      readonly max: number;
      readonly off: number;
      readonly stride: number;
      readonly children: readonly Source[];
    };

function layoutField(fields: readonly Field[], name: string): Field {
  const f = fields.find((x) => x.name === name);
  if (!f) throw new Error(`raw state encoder: no field ${name} in the layout`);
  return f;
}

/** A converter field table over a struct layout whose fields start at `base`. */
function join(table: Fields, layout: readonly Field[], base = 0): Source[] {
  return table.map((f) => {
    const lf = layoutField(layout, f.ffi);
    return { key: f.proto, t: 'value', kind: f.kind, off: base + lf.offset, type: lf.type };
  });
}

const offsetOf = (layout: Layout<unknown>, name: string) => layoutField(layout.fields, name).offset;

/** Each byte section's message, as the converters in convert/state.ts build it. */
/**
 * The sections encoded from bytes: those GetState reads as bytes, and xsave, whose value is its bytes
 * anyway (lapic too, but its apic_id is computed by inspectLapic rather than read at an offset).
 */
type EncodedSection = ByteSection | 'xsave';
const ENCODED_SECTIONS: readonly EncodedSection[] = [...BYTE_SECTIONS, 'xsave'];

const SOURCES: { readonly [S in EncodedSection]: readonly Source[] } = {
  regs: join(T.REGS, REGS_LAYOUT.fields),
  sregs: join(T.SREGS, SREGS_LAYOUT.fields),
  sregs2: join(T.SREGS2, SREGS2_LAYOUT.fields),
  fpu: join(T.FPU, FPU_LAYOUT.fields),
  debugregs: join(T.DEBUGREGS, DEBUGREGS_LAYOUT.fields),
  xcrs: [
    ...join(T.XCRS, XCRS_LAYOUT.fields),
    {
      key: 'xcrs',
      t: 'list',
      countOff: offsetOf(XCRS_LAYOUT, 'nrXcrs'),
      max: KVM_MAX_XCRS,
      off: offsetOf(XCRS_LAYOUT, 'xcrs'),
      stride: XCR_LAYOUT.size,
      children: join(T.XCR, XCR_LAYOUT.fields),
    },
  ],
  xsave: [{ key: 'raw', t: 'whole' }, ...join(T.XSAVE_INFO, XSAVE_HEADER_LAYOUT.fields)],
  cpuid2: [
    {
      key: 'entries',
      t: 'list',
      countOff: offsetOf(CPUID2_HEADER_LAYOUT, 'nent'),
      max: Infinity, // every entry the kernel listed (the buffer's capacity bounds it), as the converter does
      off: CPUID2_HEADER_LAYOUT.size,
      stride: CPUID_ENTRY2_LAYOUT.size,
      children: join(T.CPUID_ENTRY, CPUID_ENTRY2_LAYOUT.fields),
    },
  ],
  vcpu_events: [
    ...join(T.EVENTS, VCPU_EVENTS_LAYOUT.fields),
    ...join(T.TRIPLE_FAULT, EVENTS_TRIPLE_FAULT_LAYOUT.fields, offsetOf(VCPU_EVENTS_LAYOUT, 'tripleFault')),
    {
      key: 'exception',
      t: 'message',
      children: [
        ...join(T.EXCEPTION, EVENTS_EXCEPTION_LAYOUT.fields, offsetOf(VCPU_EVENTS_LAYOUT, 'exception')),
        ...join(T.EXCEPTION_PAYLOAD, VCPU_EVENTS_LAYOUT.fields),
      ],
    },
  ],
};

/** Generated code: statements writing into `w` from buffer `b`. */
class Code {
  readonly lines: string[] = [];
  private n = 0;

  name(prefix: string): string {
    return `${prefix}${this.n++}`;
  }

  /** A length-delimited field: tag, then `body` between begin() and end(). */
  sub(tag: number, body: () => void): void {
    const s = this.name('s');
    this.lines.push(`w.varint32(${tag}); { const ${s} = w.begin();`);
    body();
    this.lines.push(`w.end(${s}); }`);
  }
}

function mismatch(where: string, what: string): never {
  throw new Error(`raw state encoder: ${where}: ${what}`);
}

/** The expression writing one scalar (no tag) of ffi type `type` at `off` as proto field `f`. */
function scalar(k: Kind, type: FieldType, off: string, f: FieldPlan, where: string): string {
  const read = (): string =>
    type.kind === 'u8' || type.kind === 'u16' || type.kind === 'u32' ? readExpr(type, off) : mismatch(where, `a ${type.kind} cannot be a ${k.t}`);
  switch (k.t) {
    case 'u64':
      if (type.kind !== 'u64' || f.kind !== 'uint64') mismatch(where, `u64 from ${type.kind} into ${f.kind}`);
      return `w.varint64(b.readUInt32LE(${off}), b.readUInt32LE(${off} + 4));`;
    case 'uint':
      if (f.kind !== 'uint32') mismatch(where, `uint into ${f.kind}`);
      return `w.varint32(${read()});`;
    case 'bool':
      if (f.kind !== 'bool' || type.kind !== 'u8') mismatch(where, `bool from ${type.kind} into ${f.kind}`);
      return `w.varint32(b[${off}] !== 0 ? 1 : 0);`;
    case 'bytes':
      if (f.kind !== 'bytes' || type.kind !== 'bytes' || type.size !== k.size) mismatch(where, `bytes(${k.size}) from ${type.kind} into ${f.kind}`);
      return `w.bytesFrom(b, ${off}, ${k.size});`;
    default:
      return mismatch(where, `${k.t} is not a scalar`);
  }
}

/** One element of a field: a message of its struct, or a scalar preceded by its tag. */
function element(c: Code, f: FieldPlan, k: Kind, type: FieldType, off: string, where: string): void {
  if (k.t === 'struct') {
    if (type.kind !== 'struct' || f.kind !== 'message') mismatch(where, `struct from ${type.kind} into ${f.kind}`);
    c.sub(fieldTag(f), () => message(c, f.message!, join(k.fields, type.layout.fields), off, where));
    return;
  }
  c.lines.push(`w.varint32(${fieldTag(f)}); ${scalar(k, type, off, f, where)}`);
}

function field(c: Code, f: FieldPlan, s: Source, base: string, where: string): void {
  if (s.t === 'message') {
    if (f.kind !== 'message' || f.repeated) mismatch(where, 'not a singular message');
    c.sub(fieldTag(f), () => message(c, f.message!, s.children, base, where));
    return;
  }
  if (s.t === 'whole') {
    if (f.kind !== 'bytes' || f.repeated) mismatch(where, 'not a bytes field');
    c.lines.push(`w.varint32(${fieldTag(f)}); w.bytesFrom(b, ${base}, b.length - ${base});`);
    return;
  }
  if (s.t === 'list') {
    if (f.kind !== 'message' || !f.repeated) mismatch(where, 'not a repeated message');
    const [i, n, e] = [c.name('i'), c.name('n'), c.name('e')];
    c.lines.push(
      `for (let ${i} = 0, ${n} = Math.min(b.readUInt32LE(${base} + ${s.countOff}), ${s.max}); ${i} < ${n}; ${i}++) { const ${e} = ${base} + ${s.off} + ${i} * ${s.stride};`,
    );
    c.sub(fieldTag(f), () => message(c, f.message!, s.children, e, where));
    c.lines.push('}');
    return;
  }
  const off = `${base} + ${s.off}`;
  if (s.kind.t !== 'array') {
    if (f.repeated) mismatch(where, 'repeated in the proto, one value in the struct');
    element(c, f, s.kind, s.type, off, where);
    return;
  }
  const { of, count } = s.kind;
  if (s.type.kind !== 'array' || s.type.count !== count || !f.repeated) mismatch(where, `array of ${count} against ${s.type.kind}`);
  const t = s.type.of;
  const at = (i: number) => `${off} + ${i * t.size}`;
  if (isPacked(f)) c.sub(fieldTag(f), () => Array.from({ length: count }, (_, i) => c.lines.push(scalar(of, t, at(i), f, where))));
  else for (let i = 0; i < count; i++) element(c, f, of, t, at(i), where);
}

/** A message's fields in the proto's order (the order the object encoder writes them in). */
function message(c: Code, plan: MessagePlan, sources: readonly Source[], base: string, where: string): void {
  const used = new Set<Source>();
  for (const f of plan) {
    const s = sources.find((x) => x.key === f.key);
    if (!s) continue;
    used.add(s);
    field(c, f, s, base, `${where}.${f.key}`);
  }
  const missing = sources.filter((s) => !used.has(s)).map((s) => s.key);
  if (missing.length) mismatch(where, `no proto field for ${missing.join(', ')}`);
}

type BytesEncode = (w: Writer, b: Buffer) => void;

function compileSection(section: EncodedSection, plan: MessagePlan): BytesEncode {
  const c = new Code();
  message(c, plan, SOURCES[section], '0', section);
  return compileFunction<BytesEncode>(`encode_${section}`, ['w', 'b'], c.lines.join('\n'));
}

/** A section written from its decoded value without building its proto object first (msrs). */
type ValueEncode = (w: Writer, v: never, extras: StateExtras) => void;

interface SectionPlan {
  name: SectionName;
  tag: number;
  object: Encode;
  bytes?: BytesEncode;
  value?: ValueEncode;
}

function planField(plan: MessagePlan, key: string, kind: FieldPlan['kind'], repeated: boolean, where: string): FieldPlan {
  const f = plan.find((x) => x.key === key);
  if (!f || f.kind !== kind || f.repeated !== repeated) mismatch(where, `no ${repeated ? 'repeated ' : ''}${kind} field ${key}`);
  return f;
}

/**
 * Msrs from the entries KVM_GET_MSRS decoded to, written as the converter's objects (index, data, name;
 * then unreadable_indices) would be, without them: ~40 entries each made an object, a decimal string of
 * its u64 and a name string to encode (a third of the response's encoding time). Names are encoded once.
 */
function msrsEncoder(plan: MessagePlan): ValueEncode {
  const entries = planField(plan, 'entries', 'message', true, 'msrs');
  const unreadable = planField(plan, 'unreadableIndices', 'uint32', true, 'msrs');
  if (plan.length !== 2) mismatch('msrs', 'fields other than entries and unreadableIndices');
  const entry = entries.message!;
  const [index, data, name] = [
    ['index', 'uint32'],
    ['data', 'uint64'],
    ['name', 'string'],
  ].map(([k, kind]) => planField(entry, k, kind as FieldPlan['kind'], false, 'msrs.entries'));
  if (entry.length !== 3) mismatch('msrs.entries', 'fields other than index, data and name');
  const [entriesTag, indexTag, dataTag, nameTag, unreadableTag] = [entries, index, data, name, unreadable].map(fieldTag);
  // Each field in field-number order, as the object encoder writes them.
  const order = [index, data, name].map((f) => f.number);
  if (order.some((n, i) => i > 0 && n < order[i - 1])) mismatch('msrs.entries', 'fields not in index, data, name order');
  const names = new Map([...MSR_NAMES].map(([i, n]) => [i, Buffer.from(n)]));
  const noName = Buffer.alloc(0);
  return (w, v, extras) => {
    for (const e of v as MsrEntry[]) {
      w.varint32(entriesTag);
      const at = w.begin();
      w.varint32(indexTag);
      w.varint32(e.index);
      w.varint32(dataTag);
      w.varint64(Number(e.data & 0xffffffffn), Number((e.data >> 32n) & 0xffffffffn));
      w.varint32(nameTag);
      w.bytes(names.get(e.index) ?? noName);
      w.end(at);
    }
    const list = extras.msrsUnreadable;
    if (list?.length) {
      w.varint32(unreadableTag);
      const at = w.begin();
      for (const i of list) w.varint32(i);
      w.end(at);
    }
  };
}

/**
 * The bytes a section's buffer must hold: its struct's size exactly, or for a list (cpuid2) at least its
 * header and the entries its count names. A buffer that does not fit is refused, not misread.
 */
function checkLength(section: EncodedSection, b: Buffer): void {
  const codec = SECTIONS[section];
  const ok = codec.fixedSize ? b.length === codec.size : b.length >= codec.size && (section !== 'cpuid2' || b.length >= CPUID2.sizeFor(b.readUInt32LE(0)));
  if (!ok) throw new Error(`raw state encoder: ${section} is ${b.length} bytes, which does not hold what it describes`);
}

const GET_STATE_RESPONSE = 'vcpud.v1.GetStateResponse';

/**
 * GetStateResponse's serializer for section values with the struct sections as kernel bytes. Like
 * wireSerializer it writes into one reused buffer and returns a copy of the bytes.
 */
export function getStateResponseEncoder(
  defs: PackageDefinition,
): (values: BytesReadResult['values'], extras: StateExtras, implicitlyPaused: boolean) => Buffer {
  const enc = messageEncoders(defs, GET_STATE_RESPONSE);
  const [stateField] = enc.plan(GET_STATE_RESPONSE);
  // `state` first: the rest of the response is then the object encoder's output without it.
  if (stateField?.key !== 'state' || stateField.kind !== 'message') throw new Error(`raw state encoder: ${GET_STATE_RESPONSE}'s first field is not state`);
  const rest = enc.encoder(GET_STATE_RESPONSE);
  const sections: SectionPlan[] = stateField.message!.map((f) => {
    const name = snakeCase(f.key);
    if (!isSectionName(name) || f.kind !== 'message') throw new Error(`raw state encoder: VcpuState.${f.key} is not a section`);
    const byteSection = (ENCODED_SECTIONS as readonly string[]).includes(name) ? (name as EncodedSection) : undefined;
    let bytes: BytesEncode | undefined;
    if (byteSection) {
      const encode = compileSection(byteSection, f.message!);
      bytes = (w, b) => {
        checkLength(byteSection, b);
        encode(w, b);
      };
    }
    return { name, tag: fieldTag(f), object: enc.encoder(f.typeName), bytes, value: name === 'msrs' ? msrsEncoder(f.message!) : undefined };
  });
  const stateTag = fieldTag(stateField);
  const w = new Writer(16 * 1024);
  return (values, extras, implicitlyPaused) => {
    w.pos = 0;
    w.varint32(stateTag);
    const state = w.begin();
    for (const s of sections) {
      const v = values[s.name];
      if (v === undefined) continue;
      w.varint32(s.tag);
      const at = w.begin();
      if (s.bytes && Buffer.isBuffer(v)) s.bytes(w, v);
      else if (s.value) s.value(w, v as never, extras);
      else s.object(w, sectionMessage(s.name, v as never, extras));
      w.end(at);
    }
    w.end(state);
    rest(w, { implicitlyPaused });
    return Buffer.from(w.buf.subarray(0, w.pos));
  };
}
