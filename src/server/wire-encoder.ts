/**
 * A protobuf encoder for the objects handlers return, in proto-loader's shape (camelCase keys; u64 as a
 * Long, a number or a decimal string; enums by name or number; bytes as Buffers), built once per message
 * type from the descriptors of the package definition.
 *
 * Why: proto-loader serializes with protobufjs's fromObject (a converted copy of the whole object) and
 * encode (a list of write operations, then a second walk). A full GetState response is ~8.5 KiB of ~1,000
 * fields, and that cost ~80 us per call. This writes straight into one reused buffer: a nested length is
 * given one byte up front, and the body is moved along when it needs more.
 *
 * It writes every field that is present (not null or undefined), zeros included, as protobufjs does.
 * Message types it cannot encode (maps, groups, floating point: none is in a response it serves) are
 * refused when the encoder is built, not when a call is answered.
 */
import type { PackageDefinition } from '@grpc/proto-loader';
import { compileFunction } from '../codegen';

type Scalar = 'uint32' | 'int32' | 'uint64' | 'int64' | 'bool' | 'enum' | 'string' | 'bytes';

export interface FieldPlan {
  readonly key: string;
  readonly number: number;
  readonly repeated: boolean;
  readonly kind: Scalar | 'message';
  /** Enum values by name, for kind 'enum'. */
  readonly enumValues?: ReadonlyMap<string, number>;
  /** Filled in after every message of the tree has a plan (messages can nest recursively). */
  message?: MessagePlan;
  readonly typeName: string;
}
export type MessagePlan = FieldPlan[];

const SCALARS: Readonly<Record<string, Scalar>> = {
  TYPE_UINT32: 'uint32',
  TYPE_INT32: 'int32',
  TYPE_UINT64: 'uint64',
  TYPE_INT64: 'int64',
  TYPE_BOOL: 'bool',
  TYPE_ENUM: 'enum',
  TYPE_STRING: 'string',
  TYPE_BYTES: 'bytes',
};

/** Wire types. */
const VARINT = 0;
const LENGTH_DELIMITED = 2;

interface DescriptorField {
  name: string;
  number: number;
  label: string;
  type: string;
  typeName: string;
}
interface Descriptor {
  name?: string;
  field?: DescriptorField[];
  value?: { name: string; number: number }[];
  nestedType?: Descriptor[];
  enumType?: Descriptor[];
  options?: { mapEntry?: boolean } | null;
}

/**
 * The descriptor of a fully qualified type. The package definition lists top-level types only; a nested
 * one (vcpud.v1.VcpuEvents.Exception) is found in its parent's nestedType or enumType.
 */
function findDescriptor(defs: PackageDefinition, full: string): Descriptor | undefined {
  const top = defs[full] as unknown as { type?: Descriptor } | undefined;
  if (top?.type) return top.type;
  const dot = full.lastIndexOf('.');
  if (dot < 0) return undefined;
  const parent = findDescriptor(defs, full.slice(0, dot));
  const name = full.slice(dot + 1);
  return parent?.nestedType?.find((d) => d.name === name) ?? parent?.enumType?.find((d) => d.name === name);
}

/** A relative type name resolved as protoc does: innermost scope first. */
function resolve(defs: PackageDefinition, scope: string, name: string): string {
  if (name.startsWith('.')) return name.slice(1);
  const parts = scope.split('.');
  for (let i = parts.length; i >= 0; i--) {
    const full = [...parts.slice(0, i), name].join('.');
    if (findDescriptor(defs, full)) return full;
  }
  throw new Error(`wire encoder: type ${name} (used in ${scope}) is not in the package definition`);
}

function planMessage(defs: PackageDefinition, name: string, plans: Map<string, MessagePlan>): MessagePlan {
  const existing = plans.get(name);
  if (existing) return existing;
  const d = findDescriptor(defs, name);
  if (!d) throw new Error(`wire encoder: message ${name} is not in the package definition`);
  if (d.options?.mapEntry) throw new Error(`wire encoder: ${name} is a map entry; maps are not supported`);
  const plan: MessagePlan = [];
  plans.set(name, plan);
  for (const f of [...(d.field ?? [])].sort((a, b) => a.number - b.number)) {
    const repeated = f.label === 'LABEL_REPEATED';
    const typeName = f.typeName ? resolve(defs, name, f.typeName) : '';
    if (f.type === 'TYPE_MESSAGE') {
      const field: FieldPlan = { key: f.name, number: f.number, repeated, kind: 'message', typeName };
      plan.push(field);
      field.message = planMessage(defs, typeName, plans);
      continue;
    }
    const kind = SCALARS[f.type];
    if (!kind) throw new Error(`wire encoder: ${name}.${f.name} is ${f.type}, which it does not encode`);
    const enumValues = kind === 'enum' ? new Map(findDescriptor(defs, typeName)!.value!.map((v) => [v.name, v.number])) : undefined;
    plan.push({ key: f.name, number: f.number, repeated, kind, typeName, enumValues });
  }
  return plan;
}

