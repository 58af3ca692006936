/**
 * The one declarative codec for the C structs that KVM's vCPU ioctls exchange. A struct is an
 * ordered table of fields (name, C name, offset, type) plus its total size; every section module
 * is a table, so no byte offset is computed by hand anywhere else. The tables are checked against
 * the C compiler's sizeof/offsetof by test/unit/sections.test.ts.
 *
 * Value mapping: u8/u16/u32 -> number, u64 -> bigint, bytes(n) -> Buffer (a copy), nested struct ->
 * object, array -> JS array. Reserved/padding fields are neither decoded nor written, so encoding
 * over a `base` (the bytes KVM returned) leaves them exactly as the kernel wrote them.
 */

import { snakeCase } from '../../case';
import { compiledPerKey, compileFunction } from '../../codegen';

export interface NumberType {
  readonly kind: 'u8' | 'u16' | 'u32';
  readonly size: 1 | 2 | 4;
}
export interface BigIntType {
  readonly kind: 'u64';
  readonly size: 8;
}
export interface BytesType {
  readonly kind: 'bytes';
  readonly size: number;
}
export interface ReservedType {
  readonly kind: 'reserved';
  readonly size: number;
}
export interface StructType<V> {
  readonly kind: 'struct';
  readonly size: number;
  readonly layout: Layout<V>;
}
export interface ArrayType<E extends FieldType> {
  readonly kind: 'array';
  readonly size: number;
  readonly of: E;
  readonly count: number;
}
export type FieldType = NumberType | BigIntType | BytesType | ReservedType | StructType<unknown> | ArrayType<FieldType>;

/** The JS value a field type decodes to. */
export type ValueOf<T extends FieldType> = T extends NumberType
  ? number
  : T extends BigIntType
    ? bigint
    : T extends BytesType
      ? Buffer
      : T extends StructType<infer V>
        ? V
        : T extends ArrayType<infer E>
          ? ValueOf<E>[]
          : never;

export interface Field<N extends string = string, T extends FieldType = FieldType> {
  /** camelCase name in the decoded object. */
  readonly name: N;
  /** The member's name in the C header (for the ABI test and error messages). */
  readonly cName: string;
  readonly offset: number;
  readonly type: T;
}

/** The decoded object of a field table: one property per non-reserved field. */
export type Decoded<F extends readonly Field[]> = {
  [E in F[number] as E['type'] extends ReservedType ? never : E['name']]: ValueOf<E['type']>;
};

/** Anything that turns bytes into a value and back: structs, raw sections, counted lists. */
export interface Codec<V> {
  /** The C struct (or description) the bytes are. */
  readonly name: string;
  /** Byte size: exact when fixedSize, else the minimum (an empty list, the 4096-byte xsave). */
  readonly size: number;
  readonly fixedSize: boolean;
  decode(buf: Buffer): V;
  /** Bytes for `value`; with `base`, bytes the value does not describe are copied from it. */
  encode(value: V, base?: Buffer): Buffer;
}

export interface Layout<V> extends Codec<V> {
  readonly fields: readonly Field[];
  /** Decode the struct at `offset` of a larger buffer (decode() insists on an exact size). */
  read(buf: Buffer, offset?: number): V;
}

export type LayoutValue<L> = L extends Codec<infer V> ? V : never;

export const u8: NumberType = { kind: 'u8', size: 1 };
export const u16: NumberType = { kind: 'u16', size: 2 };
export const u32: NumberType = { kind: 'u32', size: 4 };
export const u64: BigIntType = { kind: 'u64', size: 8 };
export const bytes = (size: number): BytesType => ({ kind: 'bytes', size });
export const reserved = (size: number): ReservedType => ({ kind: 'reserved', size });
export const nested = <V>(layout: Layout<V>): StructType<V> => ({ kind: 'struct', size: layout.size, layout });
export const array = <E extends FieldType>(of: E, count: number): ArrayType<E> => ({
  kind: 'array',
  size: of.size * count,
  of,
  count,
});

