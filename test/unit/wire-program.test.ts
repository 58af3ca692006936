/**
 * native/wire_program: the interpreter GetState's encoder runs. Each op writes what the JS Writer writes for
 * the same value (the reference the rest of the encoder is tested against), a body's length takes more
 * bytes when it must, a full output buffer is reported (not overrun), and a program reading past its input
 * or malformed is refused with a RangeError, never a crash or a read out of bounds.
 */
import { native } from '../../src/ffi/native';
import { runWireProgram, WireProgramBuilder } from '../../src/ffi/wire-program';
import { Writer } from '../../src/server/wire-encoder';

const run = (p: WireProgramBuilder, inputs: Buffer[], size = 4096) => {
  const out = Buffer.alloc(size);
  const end = runWireProgram(p.build(), inputs, out, 0);
  return end < 0 ? undefined : out.subarray(0, end);
};

const written = (fn: (w: Writer) => void) => {
  const w = new Writer(16);
  fn(w);
  return w.buf.subarray(0, w.pos);
};

describe('wire programs (native encodeWire)', () => {
  it('writes each scalar as the JS Writer does, at the varint length steps', () => {
    for (const v of [0n, 1n, 0x7fn, 0x80n, 0x3fffn, 0x4000n, 0xffffffffn, 0x100000000n, 0xffffffffffffffffn]) {
      const input = Buffer.alloc(16);
      input.writeBigUInt64LE(v, 8);
      const p = new WireProgramBuilder();
      p.value('U64', 8);
      p.value('U32', 8);
      p.value('U16', 8);
      p.value('U8', 8);
      p.value('BOOL', 8);
      p.value('BOOL', 0);
      const lo = Number(v & 0xffffffffn);
      const expected = written((w) => {
        w.varint64(lo, Number(v >> 32n));
        w.varint32(lo);
        w.varint32(lo & 0xffff);
        w.varint32(lo & 0xff);
        w.varint32(v !== 0n && (lo & 0xff) !== 0 ? 1 : 0);
        w.varint32(0);
      });
      expect(run(p, [input])).toEqual(expected);
    }
  });

  it('writes literals, bytes, the rest of an input and bodies with one- and two-byte lengths', () => {
    const input = Buffer.from(Array.from({ length: 300 }, (_, i) => i & 0xff));
    const p = new WireProgramBuilder();
    p.literal(Uint8Array.of(0x0a, 0xfe, 0x01));
    p.bytes(4, 5);
    p.delimited(() => p.bytes(0));
    p.delimited(() => p.value('U8', 7));
    const expected = written((w) => {
      w.buf.set([0x0a, 0xfe, 0x01], 0);
      w.pos = 3;
      w.bytesFrom(input, 4, 5);
      const a = w.begin();
      w.bytesFrom(input, 0, 300);
      w.end(a);
      const b = w.begin();
      w.varint32(7);
      w.end(b);
    });
    expect(run(p, [input])).toEqual(expected);
  });

  it('writes a field tag folded into the op after it, and a tag no op can take as a literal', () => {
    const input = Buffer.from([5, 0, 0, 0]);
    const p = new WireProgramBuilder();
    p.tag(0x08);
    p.value('U32', 0);
    p.tag(0x0100_0012); // above what an op word holds
    p.bytes(0, 2);
    p.tag(0x1a);
    p.delimited(() => p.value('U8', 0));
    p.tag(0x20); // followed by no value: written as it is
    const program = p.build();
    expect(program[0] >>> native.wireOps.TAG_SHIFT).toBe(0x08);
    const expected = written((w) => {
      w.varint32(0x08);
      w.varint32(5);
      w.varint32(0x0100_0012);
      w.bytesFrom(input, 0, 2);
      w.varint32(0x1a);
      const at = w.begin();
      w.varint32(5);
      w.end(at);
      w.varint32(0x20);
    });
    const out = Buffer.alloc(64);
    expect(out.subarray(0, runWireProgram(program, [input], out, 0))).toEqual(expected);
  });

  it('maps a u32 through a table, past its end to the fallback', () => {
    const input = Buffer.alloc(12);
    for (const [i, v] of [1, 3, 200].entries()) input.writeUInt32LE(v, 4 * i);
    const p = new WireProgramBuilder();
    for (const off of [0, 4, 8]) p.mapped(off, [7, 8, 300], 0);
    expect(run(p, [input])).toEqual(
      written((w) => {
        for (const v of [8, 0, 0]) w.varint32(v);
      }),
    );
    expect(() => new WireProgramBuilder().mapped(0, [-1], 0)).toThrow(/MAP values must be u32/);
  });

  it('loops over a counted array, capped at its maximum, and switches inputs', () => {
    // A count of 5 at offset 0, elements of 4 bytes from offset 4; the second input is one u32.
    const a = Buffer.alloc(4 + 5 * 4);
    a.writeUInt32LE(5, 0);
    for (let i = 0; i < 5; i++) a.writeUInt32LE(1000 + i, 4 + 4 * i);
    const b = Buffer.alloc(4);
    b.writeUInt32LE(77, 0);
    const p = new WireProgramBuilder();
    p.loop(0, 3, 4, 4, () => p.delimited(() => p.value('U32', 0)));
    p.input(1);
    p.value('U32', 0);
    const expected = written((w) => {
      for (let i = 0; i < 3; i++) {
        const at = w.begin();
        w.varint32(1000 + i);
        w.end(at);
      }
      w.varint32(77);
    });
    expect(run(p, [a, b])).toEqual(expected);
  });

  it('reports an output buffer too small with -1 and writes nothing past its end', () => {
    const p = new WireProgramBuilder();
    p.bytes(0);
    const input = Buffer.alloc(100, 1);
    const out = Buffer.alloc(120, 0xee);
    expect(runWireProgram(p.build(), [input], out.subarray(0, 50), 0)).toBe(-1);
    expect(out.subarray(50).every((x) => x === 0xee)).toBe(true);
    expect(runWireProgram(p.build(), [input], out, 0)).toBe(101);
  });

  it('refuses reads past the input, a count naming more elements than the input holds, and malformed programs', () => {
    const input = Buffer.alloc(8);
    const refused = (build: (p: WireProgramBuilder) => void, inputs: Buffer[] = [input]) => {
      const p = new WireProgramBuilder();
      build(p);
      return () => run(p, inputs);
    };
    expect(refused((p) => p.value('U64', 1))).toThrow(/read of 8 bytes at input offset 1 past its 8 bytes/);
    expect(refused((p) => p.bytes(4, 5))).toThrow(/encodeWire: /);
    expect(refused((p) => p.bytes(9))).toThrow(/encodeWire: /);
    const counted = Buffer.alloc(8);
    counted.writeUInt32LE(1000, 0);
    expect(refused((p) => p.loop(0, 0xffffffff, 4, 4, () => p.value('U32', 0)), [counted])).toThrow(/encodeWire: /);
    expect(refused((p) => p.input(1))).toThrow(/INPUT 1 of 1 inputs/);
    expect(refused((p) => p.loop(0, 1, 0, 0, () => p.input(0)), [counted])).toThrow(/INPUT inside a loop/);
    const ops = native.wireOps;
    const raw = (words: number[]) => () => runWireProgram(Uint32Array.from(words), [input], Buffer.alloc(64), 0);
    expect(raw([ops.END])).toThrow(/END without BEGIN/);
    expect(raw([ops.BEGIN])).toThrow(/BEGIN without END/);
    expect(raw([ops.U32])).toThrow(/op truncated/);
    expect(raw([ops.LIT, 100])).toThrow(/LIT longer than the program/);
    expect(raw([ops.LOOP, 0, 1, 0, 0, 50])).toThrow(/LOOP body longer than the program/);
    expect(raw([ops.MAP, 0, 5, 0, 1])).toThrow(/MAP table longer than the program/);
    expect(raw([999 & 0xff])).toThrow(/unknown op 231/);
    expect(raw([ops.LIT | (0x08 << ops.TAG_SHIFT), 0])).toThrow(/takes no tag/);
    expect(raw(Array.from({ length: 17 }, () => ops.BEGIN))).toThrow(/nested deeper than 16/);
  });
});