/** u64/i64 halves of a 64-bit field given as a number, a decimal string or a bigint (Longs: Writer.u64). */
function split64(v: unknown, field: string): [number, number] {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return [v >>> 0, Math.floor(v / 0x1_0000_0000) >>> 0];
  if (typeof v === 'number' || typeof v === 'string' || typeof v === 'bigint') {
    const b = BigInt.asUintN(64, BigInt(v));
    return [Number(b & 0xffffffffn), Number(b >> 32n)];
  }
  throw new TypeError(`wire encoder: ${field} is not a 64-bit integer: ${typeof v}`);
}

export class Writer {
  buf: Buffer;
  pos = 0;

  constructor(size: number) {
    this.buf = Buffer.allocUnsafe(size);
  }

  reserve(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafe(Math.max(this.buf.length * 2, this.pos + n));
    this.buf.copy(grown, 0, 0, this.pos);
    this.buf = grown;
  }

  varint32(v: number): void {
    this.reserve(5);
    v >>>= 0;
    while (v > 0x7f) {
      this.buf[this.pos++] = (v & 0x7f) | 0x80;
      v >>>= 7;
    }
    this.buf[this.pos++] = v;
  }

  varint64(lo: number, hi: number): void {
    if (hi === 0) return this.varint32(lo);
    this.reserve(10);
    while (hi !== 0 || lo > 0x7f) {
      this.buf[this.pos++] = (lo & 0x7f) | 0x80;
      lo = ((lo >>> 7) | (hi << 25)) >>> 0;
      hi >>>= 7;
    }
    this.buf[this.pos++] = lo;
  }

  /** Negative int32s (and enum values) are sign-extended to ten bytes on the wire. */
  int32(v: number): void {
    if (v < 0) this.varint64(v >>> 0, 0xffffffff);
    else this.varint32(v);
  }

  u64(v: unknown, field: string): void {
    if (typeof v === 'object' && v !== null && 'low' in v) {
      // The form stateToProto hands over: no array, no bigint.
      const l = v as { low: number; high: number };
      return this.varint64(l.low >>> 0, l.high >>> 0);
    }
    const [lo, hi] = split64(v, field);
    this.varint64(lo, hi);
  }

  enumValue(v: unknown, values: ReadonlyMap<string, number>, type: string): void {
    const n = typeof v === 'number' ? v : values.get(v as string);
    if (n === undefined) throw new TypeError(`wire encoder: ${JSON.stringify(v)} is not a value of ${type}`);
    this.int32(n);
  }