/** A field; the C name defaults to the snake_case of `name` (apicBase -> apic_base). */
export function field<N extends string, T extends FieldType>(name: N, offset: number, type: T, cName: string = snakeCase(name)): Field<N, T> {
  return { name, cName, offset, type };
}

/** The field `name` of a field table (throws at module load when a caller names a field the table lacks). */
export function layoutField(fields: readonly Field[], name: string): Field {
  const f = fields.find((x) => x.name === name);
  if (!f) throw new Error(`no field ${name} in the layout`);
  return f;
}

/** The byte offset of field `name` of a struct layout. */
export const offsetOf = (layout: Layout<unknown>, name: string) => layoutField(layout.fields, name).offset;

const LIMIT = { u8: 2 ** 8, u16: 2 ** 16, u32: 2 ** 32 } as const;
const U64_MAX = (1n << 64n) - 1n;

function readValue(buf: Buffer, off: number, t: FieldType): unknown {
  switch (t.kind) {
    case 'u8':
      return buf[off];
    case 'u16':
      return buf.readUInt16LE(off);
    case 'u32':
      return buf.readUInt32LE(off);
    case 'u64':
      return buf.readBigUInt64LE(off);
    case 'bytes':
      return copyRange(buf, off, t.size);
    case 'reserved':
      return undefined;
    case 'struct':
      return readFields(buf, off, t.layout.fields);
    case 'array': {
      const out = new Array<unknown>(t.count);
      for (let i = 0; i < t.count; i++) out[i] = readValue(buf, off + i * t.of.size, t.of);
      return out;
    }
  }
}

/**
 * Decoding is compiled once per field table into a function of straight-line reads returning one
 * object literal: several times faster than walking the table per call, and every decoded object of
 * a struct gets the same hidden class. The table stays the single source of offsets.
 */
type Reader = (buf: Buffer, off: number) => Record<string, unknown>;

/** The JS expression reading a value of type `t` at offset expression `off` of buffer `b` (generated code). */
export function readExpr(t: FieldType, off: string): string {
  switch (t.kind) {
    case 'u8':
      return `b[${off}]`;
    case 'u16':
      return `b.readUInt16LE(${off})`;
    case 'u32':
      return `b.readUInt32LE(${off})`;
    case 'u64':
      return `b.readBigUInt64LE(${off})`;
    case 'bytes':
      return `copy(b, ${off}, ${t.size})`;
    case 'reserved':
      return 'undefined';
    case 'struct':
      return objectExpr(t.layout.fields, off);
    case 'array':
      return `[${Array.from({ length: t.count }, (_, i) => readExpr(t.of, `${off} + ${i * t.of.size}`)).join(', ')}]`;
  }
}

function objectExpr(fields: readonly Field[], off: string): string {
  const props = fields.filter((f) => f.type.kind !== 'reserved').map((f) => `${JSON.stringify(f.name)}: ${readExpr(f.type, `${off} + ${f.offset}`)}`);
  return `{ ${props.join(', ')} }`;
}

const compiledReader = compiledPerKey((fields: readonly Field[]) =>
  compileFunction<Reader>('readStruct', ['b', 'o'], `return ${objectExpr(fields, 'o')};`, { copy: copyRange }),
);

function readFields(buf: Buffer, off: number, fields: readonly Field[]): Record<string, unknown> {
  return compiledReader(fields)(buf, off);
}

// Checked up front so a bad value names its field instead of surfacing as Node's generic error.
function fail(path: string, what: string): never {
  throw new TypeError(`${path}: ${what}`);
}

