/**
 * Declarative mapping between an ffi section value (bigint u64s, u8 flags, Buffers) and its proto message
 * (u64s as Longs to encode, decimal strings once decoded; bools; bytes). A message is a table of fields; one walker converts each way, so no
 * section repeats the per-field logic.
 *
 * proto -> ffi is strict: every value is range-checked into the Checker, and a null sub-message (absent) takes
 * the `base` value of the same place, or zeros without a base. A bool maps to 0/1, except that `true` over a base
 * byte that is already non-zero keeps that byte: KVM writes 0/1, but a round trip must not change any byte.
 */
import { snakeCase } from '../../case';
import { compiledPerKey, compileFunction } from '../../codegen';
import { u64ToLong, type Checker } from './scalars';

export type Kind =
  | { readonly t: 'u64' }
  | { readonly t: 'uint'; readonly bits: number }
  | { readonly t: 'bool' }
  | { readonly t: 'bytes'; readonly size: number }
  | { readonly t: 'struct'; readonly fields: Fields }
  | { readonly t: 'array'; readonly of: Kind; readonly count: number };

export interface FieldMap {
  /** Key in the ffi value. */
  readonly ffi: string;
  /** Key in the proto-loader object (camelCase); the error path uses its snake_case proto name. */
  readonly proto: string;
  readonly kind: Kind;
}
export type Fields = readonly FieldMap[];

export const U64: Kind = { t: 'u64' };
export const BOOL: Kind = { t: 'bool' };
export const uint = (bits: number): Kind => ({ t: 'uint', bits });
export const bytes = (size: number): Kind => ({ t: 'bytes', size });
export const struct = (fields: Fields): Kind => ({ t: 'struct', fields });
export const array = (of: Kind, count: number): Kind => ({ t: 'array', of, count });

/**
 * A field table for ffi type V and proto type P: [ffiKey, kind] when the proto key is the same, or
 * [ffiKey, kind, protoKey] when it differs. Keys are checked against both types.
 */
export function fields<V, P>(...entries: readonly (readonly [keyof V & string, Kind] | readonly [keyof V & string, Kind, keyof P & string])[]): Fields {
  return entries.map(([ffi, kind, proto]) => ({ ffi, proto: proto ?? ffi, kind }));
}

/** The same kind for every name, each spelled the same in V and P (register files). */
export const uniform = <V, P>(names: readonly (keyof V & keyof P & string)[], kind: Kind): Fields => names.map((n) => ({ ffi: n, proto: n, kind }));

type Obj = Record<string, unknown>;

/** A copy of a bytes field: the proto object must not alias the ffi value's buffer. */
const copyBytes = (b: Buffer): Buffer => {
  const out = Buffer.allocUnsafe(b.length);
  b.copy(out);
  return out;
};

/** The JS expression converting ffi value expression `v` of kind `k` to its proto form. */
function toProtoExpr(k: Kind, v: string): string {
  switch (k.t) {
    case 'u64':
      return `L(${v})`;
    case 'uint':
      return v;
    case 'bool':
      return `${v} !== 0`;
    case 'bytes':
      return `B(${v})`;
    case 'struct':
      return objectToProtoExpr(k.fields, v);
    case 'array':
      return `${v}.map((e) => ${toProtoExpr(k.of, 'e')})`;
  }
}

function objectToProtoExpr(fields: Fields, v: string): string {
  return `{ ${fields.map((f) => `${JSON.stringify(f.proto)}: ${toProtoExpr(f.kind, `${v}[${JSON.stringify(f.ffi)}]`)}`).join(', ')} }`;
}

const compiledToProto = compiledPerKey((fields: Fields) =>
  compileFunction<(v: Obj) => Obj>('toProto', ['v'], `return ${objectToProtoExpr(fields, 'v')};`, { L: u64ToLong, B: copyBytes }),
);

/**
 * The proto object for `fields` of ffi value `v`. The conversion is generated once per table, as the ffi
 * decoders are (src/ffi/sections/struct.ts): walking the table for every field of every GetState cost more
 * than the ioctls.
 */
export function toProto(fields: Fields, v: Obj): Obj {
  return compiledToProto(fields)(v);
}

/** A copy of `base` (the same place in the base value), or the all-zero value without one. */
export function fill(k: Kind, base?: unknown): unknown {
  switch (k.t) {
    case 'u64':
      return base ?? 0n;
    case 'uint':
    case 'bool':
      return base ?? 0;
    case 'bytes': {
      const out = Buffer.alloc(k.size);
      if (base) out.set(base as Buffer);
      return out;
    }
    case 'struct':
      return Object.fromEntries(k.fields.map((f) => [f.ffi, fill(f.kind, (base as Obj | undefined)?.[f.ffi])]));
    case 'array':
      return Array.from({ length: k.count }, (_, i) => fill(k.of, (base as unknown[] | undefined)?.[i]));
  }
}

function valueFromProto(k: Kind, p: unknown, base: unknown, c: Checker, path: string): unknown {
  switch (k.t) {
    case 'u64':
      return c.u64(p, path);
    case 'uint':
      return c.uint(p, k.bits, path);
    case 'bool':
      return c.bool(p, path) ? (typeof base === 'number' && base !== 0 ? base : 1) : 0;
    case 'bytes':
      return c.bytes(p, path, k.size);
    case 'struct':
      return fromProto(k.fields, p as Obj | null | undefined, base as Obj | undefined, c, path);
    case 'array': {
      // Protobuf cannot tell an empty repeated field from an absent one: with a base, empty means "keep".
      if (base !== undefined && (p === null || p === undefined || (Array.isArray(p) && p.length === 0))) return fill(k, base);
      const items = c.list(p as unknown[] | undefined, path, k.count, true);
      const b = base as unknown[] | undefined;
      return Array.from({ length: k.count }, (_, i) => (i < items.length ? valueFromProto(k.of, items[i], b?.[i], c, `${path}[${i}]`) : fill(k.of, b?.[i])));
    }
  }
}

/**
 * The ffi fields of `fields` from proto object `p` (violations into `c`, paths under `path`). A null `p` is an
 * absent message: its fields come from `base`, or are zero.
 */
export function fromProto(fields: Fields, p: Obj | null | undefined, base: Obj | undefined, c: Checker, path: string): Obj {
  const out: Obj = {};
  for (const f of fields) {
    if (p === null || p === undefined) out[f.ffi] = fill(f.kind, base?.[f.ffi]);
    else out[f.ffi] = valueFromProto(f.kind, p[f.proto], base?.[f.ffi], c, `${path}.${snakeCase(f.proto)}`);
  }
  return out;
}
