/**
 * native PreparedBatch (native/kvm_ioctls.cc): its arguments are checked once, when it is made, with the
 * single calls' checks; a run needs a live fd and hands back an ioctl's failure (with its index) as
 * getBatch does; a run given a destination then runs its wire program over the buffers it holds. No
 * vCPU needed: a failing run uses /dev/null, an encoding one has no ioctls, and
 * test/kvm/read-batch.test.ts runs real batches.
 */
import fs from 'node:fs';
import { native } from '../../src/ffi/native';
import { WireProgramBuilder } from '../../src/ffi/wire-program';

const op = (name: string) => native.batchOps.indexOf(name);
const REGS = native.sizes.kvm_regs;

describe('PreparedBatch', () => {
  it('checks its arguments when made, as the single calls do', () => {
    const out = new Float64Array(2);
    const make =
      (...a: unknown[]) =>
      () =>
        Reflect.construct(native.PreparedBatch, a);
    expect(make(Uint8Array.of(op('KVM_GET_REGS')), [Buffer.alloc(REGS), Buffer.alloc(REGS)], out, 0)).toThrow(/disagree/);
    expect(make(Uint8Array.of(op('KVM_GET_REGS')), [Buffer.alloc(REGS - 1)], out, 0)).toThrow(/KVM_GET_REGS.*the struct is/);
    expect(make(Uint8Array.of(200), [Buffer.alloc(REGS)], out, 0)).toThrow(/not a batch op/);
    expect(make(Uint8Array.of(op('KVM_GET_TSC_KHZ')), [undefined], out, 0, undefined, [Buffer.alloc(3)])).toThrow(/returnsTo\[0\]/);
    expect(make(Uint8Array.of(op('KVM_GET_REGS')), [Buffer.alloc(REGS)], out, 0, [Buffer.alloc(1), Buffer.alloc(1), Buffer.alloc(1)])).toThrow(
      /getBatch|PreparedBatch.*is \d+ bytes/,
    );
  });

  it('needs an open fd to run, and hands back the failing ioctl with its index', () => {
    const out = new Float64Array(4);
    const b = new native.PreparedBatch(Uint8Array.of(op('KVM_GET_TSC_KHZ'), op('KVM_GET_REGS')), [undefined, Buffer.alloc(REGS)], out, 0);
    expect(() => b.run(-1)).toThrow(/fd -1 is closed/);
    const fd = fs.openSync('/dev/null', 'r');
    try {
      const failure = b.run(fd) as Error & { batchIndex: number; code?: string };
      expect(failure.batchIndex).toBe(0);
      expect(failure.message).toMatch(/KVM_GET_TSC_KHZ/);
      expect(failure.message).toMatch(/ENOTTY/);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('encodes with its program over the buffers it holds, into the caller buffer from its position, or says it had no room', () => {
    const input = Buffer.from([7, 0, 0, 0]);
    const p = new WireProgramBuilder();
    p.value('U32', 0);
    const b = new native.PreparedBatch(new Uint8Array(0), [], new Float64Array(0), 0, undefined, [], p.build(), [input]);
    const fd = 0; // a batch without ioctls does not use it
    // The interpreter asks for a varint's largest size (10 bytes) before it writes one.
    const dest = Buffer.alloc(16, 0xee);
    expect(b.run(fd, dest, 2)).toBe(3);
    expect([...dest.subarray(0, 4)]).toEqual([0xee, 0xee, 7, 0xee]);
    input.writeUInt32LE(300, 0); // the program reads the buffer as it is at each run
    expect(b.run(fd, dest, 0)).toBe(2);
    expect([...dest.subarray(0, 2)]).toEqual([0xac, 0x02]);
    expect(b.run(fd, Buffer.alloc(9), 0)).toBe(-1);
    expect(() => b.run(fd, dest, 17)).toThrow(/pos/);
    expect(b.run(fd)).toBeUndefined();
    const plain = new native.PreparedBatch(new Uint8Array(0), [], new Float64Array(0), 0);
    expect(() => plain.run(fd, dest, 0)).toThrow(/no program/);
  });
});