function writeValue(buf: Buffer, off: number, t: FieldType, v: unknown, parent: string, name?: string): void {
  // The path string is built only when needed: in the hot loop it would be the main cost.
  const where = () => (name === undefined ? parent : `${parent}.${name}`);
  switch (t.kind) {
    case 'u8':
    case 'u16':
    case 'u32':
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= LIMIT[t.kind])
        fail(where(), `expected an integer in [0, 2^${8 * t.size}), got ${String(v)}`);
      if (t.kind === 'u8') buf[off] = v;
      else if (t.kind === 'u16') buf.writeUInt16LE(v, off);
      else buf.writeUInt32LE(v, off);
      return;
    case 'u64':
      if (typeof v !== 'bigint' || v < 0n || v > U64_MAX) fail(where(), `expected a bigint in [0, 2^64), got ${String(v)}`);
      buf.writeBigUInt64LE(v, off);
      return;
    case 'bytes':
      if (!Buffer.isBuffer(v) || v.length !== t.size) fail(where(), `expected a ${t.size}-byte Buffer`);
      buf.set(v, off);
      return;
    case 'reserved':
      return;
    case 'struct':
      writeFields(buf, off, t.layout.fields, v, where());
      return;
    case 'array':
      if (!Array.isArray(v) || v.length !== t.count) fail(where(), `expected an array of ${t.count}`);
      for (let i = 0; i < t.count; i++) writeValue(buf, off + i * t.of.size, t.of, v[i], `${where()}[${i}]`);
      return;
  }
}

/** A JS condition true when expression `v` is a valid value of type `t` (whose write follows). */
function validExpr(t: FieldType, v: string): string {
  switch (t.kind) {
    case 'u8':
    case 'u16':
    case 'u32':
      return `(typeof ${v} === 'number' && Number.isInteger(${v}) && ${v} >= 0 && ${v} < ${LIMIT[t.kind]})`;
    case 'u64':
      return `(typeof ${v} === 'bigint' && ${v} >= 0n && ${v} <= ${U64_MAX}n)`;
    case 'bytes':
      return `(Buffer.isBuffer(${v}) && ${v}.length === ${t.size})`;
    default:
      throw new Error('unreachable');
  }
}

let tempCounter = 0;

/** Statements writing expression `v` of type `t` at offset expression `off`; the slow walk on an invalid value. */
function writeStatements(t: FieldType, v: string, off: string): string {
  switch (t.kind) {
    case 'u8':
      return `if (!${validExpr(t, v)}) return slow(b, off, v, path); b[${off}] = ${v};`;
    case 'u16':
      return `if (!${validExpr(t, v)}) return slow(b, off, v, path); b.writeUInt16LE(${v}, ${off});`;
    case 'u32':
      return `if (!${validExpr(t, v)}) return slow(b, off, v, path); b.writeUInt32LE(${v}, ${off});`;
    case 'u64':
      return `if (!${validExpr(t, v)}) return slow(b, off, v, path); b.writeBigUInt64LE(${v}, ${off});`;
    case 'bytes':
      return `if (!${validExpr(t, v)}) return slow(b, off, v, path); b.set(${v}, ${off});`;
    case 'reserved':
      return '';
    case 'struct':
      return fieldsStatements(t.layout.fields, v, off);
    case 'array': {
      const a = `a${tempCounter++}`;
      const items = Array.from({ length: t.count }, (_, i) => writeStatements(t.of, `${a}[${i}]`, `${off} + ${i * t.of.size}`));
      return `{ const ${a} = ${v}; if (!Array.isArray(${a}) || ${a}.length !== ${t.count}) return slow(b, off, v, path); ${items.join(' ')} }`;
    }
  }
}

function fieldsStatements(fields: readonly Field[], v: string, off: string): string {
  const o = `o${tempCounter++}`;
  const body = fields.filter((f) => f.type.kind !== 'reserved').map((f) => writeStatements(f.type, `${o}[${JSON.stringify(f.name)}]`, `${off} + ${f.offset}`));
  return `{ const ${o} = ${v}; if (typeof ${o} !== 'object' || ${o} === null) return slow(b, off, v, path); ${body.join(' ')} }`;
}

