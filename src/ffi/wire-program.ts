/**
 * Protobuf wire programs (native/wire_program.h): a message's bytes written from a kernel struct's bytes
 * in one native call. What to write is the caller's (src/server/convert/raw-state.ts compiles it); this
 * module builds the word list and runs it.
 */
import { native, type WireOp } from './native';

const OPS = native.wireOps;

/** Builds a program word by word; offsets are from the current base (the input, or a loop's element). */
export class WireProgramBuilder {
  private readonly words: number[] = [];

  /** Literal bytes (a tag, a constant string). */
  literal(bytes: Uint8Array): void {
    this.words.push(OPS.LIT, bytes.length);
    for (let i = 0; i < bytes.length; i += 4) this.words.push((bytes[i] | (bytes[i + 1] << 8) | (bytes[i + 2] << 16) | (bytes[i + 3] << 24)) >>> 0);
  }

  /** A varint of the value at `off`: u8/u16/u32/u64 unsigned, or BOOL (1 for any non-zero byte). */
  value(op: Extract<WireOp, 'U8' | 'U16' | 'U32' | 'U64' | 'BOOL'>, off: number): void {
    this.words.push(OPS[op], off);
  }

  /** A bytes field's length and contents: `len` bytes at `off`, or (len undefined) every byte from `off` on. */
  bytes(off: number, len?: number): void {
    if (len === undefined) this.words.push(OPS.REST, off);
    else this.words.push(OPS.BYTES, off, len);
  }

  /** A length-delimited body written by `body`. */
  delimited(body: () => void): void {
    this.words.push(OPS.BEGIN);
    body();
    this.words.push(OPS.END);
  }

  /** `body` once per element of a counted array: min(u32 at countOff, max) elements of `stride` bytes at `off`. */
  loop(countOff: number, max: number, off: number, stride: number, body: () => void): void {
    this.words.push(OPS.LOOP, countOff, Math.min(max, 0xffffffff), off, stride, 0);
    const at = this.words.length;
    body();
    this.words[at - 1] = this.words.length - at;
  }

  /** Reads from input `k` (of the inputs the program runs over) from here on. */
  input(k: number): void {
    this.words.push(OPS.INPUT, k);
  }

  /** Another program's words, run here (its offsets from the current base). */
  splice(program: Uint32Array): void {
    for (const w of program) this.words.push(w);
  }

  build(): Uint32Array {
    return Uint32Array.from(this.words);
  }
}

/** Runs `program` over `inputs` into `out` from `pos`: the position after, or -1 when `out` is too small. */
export function runWireProgram(program: Uint32Array, inputs: Buffer[], out: Buffer, pos: number): number {
  return native.encodeWire(program, inputs, out, pos);
}
