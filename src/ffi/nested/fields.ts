/**
 * Declarative little-endian field access: a layout is a table of [name, offset, width] and one generic
 * reader/writer walks it, so offsets live in exactly one place per structure.
 */

export type Width = 1 | 2 | 4 | 8;
/** u64 fields are bigint (physical addresses and MSRs do not fit a double); narrower fields are number. */
export type FieldValue<W extends Width> = W extends 8 ? bigint : number;
export type FieldSpec = readonly [name: string, offset: number, width: Width];
export type FieldsOf<T extends readonly FieldSpec[]> = { [F in T[number] as F[0]]: FieldValue<F[2]> };

export function readField(buf: Buffer, offset: number, width: Width): number | bigint {
  switch (width) {
    case 1:
      return buf.readUInt8(offset);
    case 2:
      return buf.readUInt16LE(offset);
    case 4:
      return buf.readUInt32LE(offset);
    case 8:
      return buf.readBigUInt64LE(offset);
  }
}

export function writeField(buf: Buffer, offset: number, width: Width, value: number | bigint): void {
  switch (width) {
    case 1:
      buf.writeUInt8(Number(value), offset);
      return;
    case 2:
      buf.writeUInt16LE(Number(value), offset);
      return;
    case 4:
      buf.writeUInt32LE(Number(value), offset);
      return;
    case 8:
      buf.writeBigUInt64LE(BigInt.asUintN(64, BigInt(value)), offset);
      return;
  }
}

export function readFields<T extends readonly FieldSpec[]>(buf: Buffer, base: number, table: T): FieldsOf<T> {
  const out: Record<string, number | bigint> = {};
  for (const [name, offset, width] of table) out[name] = readField(buf, base + offset, width);
  return out as FieldsOf<T>;
}

export function writeFields<T extends readonly FieldSpec[]>(buf: Buffer, base: number, table: T, values: FieldsOf<T>): void {
  const record = values as Record<string, number | bigint>;
  for (const [name, offset, width] of table) writeField(buf, base + offset, width, record[name]);
}

/** End of the furthest field: the number of bytes a buffer needs for readFields to succeed. */
export function extentOf(table: readonly FieldSpec[]): number {
  return Math.max(...table.map(([, offset, width]) => offset + width));
}

/** Bit tables map a name to its mask. */
export type BitTable = Readonly<Record<string, number | bigint>>;

/** Builds a bit table from names listed by bit position (null = unnamed bit). */
export function bitsFromList<const T extends readonly (string | null)[]>(names: T): Readonly<Record<Exclude<T[number], null>, number>> {
  const out: Record<string, number> = {};
  names.forEach((name, bit) => {
    if (name !== null) out[name] = 2 ** bit; // 2 ** 31 stays positive, 1 << 31 would not
  });
  return out as Record<Exclude<T[number], null>, number>;
}

/** Names of the set bits; bits absent from the table become 'UNKNOWN_0x<bit>' (one per bit); `ignore` skips multi-bit fields. */
export function bitNames(value: number | bigint, table: BitTable, ignore: number | bigint = 0): string[] {
  let rest = BigInt(value) & ~BigInt(ignore);
  const names: string[] = [];
  for (const [name, mask] of Object.entries(table)) {
    const m = BigInt(mask);
    if ((rest & m) === m && m !== 0n) {
      names.push(name);
      rest &= ~m;
    }
  }
  for (let bit = 0n; rest !== 0n; bit++) {
    if (rest & (1n << bit)) {
      names.push(`UNKNOWN_${hex(1n << bit)}`);
      rest &= ~(1n << bit);
    }
  }
  return names;
}

export function hex(value: number | bigint): string {
  return `0x${BigInt(value).toString(16)}`;
}

/** Set bits of `value` outside `allowed` (0 when none). */
export function bitsOutside(value: number | bigint, allowed: number | bigint): bigint {
  return BigInt(value) & ~BigInt(allowed);
}

/**
 * Copy of src[start, end). Buffer.from(buffer)/buf.copy do not type-check with @types/node 20.9 under TS 5.9
 * (Buffer is not assignable to Uint8Array there); set() takes any ArrayLike.
 */
export function cloneBytes(src: Buffer, start = 0, end = src.length): Buffer {
  const view = src.subarray(start, end);
  const out = Buffer.alloc(view.length);
  out.set(view);
  return out;
}