type Writer = (buf: Buffer, off: number, v: unknown, path: string) => void;

/**
 * Encoding is compiled like decoding: straight-line checks and writes per table. On the first value
 * that fails a check, the table walk below runs instead; it fails at the same field and builds the
 * message naming it, so the generated code needs no error paths of its own.
 */
const compiledWriter = compiledPerKey((fields: readonly Field[]): Writer => {
  tempCounter = 0;
  const slow: Writer = (b, off, v, path) => walkFields(b, off, fields, v, path);
  return compileFunction<Writer>('writeStruct', ['b', 'off', 'v', 'path'], fieldsStatements(fields, 'v', 'off'), { slow });
});

function writeFields(buf: Buffer, off: number, fields: readonly Field[], v: unknown, path: string): void {
  compiledWriter(fields)(buf, off, v, path);
}

function walkFields(buf: Buffer, off: number, fields: readonly Field[], v: unknown, path: string): void {
  if (typeof v !== 'object' || v === null) fail(path, 'expected an object');
  const obj = v as Record<string, unknown>;
  for (let i = 0; i < fields.length; i++) {
    const f = fields[i];
    if (f.type.kind === 'reserved') continue;
    const value = obj[f.name];
    if (value === undefined) fail(`${path}.${f.name}`, 'missing');
    writeValue(buf, off + f.offset, f.type, value, path, f.name);
  }
}

function checkLength(name: string, buf: Buffer, size: number, exact: boolean): void {
  if (!Buffer.isBuffer(buf)) throw new TypeError(`${name}: expected a Buffer`);
  if (exact ? buf.length !== size : buf.length < size)
    throw new RangeError(`${name}: buffer is ${buf.length} bytes, expected ${exact ? '' : 'at least '}${size}`);
}

// Uint8Array#set rather than Buffer.from/copy: @types/node 20.9 types those against the pre-5.7
// Uint8Array and TypeScript 5.9 rejects a Buffer argument.
/**
 * `len` bytes of `src` from `start`, as a new Buffer. kvm_fpu alone decodes to 24 16-byte registers: a
 * subarray view plus a copy per register cost more than the ioctl, so small fields are copied byte by
 * byte into a buffer from Node's pool (allocUnsafe: every byte is overwritten at once).
 */
function copyRange(src: Buffer, start: number, len: number): Buffer {
  const out = Buffer.allocUnsafe(len);
  if (len > 64) out.set(src.subarray(start, start + len));
  else for (let i = 0; i < len; i++) out[i] = src[start + i];
  return out;
}

function copyOf(src: Buffer): Buffer {
  const out = Buffer.allocUnsafe(src.length);
  out.set(src);
  return out;
}

/** `size` zeroed bytes, or a copy of the first `size` bytes of `base` (zero-extended). */
function startFrom(size: number, base?: Buffer): Buffer {
  const out = Buffer.alloc(size);
  if (base) out.set(base.subarray(0, size));
  return out;
}

// Layout mistakes (overlap, overrun, duplicate names) fail at module load, not on first use.
function checkFields(name: string, size: number, fields: readonly Field[]): void {
  const names = new Set<string>();
  let end = 0;
  for (const f of [...fields].sort((a, b) => a.offset - b.offset)) {
    if (names.has(f.name)) throw new Error(`${name}: duplicate field ${f.name}`);
    names.add(f.name);
    if (f.offset < end) throw new Error(`${name}: ${f.name} at ${f.offset} overlaps the previous field`);
    end = f.offset + f.type.size;
    if (end > size) throw new Error(`${name}: ${f.name} ends at ${end}, past the ${size}-byte struct`);
  }
}

