/**
 * GetState's response written straight from the bytes the kernel returned.
 *
 * Why: the general path decodes each struct into a JS object (a bigint per u64), converts that into a
 * proto-loader object (a Long per u64) and walks it again to encode: ~1,000 fields and ~2,000 short-lived
 * objects per GetState, more server CPU than the 13 ioctls. Here the sections read as bytes (the structs,
 * cpuid2's list, xsave and lapic with their inspected fields) are written by a wire program
 * (src/ffi/wire-program.ts, run by native/wire_program.cc) compiled once per section from the same tables
 * the general path uses: the ffi layouts (src/ffi/sections: offsets, C types) joined with the converters'
 * field tables (convert/state.ts: which field goes to which proto key, as which kind) and the proto
 * descriptors (wire-encoder.ts: field numbers, order). msrs come as the kernel's kvm_msrs, and mp_state
 * and tsc_khz, read as numbers, as a 4-byte input each. The whole state message is one native run over
 * the sections' inputs; a section given as decoded values (msrs with refused indices, callers without
 * bytes) is encoded here first and copied in. The bytes are those the general path writes
 * (test/unit/raw-state.test.ts compares both over fuzzed kernel bytes).
 */
import type { PackageDefinition } from '@grpc/proto-loader';
import { snakeCase } from '../../case';
import {
  DEBUGREGS_LAYOUT,
  EVENTS_EXCEPTION_LAYOUT,
  EVENTS_TRIPLE_FAULT_LAYOUT,
  FPU_LAYOUT,
  isSectionName,
  layoutField,
  offsetOf,
  KVM_MAX_XCRS,
  LAPIC_REGISTERS_LAYOUT,
  u8,
  MSR_NAMES,
  MSR_ENTRY_LAYOUT,
  MSR_ENTRY_SIZE,
  MSRS_HEADER_SIZE,
  msrsSize,
  CPUID2,
  CPUID2_HEADER_LAYOUT,
  CPUID_ENTRY2_LAYOUT,
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
  type MsrEntry,
  type SectionName,
} from '../../ffi/sections';
import type { BytesReadResult, ReusedRead } from '../../vm/vcpu-state';
import type { BatchEncoding } from '../../ffi/vcpu';
import { runWireProgram, varintBytes, WireProgramBuilder } from '../../ffi/wire-program';
import { BYTE_SECTIONS, type ByteSection } from '../../ffi/vcpu';
import { fieldTag, isPacked, messageEncoders, Writer, type Encode, type FieldPlan, type MessagePlan } from '../wire-encoder';
import type { Fields, Kind } from './schema';
import { FIELD_TABLES as T, MP_STATE_NAMES, MP_STATE_PREFIX, sectionMessage, type StateExtras } from './state';

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

/** A converter field table over a struct layout whose fields start at `base`. */
function join(table: Fields, layout: readonly Field[], base = 0): Source[] {
  return table.map((f) => {
    const lf = layoutField(layout, f.ffi);
    return { key: f.proto, t: 'value', kind: f.kind, off: base + lf.offset, type: lf.type };
  });
}

/** Each byte section's message, as the converters in convert/state.ts build it. */
/**
 * The sections encoded from bytes: those GetState reads as bytes, and xsave, whose value is its bytes
 * anyway (lapic too, but its apic_id is computed by inspectLapic rather than read at an offset).
 */
type EncodedSection = ByteSection | 'xsave' | 'lapic';
const ENCODED_SECTIONS: readonly EncodedSection[] = [...BYTE_SECTIONS, 'xsave', 'lapic'];

/**
 * Lapic: its page as raw, and the registers inspectLapic reads at their offsets; apic_id is bits 31:24 of
 * the ID register, which is that register's last byte (little-endian).
 */