  bytes(b: Uint8Array): void {
    this.varint32(b.length);
    this.reserve(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }

  /** A bytes field's length and contents, copied from `len` bytes of `src` at `start` (no view allocated). */
  bytesFrom(src: Buffer, start: number, len: number): void {
    this.varint32(len);
    this.reserve(len);
    src.copy(this.buf, this.pos, start, start + len);
    this.pos += len;
  }

  string(s: string): void {
    const n = Buffer.byteLength(s);
    this.varint32(n);
    this.reserve(n);
    this.pos += this.buf.write(s, this.pos, n, 'utf8');
  }

  /** Starts a length-delimited body: one byte is kept for its length. Pass the result to end(). */
  begin(): number {
    this.reserve(1);
    return this.pos++;
  }

  /** Writes the length of the body begun at `start`, moving the body when the length needs more than a byte. */
  end(start: number): void {
    const len = this.pos - start - 1;
    if (len < 0x80) {
      this.buf[start] = len;
      return;
    }
    let extra = 0;
    for (let l = len >>> 7; l > 0; l >>>= 7) extra++;
    this.reserve(extra);
    this.buf.copyWithin(start + 1 + extra, start + 1, this.pos);
    const after = this.pos + extra;
    this.pos = start;
    this.varint32(len);
    this.pos = after;
  }
}

/** The statement writing scalar `v` of field `f` (enum value maps are E[index]). */
function scalarStatement(f: FieldPlan, v: string, enumIndex: number): string {
  switch (f.kind) {
    case 'uint32':
      return `w.varint32(${v});`;
    case 'int32':
      return `w.int32(${v});`;
    case 'uint64':
    case 'int64':
      return `w.u64(${v}, ${JSON.stringify(f.key)});`;
    case 'bool':
      return `w.varint32(${v} ? 1 : 0);`;
    case 'enum':
      return `w.enumValue(${v}, E[${enumIndex}], ${JSON.stringify(f.typeName)});`;
    case 'string':
      return `w.string(${v});`;
    case 'bytes':
      return `w.bytes(${v});`;
    case 'message':
      throw new Error('unreachable');
  }
}

const PACKABLE = new Set<FieldPlan['kind']>(['uint32', 'int32', 'uint64', 'int64', 'bool', 'enum']);

/** A repeated scalar field proto3 writes packed: one tag, one length, the values back to back. */
export const isPacked = (f: FieldPlan): boolean => f.repeated && PACKABLE.has(f.kind);

/** The key (field number and wire type) written before each value of `f` (once, for a packed field). */
export function fieldTag(f: FieldPlan): number {
  const wire = f.kind === 'message' || f.kind === 'string' || f.kind === 'bytes' || isPacked(f) ? LENGTH_DELIMITED : VARINT;
  return (f.number << 3) | wire;
}

export type Encode = (w: Writer, o: Record<string, unknown>) => void;

/**
 * One generated function per message type, so every property read is a named load V8 can cache (a
 * keyed load over ~1,000 fields of many shapes was half the cost of a table walk). F holds the
 * functions by plan index, so nested and recursive types call each other through it.
 */
function compile(plans: MessagePlan[]): Encode[] {
  const F: Encode[] = [];
  const E: ReadonlyMap<string, number>[] = [];
  const index = new Map(plans.map((p, i) => [p, i]));
  for (const plan of plans) {
    const lines = ['let v;'];
    for (const f of plan) {
      const tag = fieldTag(f);
      const enumIndex = f.enumValues ? E.push(f.enumValues) - 1 : -1;
      const one = (x: string) =>
        f.kind === 'message' ? `{ const s = w.begin(); F[${index.get(f.message!)}](w, ${x}); w.end(s); }` : scalarStatement(f, x, enumIndex);
      lines.push(`v = o[${JSON.stringify(f.key)}];`);
      if (!f.repeated) lines.push(`if (v != null) { w.varint32(${tag}); ${one('v')} }`);
      // proto3 packs repeated scalars: one tag, one length, the values back to back.
      else if (isPacked(f)) lines.push(`if (v != null && v.length) { w.varint32(${tag}); const s = w.begin(); for (const e of v) ${one('e')} w.end(s); }`);
      else lines.push(`if (v != null) for (const e of v) { w.varint32(${tag}); ${one('e')} }`);
    }
    F.push(compileFunction<Encode>('encode', ['w', 'o'], lines.join('\n'), { F, E }));
  }
  return F;
}

export interface MessageEncoders {
  /** The plan of a message type reachable from the root (fully qualified name). */
  plan(name: string): MessagePlan;
  /** The generated object encoder of a message type reachable from the root. */
  encoder(name: string): Encode;
}

/** Plans and object encoders of message type `root` and every type it contains. */
export function messageEncoders(defs: PackageDefinition, root: string): MessageEncoders {
  const plans = new Map<string, MessagePlan>();
  planMessage(defs, root, plans);
  const all = [...plans.values()];
  const compiled = compile(all);
  const plan = (name: string): MessagePlan => {
    const p = plans.get(name);
    if (!p) throw new Error(`wire encoder: ${name} is not reachable from ${root}`);
    return p;
  };
  return { plan, encoder: (name) => compiled[all.indexOf(plan(name))] };
}

/**
 * A serializer for message type `name` (fully qualified, e.g. 'vcpud.v1.GetStateResponse'). It reuses one
 * scratch buffer, grown to the largest message it has written, and returns a copy of the bytes.
 */
export function wireSerializer(defs: PackageDefinition, name: string): (value: object) => Buffer {
  const encode = messageEncoders(defs, name).encoder(name);
  const w = new Writer(16 * 1024);
  return (value) => {
    w.pos = 0;
    encode(w, value as Record<string, unknown>);
    return Buffer.from(w.buf.subarray(0, w.pos));
  };
}