/** A fixed-size struct. `name` is the C struct's name. */
export function struct<const F extends readonly Field[]>(name: string, size: number, fields: F): Layout<Decoded<F>> {
  checkFields(name, size, fields);
  type V = Decoded<F>;
  // Closures, not `this`, so decode/encode can be passed around detached.
  const read = (buf: Buffer, offset = 0): V => {
    checkLength(name, buf, offset + size, false);
    return readFields(buf, offset, fields) as V;
  };
  return {
    name,
    size,
    fixedSize: true,
    fields,
    read,
    decode(buf: Buffer): V {
      checkLength(name, buf, size, true);
      return read(buf);
    },
    encode(value: V, base?: Buffer): Buffer {
      if (base) checkLength(`${name} base`, base, size, true);
      const out = startFrom(size, base);
      writeFields(out, 0, fields, value, name);
      return out;
    },
  };
}

/**
 * A section kept as raw bytes because its layout is versioned by the CPU/host (LAPIC page, XSAVE
 * area): the value is the bytes themselves, so there is nothing for a base to contribute.
 */
export function raw(name: string, size: number, fixedSize: boolean): Codec<Buffer> {
  return {
    name,
    size,
    fixedSize,
    decode(buf: Buffer): Buffer {
      checkLength(name, buf, size, fixedSize);
      return copyOf(buf);
    },
    encode(value: Buffer): Buffer {
      checkLength(name, value, size, fixedSize);
      return copyOf(value);
    },
  };
}

/** A codec whose value is the one field of a single-member struct (kvm_mp_state, tsc_khz). */
export function unwrap<K extends string, T>(layout: Layout<Record<K, T>>, key: K): Codec<T> {
  return {
    name: layout.name,
    size: layout.size,
    fixedSize: true,
    decode: (buf: Buffer): T => layout.decode(buf)[key],
    encode: (value: T, base?: Buffer): Buffer => layout.encode({ [key]: value } as Record<K, T>, base),
  };
}

export interface ListCodec<E> extends Codec<E[]> {
  readonly header: Layout<unknown>;
  readonly countField: string;
  /** C name of the flexible array member, which starts right after the header. */
  readonly entriesName: string;
  readonly entry: FieldType;
  /** Bytes for a list of `count` entries (also the buffer to allocate for a kernel-filled list). */
  sizeFor(count: number): number;
}

/**
 * A header with a u32 count followed by a flexible array (kvm_msrs, kvm_cpuid2, kvm_msr_list).
 * decode() reads `count` entries and ignores spare capacity after them (the kernel fills lists
 * into a buffer sized for the maximum); encode() writes the count from the array's length.
 */
export function list<C extends string, T extends FieldType>(
  header: Layout<Record<C, number>>,
  countField: C,
  entriesName: string,
  entry: T,
): ListCodec<ValueOf<T>> {
  const named = header.fields.filter((f) => f.type.kind !== 'reserved');
  if (named.length !== 1 || named[0].name !== countField || named[0].type.kind !== 'u32')
    throw new Error(`${header.name}: the header must hold only the u32 ${countField}`);
  const sizeFor = (count: number): number => header.size + count * entry.size;
  return {
    name: header.name,
    size: header.size,
    fixedSize: false,
    header,
    countField,
    entriesName,
    entry,
    sizeFor,
    decode(buf: Buffer): ValueOf<T>[] {
      const count = header.read(buf)[countField];
      if (buf.length < sizeFor(count)) throw new RangeError(`${header.name}: ${countField}=${count} needs ${sizeFor(count)} bytes, buffer is ${buf.length}`);
      return readValue(buf, header.size, array(entry, count)) as ValueOf<T>[];
    },
    encode(entries: readonly ValueOf<T>[], base?: Buffer): Buffer {
      const out = startFrom(sizeFor(entries.length), base);
      writeFields(out, 0, header.fields, { [countField]: entries.length }, header.name);
      writeValue(out, header.size, array(entry, entries.length), entries, `${header.name}.${entriesName}`);
      return out;
    },
  };
}