function lapicSources(): Source[] {
  const isApicId = (f: Fields[number]) => f.ffi === 'apicId';
  const apicId = T.LAPIC_INFO.find(isApicId) ?? mismatch('lapic', 'no apicId in the field table');
  return [
    { key: 'raw', t: 'whole' },
    ...join(
      T.LAPIC_INFO.filter((f) => !isApicId(f)),
      LAPIC_REGISTERS_LAYOUT.fields,
    ),
    { key: apicId.proto, t: 'value', kind: apicId.kind, off: offsetOf(LAPIC_REGISTERS_LAYOUT, 'idRegister') + 3, type: u8 },
  ];
}

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
  lapic: lapicSources(),
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

function mismatch(where: string, what: string): never {
  throw new Error(`raw state encoder: ${where}: ${what}`);
}

/** A field's tag, written before its value or body. */
function tag(p: WireProgramBuilder, f: FieldPlan): void {
  p.tag(fieldTag(f));
}

const UINT_OPS = { u8: 'U8', u16: 'U16', u32: 'U32' } as const;

/** The op writing one scalar (no tag) of ffi type `type` at `off` as proto field `f`. */
function scalar(p: WireProgramBuilder, k: Kind, type: FieldType, off: number, f: FieldPlan, where: string): void {
  switch (k.t) {
    case 'u64':
      if (type.kind !== 'u64' || f.kind !== 'uint64') mismatch(where, `u64 from ${type.kind} into ${f.kind}`);
      return p.value('U64', off);
    case 'uint':
      if (f.kind !== 'uint32') mismatch(where, `uint into ${f.kind}`);
      if (type.kind !== 'u8' && type.kind !== 'u16' && type.kind !== 'u32') mismatch(where, `a ${type.kind} cannot be a ${k.t}`);
      return p.value(UINT_OPS[type.kind], off);
    case 'bool':
      if (f.kind !== 'bool' || type.kind !== 'u8') mismatch(where, `bool from ${type.kind} into ${f.kind}`);
      return p.value('BOOL', off);
    case 'bytes':
      if (f.kind !== 'bytes' || type.kind !== 'bytes' || type.size !== k.size) mismatch(where, `bytes(${k.size}) from ${type.kind} into ${f.kind}`);
      return p.bytes(off, k.size);
    default:
      return mismatch(where, `${k.t} is not a scalar`);
  }
}

/** One element of a field: a message of its struct, or a scalar preceded by its tag. */
function element(p: WireProgramBuilder, f: FieldPlan, k: Kind, type: FieldType, off: number, where: string): void {
  tag(p, f);
  if (k.t === 'struct') {
    if (type.kind !== 'struct' || f.kind !== 'message') mismatch(where, `struct from ${type.kind} into ${f.kind}`);
    p.delimited(() => message(p, f.message!, join(k.fields, type.layout.fields, off), where));
    return;
  }
  scalar(p, k, type, off, f, where);
}

function field(p: WireProgramBuilder, f: FieldPlan, s: Source, where: string): void {
  if (s.t === 'message') {
    if (f.kind !== 'message' || f.repeated) mismatch(where, 'not a singular message');
    tag(p, f);
    p.delimited(() => message(p, f.message!, s.children, where));
    return;
  }
  if (s.t === 'whole') {
    if (f.kind !== 'bytes' || f.repeated) mismatch(where, 'not a bytes field');
    tag(p, f);
    p.bytes(0);
    return;
  }
  if (s.t === 'list') {
    if (f.kind !== 'message' || !f.repeated) mismatch(where, 'not a repeated message');
    // Inside the loop, offsets are from the element's start.
    p.loop(s.countOff, s.max, s.off, s.stride, () => {
      tag(p, f);
      p.delimited(() => message(p, f.message!, s.children, where));
    });
    return;
  }
  if (s.kind.t !== 'array') {
    if (f.repeated) mismatch(where, 'repeated in the proto, one value in the struct');
    element(p, f, s.kind, s.type, s.off, where);
    return;
  }
  const { of, count } = s.kind;
  if (s.type.kind !== 'array' || s.type.count !== count || !f.repeated) mismatch(where, `array of ${count} against ${s.type.kind}`);
  const t = s.type.of;
  const at = (i: number) => s.off + i * t.size;
  if (isPacked(f)) {
    tag(p, f);
    p.delimited(() => {
      for (let i = 0; i < count; i++) scalar(p, of, t, at(i), f, where);
    });
  } else for (let i = 0; i < count; i++) element(p, f, of, t, at(i), where);
}

