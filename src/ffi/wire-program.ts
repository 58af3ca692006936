/**
 * Protobuf wire programs (native/wire_program.h): a message's bytes written from a kernel struct's bytes
 * in one native call. What to write is the caller's (src/server/convert/raw-state.ts compiles it); this
 * module builds the word list and runs it.
 */
import { native, type WireOp } from './native';

const OPS = native.wireOps;
/** Tags above this fit no op word: they are written as literals. */
const MAX_FOLDED_TAG = 2 ** (32 - OPS.TAG_SHIFT) - 1;

/** A number's varint bytes. */
export function varintBytes(v: number): Uint8Array {
  const bytes: number[] = [];
  for (; v > 0x7f; v >>>= 7) bytes.push((v & 0x7f) | 0x80);
  bytes.push(v);
  return Uint8Array.from(bytes);
}

/** Builds a program word by word; offsets are from the current base (the input, or a loop's element). */
export class WireProgramBuilder {
  private readonly words: number[] = [];
  /** A field tag waiting for the op that writes its value or begins its body (folded into its word). */
  private pendingTag = 0;

  /** A field's tag, written before the next value, bytes or body. */
  tag(tag: number): void {
    this.flushTag();
    this.pendingTag = tag;
  }

  /** Literal bytes (a constant string, a tag no op takes). */
  literal(bytes: Uint8Array): void {
    this.flushTag();
    this.words.push(OPS.LIT, bytes.length);
    for (let i = 0; i < bytes.length; i += 4) this.words.push((bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24)) >>> 0);
  }

  /** A varint of the value at `off`: u8/u16/u32/u64 unsigned, or BOOL (1 for any non-zero byte). */
  value(op: Extract<WireOp, 'U8' | 'U16' | 'U32' | 'U64' | 'BOOL'>, off: number): void {
    this.op(OPS[op], off);
  }

  /** A varint of table[v] for the u32 v at `off`, `fallback` when v is past the table (a proto enum from a kernel value). */
  mapped(off: number, table: readonly number[], fallback: number): void {
    if ([...table, fallback].some((x) => !Number.isInteger(x) || x < 0 || x > 0xffffffff)) throw new RangeError('wire program: MAP values must be u32');
    this.op(OPS.MAP, off, table.length, fallback, ...table);
  }

  /** A bytes field's length and contents: `len` bytes at `off`, or (len undefined) every byte from `off` on. */
  bytes(off: number, len?: number): void {
    if (len === undefined) this.op(OPS.REST, off);
    else this.op(OPS.BYTES, off, len);
  }

  /** A length-delimited body written by `body`. */
  delimited(body: () => void): void {
    this.op(OPS.BEGIN);
    body();
    this.flushTag();
    this.words.push(OPS.END);
  }

  /** `body` once per element of a counted array: min(u32 at countOff, max) elements of `stride` bytes at `off`. */
  loop(countOff: number, max: number, off: number, stride: number, body: () => void): void {
    this.flushTag();
    this.words.push(OPS.LOOP, countOff, Math.min(max, 0xffffffff), off, stride, 0);
    const at = this.words.length;
    body();
    this.flushTag();
    this.words[at - 1] = this.words.length - at;
  }

  /** Reads from input `k` (of the inputs the program runs over) from here on. */
  input(k: number): void {
    this.flushTag();
    this.words.push(OPS.INPUT, k);
  }

  /** Another program's words, run here (its offsets from the current base). */
  splice(program: Uint32Array): void {
    this.flushTag();
    for (const w of program) this.words.push(w);
  }

  build(): Uint32Array {
    this.flushTag();
    return Uint32Array.from(this.words);
  }

  /** An op that writes a value or begins a body, the pending tag folded in. */
  private op(code: number, ...args: number[]): void {
    const tag = this.pendingTag <= MAX_FOLDED_TAG ? this.pendingTag : 0;
    if (tag !== this.pendingTag) this.flushTag();
    this.pendingTag = 0;
    this.words.push((code | (tag << OPS.TAG_SHIFT)) >>> 0, ...args);
  }

  private flushTag(): void {
    if (!this.pendingTag) return;
    const tag = this.pendingTag;
    this.pendingTag = 0;
    this.literal(varintBytes(tag));
  }
}

/** Runs `program` over `inputs` into `out` from `pos`: the position after, or -1 when `out` is too small. */
export function runWireProgram(program: Uint32Array, inputs: Buffer[], out: Buffer, pos: number): number {
  return native.encodeWire(program, inputs, out, pos);
}