/** A message's fields in the proto's order (the order the object encoder writes them in). */
function message(p: WireProgramBuilder, plan: MessagePlan, sources: readonly Source[], where: string): void {
  const used = new Set<Source>();
  for (const f of plan) {
    const s = sources.find((x) => x.key === f.key);
    if (!s) continue;
    used.add(s);
    field(p, f, s, `${where}.${f.key}`);
  }
  const missing = sources.filter((s) => !used.has(s)).map((s) => s.key);
  if (missing.length) mismatch(where, `no proto field for ${missing.join(', ')}`);
}

/** A section's wire program, compiled once: its message body from the kernel's bytes. */
function compileSection(section: EncodedSection, plan: MessagePlan): Uint32Array {
  const p = new WireProgramBuilder();
  message(p, plan, SOURCES[section], section);
  return p.build();
}

/** A section written from its decoded value without building its proto object first (msrs). */
type ValueEncode = (w: Writer, v: never, extras: StateExtras) => void;

interface SectionPlan {
  name: SectionName;
  tag: FieldPlan;
  object: Encode;
  /** The body's program for a section's bytes (checked to hold what they describe). */
  program?: (b: Buffer) => Uint32Array;
  /** A number section's program, and the number of its value (undefined for a value of another shape). */
  numberProgram?: Uint32Array;
  numberIn?: (v: unknown) => number | undefined;
  value?: ValueEncode;
}

function planField(plan: MessagePlan, key: string, kind: FieldPlan['kind'], repeated: boolean, where: string): FieldPlan {
  const f = plan.find((x) => x.key === key);
  if (!f || f.kind !== kind || f.repeated !== repeated) mismatch(where, `no ${repeated ? 'repeated ' : ''}${kind} field ${key}`);
  return f;
}

/** Msrs' proto fields, checked to be what msrsEncoder and msrsProgram write. */
function msrsFields(plan: MessagePlan) {
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
  // Each field in field-number order, as the object encoder writes them.
  const order = [index, data, name].map((f) => f.number);
  if (order.some((n, i) => i > 0 && n < order[i - 1])) mismatch('msrs.entries', 'fields not in index, data, name order');
  return { entries, unreadable, index, data, name };
}

/** Each named MSR's name, encoded once. */
const MSR_NAME_BYTES = new Map([...MSR_NAMES].map(([i, n]) => [i, Buffer.from(n)]));
const NO_NAME = Buffer.alloc(0);

/**
 * Msrs from the entries KVM_GET_MSRS decoded to (a read that skipped refused MSRs), written as the
 * converter's objects (index, data, name; then unreadable_indices) would be, without them.
 */
function msrsEncoder(plan: MessagePlan): ValueEncode {
  const f = msrsFields(plan);
  const [entriesTag, indexTag, dataTag, nameTag, unreadableTag] = [f.entries, f.index, f.data, f.name, f.unreadable].map(fieldTag);
  return (w, v, extras) => {
    for (const e of v as MsrEntry[]) {
      w.varint32(entriesTag);
      const at = w.begin();
      w.varint32(indexTag);
      w.varint32(e.index);
      w.varint32(dataTag);
      w.varint64(Number(e.data & 0xffffffffn), Number((e.data >> 32n) & 0xffffffffn));
      w.varint32(nameTag);
      w.bytes(MSR_NAME_BYTES.get(e.index) ?? NO_NAME);
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
 * Msrs from the kvm_msrs bytes of a read that got every MSR asked for (so no unreadable_indices): a
 * program per buffer, each entry's index and data read at their offsets and its name a literal (the
 * indices are in the buffer before the read). Kept per buffer, and used again while the buffer lists
 * the same indices: GetState's reused read hands over the same buffer, holding the same indices, each call.
 */
function msrsProgramCompiler(plan: MessagePlan): (b: Buffer) => Uint32Array {
  const f = msrsFields(plan);
  const indexOff = offsetOf(MSR_ENTRY_LAYOUT, 'index');
  const dataOff = offsetOf(MSR_ENTRY_LAYOUT, 'data');
  // Read into locals once: the imports are re-export getters, and lists() runs for every entry of every call.
  const header = MSRS_HEADER_SIZE;
  const entry = MSR_ENTRY_SIZE;
  const entryAt = (i: number) => header + i * entry;
  const indexAt = (i: number) => entryAt(i) + indexOff;
  const programs = new WeakMap<Buffer, { program: Uint32Array; indices: number[] }>();
  /** The buffer still lists the indices its program was written for (a caller may refill it). */
  const lists = (b: Buffer, indices: number[]) => {
    if (b.readUInt32LE(0) !== indices.length) return false;
    for (let i = 0; i < indices.length; i++) if (b.readUInt32LE(indexAt(i)) !== indices[i]) return false;
    return true;
  };
  return (b) => {
    if (b.length < MSRS_HEADER_SIZE || b.length < encodedBytes('msrs', b))
      throw new Error(`raw state encoder: msrs is ${b.length} bytes, which does not hold what it describes`);
    const cached = programs.get(b);
    if (cached && lists(b, cached.indices)) return cached.program;
    const indices = Array.from({ length: b.readUInt32LE(0) }, (_, i) => b.readUInt32LE(indexAt(i)));
    const p = new WireProgramBuilder();
    indices.forEach((index, i) => {
      const at = entryAt(i);
      const name = MSR_NAME_BYTES.get(index) ?? NO_NAME;
      tag(p, f.entries);
      p.delimited(() => {
        tag(p, f.index);
        p.value('U32', at + indexOff);
        tag(p, f.data);
        p.value('U64', at + dataOff);
        p.literal(Buffer.concat([varintBytes(fieldTag(f.name)), varintBytes(name.length), name]));
      });
    });
    const program = p.build();
    programs.set(b, { program, indices });
    return program;
  };
}

/**
 * mp_state and tsc_khz, which reads give as numbers: a program over a 4-byte input holding the number,
 * writing what their converters' objects give (mp_state: the MpState named like the KVM value, UNSPECIFIED
 * for a value without a name, then the value itself; tsc_khz: the kHz).
 */
type NumberSection = 'mp_state' | 'tsc_khz';
const u32 = (n: unknown): number | undefined => (typeof n === 'number' && Number.isInteger(n) && n >= 0 && n <= 0xffffffff ? n : undefined);
/** A number section's u32, or undefined for a value of another shape (written by its converter then). */
const NUMBER_SECTIONS: { readonly [S in NumberSection]: (v: unknown) => number | undefined } = {
  mp_state: (v) => (typeof v === 'object' && v !== null ? u32((v as { mpState?: unknown }).mpState) : undefined),
  tsc_khz: u32,
};
const isNumberSection = (s: SectionName): s is NumberSection => s in NUMBER_SECTIONS;

function numberSectionProgram(section: NumberSection, plan: MessagePlan): Uint32Array {
  const p = new WireProgramBuilder();
  for (const f of plan) {
    tag(p, f);
    if (f.kind === 'uint32' && (f.key === 'khz' || f.key === 'kvmValue')) p.value('U32', 0);
    else if (section === 'mp_state' && f.key === 'value' && f.kind === 'enum') p.mapped(0, ...mpStateTable(f));
    else mismatch(section, `no source for ${f.key}`);
  }
  return p.build();
}

/** MpState's number for each KVM value up to the largest named one, and UNSPECIFIED's for the rest. */
function mpStateTable(f: FieldPlan): [number[], number] {
  const number = (name: string) => f.enumValues?.get(MP_STATE_PREFIX + name) ?? mismatch('mp_state', `MpState has no ${MP_STATE_PREFIX}${name}`);
  const unspecified = number('UNSPECIFIED');
  const table = Array.from({ length: Math.max(...MP_STATE_NAMES.keys()) + 1 }, (_, k) => {
    const name = MP_STATE_NAMES.get(k);
    return name === undefined ? unspecified : number(name);
  });
  return [table, unspecified];
}

/**
 * The bytes a section's buffer must hold: its struct's size exactly, or for a list (cpuid2) at least its
 * header and the entries its count names. A buffer that does not fit is refused, not misread.
 */
function checkLength(section: EncodedSection, b: Buffer): void {
  const codec = SECTIONS[section];
  const ok = codec.fixedSize ? b.length === codec.size : b.length >= codec.size && b.length >= encodedBytes(section, b);
  if (!ok) throw new Error(`raw state encoder: ${section} is ${b.length} bytes, which does not hold what it describes`);
}

const GET_STATE_RESPONSE = 'vcpud.v1.GetStateResponse';

/** Distinct section sets a response program is kept for (GetState callers ask for a few). */
const MAX_CACHED_PROGRAMS = 64;

/**
 * Copies of responses cut from shared slabs. Why: a response of ~8.5 KiB is over Buffer's pool limit,
 * so a copy of its own was an ArrayBuffer per call (an allocation, a backing store, external-memory
 * accounting): 1.7 us of the encoding's 8 in process. A slab is never written again once it is full,
 * and each copy is a view written whole before it is returned, so no copy holds another's bytes; a slab
 * lives as long as one of its copies does (grpc-js copies a response into its frame when it sends it).
 */
export class ResponseSlabs {
  private slab = Buffer.allocUnsafeSlow(0);
  private pos = 0;

  constructor(private readonly slabBytes = 256 * 1024) {}

  /**
   * The slab to write a response of up to `n` bytes into in place, from `at` (a fresh slab when this
   * one has less room); undefined for a response too large to share a slab (copyOf gives it its own).
   */
  reserve(n: number): Buffer | undefined {
    if (n > this.slabBytes / 8) return undefined;
    if (this.pos + n > this.slab.length) {
      this.slab = Buffer.allocUnsafeSlow(this.slabBytes);
      this.pos = 0;
    }
    return this.slab;
  }

  /** Where reserve()'s slab is written from. */
  get at(): number {
    return this.pos;
  }

  /** The response written in reserve()'s slab from `at` to `end`, now kept: its view. */
  commit(end: number): Buffer {
    const out = this.slab.subarray(this.pos, end);
    this.pos = (end + 7) & ~7;
    return out;
  }

  /** A copy of `src`'s first `n` bytes. */
  copyOf(src: Buffer, n: number): Buffer {
    const slab = this.reserve(n);
    if (!slab) return Buffer.from(src.subarray(0, n));
    src.copy(slab, this.pos, 0, n);
    return this.commit(this.pos + n);
  }
}

/** Runs `program` over `inputs` into `w` from its start, growing it until the output fits; w.pos is its end. */
function runInto(w: Writer, program: Uint32Array, inputs: Buffer[]): void {
  w.pos = 0;
  let end: number;
  while ((end = runWireProgram(program, inputs, w.buf, 0)) < 0) w.reserve(w.buf.length + 1);
  w.pos = end;
}

/** The bytes of a section's buffer its encoding reads: a list's header and the entries its count names. */
function encodedBytes(section: SectionName, b: Buffer): number {
  if (b.length < 4) return b.length + 1; // holds no count: not compared (the program refuses it)
  if (section === 'cpuid2') return CPUID2.sizeFor(b.readUInt32LE(0));
  if (section === 'msrs') return msrsSize(b.readUInt32LE(0));
  return b.length;
}

/** GetStateResponse's serializer (getStateResponseEncoder). */
export interface GetStateEncoder {
  /** The response of section values with the struct sections as kernel bytes. */
  (values: BytesReadResult['values'], extras: StateExtras, implicitlyPaused: boolean): Buffer;
  /**
   * The response of a kept read, read and written in one native call: the sections are encoded from
   * the kernel's bytes right after the ioctls, straight into a response slab. Or, when the read could
   * not be written so (MSRs the kernel refused, a section without a program over its bytes, no room),
   * the read's result, for the call above.
   */
  readResponse(read: ReusedRead, implicitlyPaused: boolean): Buffer | BytesReadResult;
}

/**
 * GetStateResponse's serializer for section values with the struct sections as kernel bytes. The state
 * message is one native run of a program over the sections' buffers: the byte sections' programs, and
 * for the others (decoded values) their bodies encoded here first, copied in as they are. Like
 * wireSerializer it writes into one reused buffer and returns a copy of the bytes. readResponse runs
 * the same programs over a kept read's own buffers, in the read's native call (GetState's hot path).
 */
export function getStateResponseEncoder(defs: PackageDefinition): GetStateEncoder {
  const enc = messageEncoders(defs, GET_STATE_RESPONSE);
  const [stateField] = enc.plan(GET_STATE_RESPONSE);
  // `state` first: the rest of the response is then the object encoder's output without it.
  if (stateField?.key !== 'state' || stateField.kind !== 'message') throw new Error(`raw state encoder: ${GET_STATE_RESPONSE}'s first field is not state`);
  const rest = enc.encoder(GET_STATE_RESPONSE);
  const sections: SectionPlan[] = stateField.message!.map((f) => {
    const name = snakeCase(f.key);
    if (!isSectionName(name) || f.kind !== 'message') throw new Error(`raw state encoder: VcpuState.${f.key} is not a section`);
    const encoded = (ENCODED_SECTIONS as readonly string[]).includes(name) ? (name as EncodedSection) : undefined;
    let program: SectionPlan['program'];
    if (encoded) {
      const compiled = compileSection(encoded, f.message!);
      program = (b) => {
        checkLength(encoded, b);
        return compiled;
      };
    } else if (name === 'msrs') program = msrsProgramCompiler(f.message!);
    const numbers = isNumberSection(name) ? { numberProgram: numberSectionProgram(name, f.message!), numberIn: NUMBER_SECTIONS[name] } : {};
    return { name, tag: f, object: enc.encoder(f.typeName), program, ...numbers, value: name === 'msrs' ? msrsEncoder(f.message!) : undefined };
  });

  /** The state field's program over one call's inputs: per present section its body's program, or (null) its body as encoded here. */
  const compose = (parts: (readonly [SectionPlan, Uint32Array | null])[]): Uint32Array => {
    const p = new WireProgramBuilder();
    tag(p, stateField);
    p.delimited(() =>
      parts.forEach(([s, body], input) => {
        p.input(input);
        tag(p, s.tag);
        if (body) p.delimited(() => p.splice(body));
        else p.bytes(0);
      }),
    );
    return p.build();
  };
  // Composed programs, by the sections present and their bodies' programs (numbered as first seen).
  const programs = new Map<string, Uint32Array>();
  const ids = new WeakMap<Uint32Array, number>();
  let nextId = 0;
  const programId = (body: Uint32Array) => {
    let id = ids.get(body);
    if (id === undefined) ids.set(body, (id = nextId++));
    return id;
  };

  const responses = new ResponseSlabs();
  const w = new Writer(16 * 1024);
  const bodies = new Writer(4 * 1024);
  // A number section's input, one per section (reused: a program has run before the next call writes it).
  const numberInputs = sections.map(() => Buffer.alloc(4));
  const encode = (values: BytesReadResult['values'], extras: StateExtras, implicitlyPaused: boolean): Buffer => {
    const inputs: Buffer[] = [];
    const parts: (readonly [SectionPlan, Uint32Array | null])[] = [];
    let key = '';
    const part = (i: number, input: Buffer, body: Uint32Array | null) => {
      inputs.push(input);
      parts.push([sections[i], body]);
      key += body ? `${i}:${programId(body)},` : `${i},`;
    };
    bodies.pos = 0;
    for (let i = 0; i < sections.length; i++) {
      const s = sections[i];
      let v = values[s.name];
      if (v === undefined) continue;
      // msrs as bytes carry no unreadable indices: with some listed, they are written from their entries.
      if (s.name === 'msrs' && Buffer.isBuffer(v) && extras.msrsUnreadable?.length) v = SECTIONS.msrs.decode(v);
      if (s.program && Buffer.isBuffer(v)) {
        part(i, v, s.program(v));
        continue;
      }
      const n = s.numberIn?.(v);
      if (n !== undefined) {
        numberInputs[i].writeUInt32LE(n, 0);
        part(i, numberInputs[i], s.numberProgram!);
        continue;
      }
      // A view of the bodies' buffer: when it grows, earlier views keep the buffer they were cut from.
      const start = bodies.pos;
      if (s.value) s.value(bodies, v as never, extras);
      else s.object(bodies, sectionMessage(s.name, v as never, extras));
      part(i, bodies.buf.subarray(start, bodies.pos), null);
    }
    let program = programs.get(key);
    if (!program) {
      program = compose(parts);
      if (programs.size < MAX_CACHED_PROGRAMS) programs.set(key, program);
    }
    runInto(w, program, inputs);
    rest(w, { implicitlyPaused });
    return responses.copyOf(w.buf, w.pos);
  };

  /** The state field's program over a kept read's inputs, in the response's section order; null when a section has no program over bytes. */
  const readEncoding = (read: ReusedRead): BatchEncoding | null => {
    const parts: (readonly [SectionPlan, Uint32Array])[] = [];
    const inputs: Buffer[] = [];
    const wanted = new Set(read.sections);
    for (const s of sections) {
      if (!wanted.has(s.name)) continue;
      const b = read.batch.inputs.get(s.name);
      const body = b && (s.program ? s.program(b) : s.numberProgram);
      if (!b || !body) return null;
      parts.push([s, body]);
      inputs.push(b);
    }
    return { program: compose(parts), inputs };
  };
  const readEncodings = new WeakMap<ReusedRead, BatchEncoding | null>();
  // What follows the state field: the response's other fields, which depend only on implicitly_paused.
  const tails = [false, true].map((implicitlyPaused) => {
    const t = new Writer(16);
    rest(t, { implicitlyPaused });
    return Buffer.from(t.buf.subarray(0, t.pos));
  });
  /** Room asked of a slab for a response: twice the largest written in place, so that one rarely lacks room. */
  let room = 16 * 1024;
  const readResponse = (read: ReusedRead, implicitlyPaused: boolean): Buffer | BytesReadResult => {
    let encoding = readEncodings.get(read);
    if (encoding === undefined) readEncodings.set(read, (encoding = readEncoding(read)));
    const slab = encoding && responses.reserve(room);
    if (!encoding || !slab) return read.read();
    const start = responses.at;
    const r = read.readEncoded(encoding, slab, start);
    if (typeof r !== 'number') return r;
    const tail = tails[implicitlyPaused ? 1 : 0];
    room = Math.max(room, 2 * (r - start + tail.length));
    if (r + tail.length > slab.length) return Buffer.concat([slab.subarray(start, r), tail]);
    tail.copy(slab, r);
    return responses.commit(r + tail.length);
  };
  return Object.assign(encode, { readResponse });
}
