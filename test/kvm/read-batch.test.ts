/**
 * GetState reads every section with one native call (Vcpu.readBatch). On a real vCPU it must give
 * the bytes the one-ioctl-per-call path gives, report the same ioctls to the metrics observer, and
 * fail with the same error when an ioctl in the middle of the batch fails.
 *
 * GetState's hot path also writes the response in that call (a kept read's PreparedBatch with the
 * encoder's program: getStateResponseEncoder().readResponse). Its bytes must be those the encoder
 * writes from the same run's values, for every section list GetState can ask for, implicitly_paused
 * included; it must follow the vCPU between reads, give the read's values instead where it cannot
 * encode (MSRs the kernel refuses), and report its ioctls to the metrics observer, bound or not.
 */
import { KvmError } from '../../src/errors';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { SECTIONS, type SectionName } from '../../src/ffi/sections';
import { setIoctlObserver, type IoctlObserver } from '../../src/ffi/observe';
import type { Vcpu } from '../../src/ffi/vcpu';
import type { Vm } from '../../src/ffi/vm';
import { vcpudPackageDefinition } from '../../src/api/proto';
import { getStateResponseEncoder } from '../../src/server/convert/raw-state';
import { readStateBytes, readStateBytesPerSection, readStateBytesReused, reusedRead, type BytesReadResult, type StateContext } from '../../src/vm/vcpu-state';
import { describeKvm, KVM_PATH, stateTestVcpu } from '../support/kvm';
import { thrownBy as caught } from '../support/thrown';

/**
 * Every ioctl the observer hears about, with its errno when it failed, sorted: metrics count them,
 * and the batch asks KVM_CHECK_EXTENSION (xsave's size) before its ioctls instead of between them.
 */
function observedIoctls(fn: () => void): string[] {
  const seen: string[] = [];
  setIoctlObserver({ onIoctl: (ioctl, _s, code) => seen.push(code ? `${ioctl}:${code}` : ioctl), onNegotiationRetry: () => {} });
  try {
    fn();
  } finally {
    setIoctlObserver(undefined);
  }
  return seen.sort();
}

/**
 * The ioctls one ioctl per call makes, but for the KVM_GET_SREGS a batch that also reads sregs2 and
 * vcpu_events answers from them (src/ffi/sregs-from-sregs2.ts; test/kvm/sregs-from-sregs2.test.ts).
 */
function batchedEquivalent(single: string[]): string[] {
  const derivable = single.includes('KVM_GET_SREGS2') && single.includes('KVM_GET_VCPU_EVENTS');
  const at = single.indexOf('KVM_GET_SREGS');
  return derivable && at >= 0 ? single.filter((_, i) => i !== at) : single;
}

/**
 * The MSRs as entries (a batch read gives the kernel's kvm_msrs bytes when it read every MSR), the TSC MSR
 * (0x10), which moves between two reads, with its value left out.
 */
function withoutTsc(r: BytesReadResult): BytesReadResult {
  const m = r.values.msrs;
  const entries = Buffer.isBuffer(m) ? SECTIONS.msrs.decode(m) : m;
  const msrs = entries?.map((e) => (e.index === 0x10 ? { ...e, data: 0n } : e));
  return { ...r, values: { ...r.values, msrs } };
}

const encoder = getStateResponseEncoder(vcpudPackageDefinition());

/** A u64 as its protobuf varint: how a register's value appears in a response. */
function varint(v: bigint): Buffer {
  const bytes: number[] = [];
  for (; v > 0x7fn; v >>= 7n) bytes.push(Number(v & 0x7fn) | 0x80);
  bytes.push(Number(v));
  return Buffer.from(bytes);
}
const RAX = varint(0x1122334455667788n);

/** Section lists GetState is asked for: all, single structs, the lists, the numbers, and sregs alone and beside what answers it. */
const LISTS: { sections: SectionName[]; msrs?: number[] }[] = [
  { sections: [] },
  { sections: ['regs'] },
  { sections: ['sregs'] },
  { sections: ['sregs', 'sregs2', 'vcpu_events'] },
  { sections: ['cpuid2', 'tsc_khz', 'mp_state'] },
  { sections: ['xsave', 'lapic', 'fpu', 'xcrs', 'debugregs'] },
  { sections: ['msrs', 'regs'], msrs: [0x174, 0x175, 0x10] },
];

describeKvm('GetState reads: one batched native call', () => {
  let kvm: Kvm;
  let caps: HostCapabilities;
  let vm: Vm;
  let vcpu: Vcpu;
  let ctx: StateContext;

  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
    caps = probeCapabilities(kvm);
  });
  afterAll(() => kvm.close());

  beforeEach(() => {
    ({ vm, vcpu } = stateTestVcpu(kvm));
    ctx = { caps, irqchip: true };
    // Distinct values, so equal bytes are not just two fresh vCPUs' zeros.
    const regs = vcpu.getRegs();
    regs.rax = 0x1122334455667788n;
    regs.rip = 0x1234n;
    vcpu.setRegs(regs);
  });
  afterEach(() => vm.close());

  it('returns the same sections, bytes and MSRs as one ioctl per call', () => {
    const batched = withoutTsc(readStateBytes(vcpu, ctx, []));
    const single = withoutTsc(readStateBytesPerSection(vcpu, ctx, []));
    expect(Object.keys(batched.values)).toEqual(Object.keys(single.values));
    expect(Object.keys(batched.values).length).toBeGreaterThanOrEqual(10);
    expect(batched).toEqual(single);
    expect((batched.values.regs as Buffer).readBigUInt64LE(0)).toBe(0x1122334455667788n);
  });

  it("takes the sections' buffers from shared allocations, not one ArrayBuffer each", () => {
    const buffers = Object.values(readStateBytes(vcpu, ctx, []).values).filter((v): v is Buffer => Buffer.isBuffer(v));
    expect(buffers.length).toBeGreaterThanOrEqual(8);
    // ~18 KiB of sections fit one 32 KiB chunk; a host with a larger XSAVE2 area may need a second.
    expect(new Set(buffers.map((b) => b.buffer)).size).toBeLessThanOrEqual(2);
  });

  it('skips refused MSRs the same way', () => {
    const indices = [0x174, 0xdeadbeef, 0x175];
    const batched = readStateBytes(vcpu, ctx, ['msrs', 'regs'], indices);
    expect(batched).toEqual(readStateBytesPerSection(vcpu, ctx, ['msrs', 'regs'], indices));
    expect(batched.msrsUnreadable).toEqual([0xdeadbeef]);
  });

  it('reports the same ioctls to the metrics observer, but the KVM_GET_SREGS it answers from sregs2 and vcpu_events', () => {
    readStateBytes(vcpu, ctx, []); // the VM caches its KVM_CHECK_EXTENSION answers on first use
    const batched = observedIoctls(() => readStateBytes(vcpu, ctx, []));
    expect(batched).toEqual(batchedEquivalent(observedIoctls(() => readStateBytesPerSection(vcpu, ctx, []))));
    expect(batched).toContain('KVM_GET_REGS');
  });

  it('fails in the middle of the batch with the same error (kind, reason, ioctl, errno) and the same observed ioctls (less the answered KVM_GET_SREGS)', () => {
    // KVM_GET_MSRS refuses more than 255 entries with E2BIG: a real failure after lapic in save order.
    const tooMany = Array.from({ length: 300 }, (_, i) => 0x174 + (i % 3));
    readStateBytes(vcpu, ctx, []); // the VM caches its KVM_CHECK_EXTENSION answers on first use
    let batchedError: unknown;
    let singleError: unknown;
    const batchedSeen = observedIoctls(() => (batchedError = caught(() => readStateBytes(vcpu, ctx, [], tooMany))));
    const singleSeen = observedIoctls(() => (singleError = caught(() => readStateBytesPerSection(vcpu, ctx, [], tooMany))));
    expect(batchedError).toBeInstanceOf(KvmError);
    const shape = (e: unknown) => {
      const k = e as KvmError;
      return { kind: k.kind, details: k.details, ioctl: k.ioctl, errno: k.errno, code: k.code, message: k.message };
    };
    expect(shape(batchedError)).toEqual(shape(singleError));
    expect((batchedError as KvmError).ioctl).toBe('KVM_GET_MSRS');
    expect(batchedSeen).toEqual(batchedEquivalent(singleSeen));
    expect(batchedSeen).toContain(`KVM_GET_MSRS:${(batchedError as KvmError).code}`);
  });

  it("GetState's reused buffers: each read gives what a fresh read gives, and follows the vCPU's changes between reads", () => {
    const first = readStateBytesReused(vcpu, ctx, []);
    expect(withoutTsc(first)).toEqual(withoutTsc(readStateBytes(vcpu, ctx, [])));
    const firstRegs = Buffer.from(first.values.regs as Buffer);
    const regs = vcpu.getRegs();
    regs.rax = 0x0102030405060708n;
    vcpu.setRegs(regs);
    const second = readStateBytesReused(vcpu, ctx, []);
    // The same buffers, read again: the second read's values replace the first's.
    expect((second.values.regs as Buffer).buffer).toBe((first.values.regs as Buffer).buffer);
    expect((second.values.regs as Buffer).readBigUInt64LE(0)).toBe(0x0102030405060708n);
    expect(firstRegs.readBigUInt64LE(0)).toBe(0x1122334455667788n);
    expect(withoutTsc(second)).toEqual(withoutTsc(readStateBytes(vcpu, ctx, [])));
  });

  it('reused reads skip refused MSRs as fresh ones do, every time, and keep one set of buffers per section list', () => {
    const indices = [0x174, 0xdeadbeef, 0x175];
    for (let i = 0; i < 3; i++) {
      const r = readStateBytesReused(vcpu, ctx, ['msrs', 'regs'], indices);
      expect(r).toEqual(readStateBytes(vcpu, ctx, ['msrs', 'regs'], indices));
      expect(r.msrsUnreadable).toEqual([0xdeadbeef]);
    }
    const regsOnly = readStateBytesReused(vcpu, ctx, ['regs']);
    const all = readStateBytesReused(vcpu, ctx, []);
    expect((regsOnly.values.regs as Buffer).buffer).not.toBe((all.values.regs as Buffer).buffer);
  });

  /** The response written in the read's native call, beside the encoder's bytes from that same run's values. */
  function both(sections: SectionName[], msrs: number[] | undefined, implicitlyPaused: boolean): { inOne: Buffer; apart: Buffer } {
    const read = reusedRead(vcpu, ctx, sections, msrs)!;
    const inOne = encoder.readResponse(read, implicitlyPaused);
    if (!Buffer.isBuffer(inOne)) throw new Error(`${sections.join(',') || 'all'}: not written in the read's call`);
    const r = read.lastRead();
    return { inOne: Buffer.from(inOne), apart: encoder(r.values, { msrsUnreadable: r.msrsUnreadable }, implicitlyPaused) };
  }

  it('writes the bytes the encoder writes from the same read, for every section list and both implicitly_paused values', () => {
    for (const { sections, msrs } of LISTS)
      for (const implicitlyPaused of [false, true]) {
        const { inOne, apart } = both(sections, msrs, implicitlyPaused);
        expect({ sections, implicitlyPaused, bytes: inOne.toString('hex') }).toEqual({ sections, implicitlyPaused, bytes: apart.toString('hex') });
      }
    // Every section of the full read is in it: the response is the whole state, not a prefix.
    const all = both([], undefined, false).inOne;
    expect(all.length).toBeGreaterThan(4000);
    expect(all.includes(RAX)).toBe(true);
  });

  it('follows the vCPU between reads: each response holds the state as it was when it was read', () => {
    const first = both(['regs'], undefined, false).inOne;
    const regs = vcpu.getRegs();
    regs.rax = 0x0102030405060708n;
    vcpu.setRegs(regs);
    const second = both(['regs'], undefined, false);
    expect(second.inOne.equals(second.apart)).toBe(true);
    expect(second.inOne.equals(first)).toBe(false);
    expect(first.includes(RAX)).toBe(true);
    expect(second.inOne.includes(varint(0x0102030405060708n))).toBe(true);
  });

  it('gives the read instead where the kernel refuses an MSR, as a read apart gives it', () => {
    const indices = [0x174, 0xdeadbeef, 0x175];
    for (let i = 0; i < 2; i++) {
      const r = encoder.readResponse(reusedRead(vcpu, ctx, ['msrs', 'regs'], indices)!, false);
      expect(Buffer.isBuffer(r)).toBe(false);
      expect(r as BytesReadResult).toEqual(readStateBytes(vcpu, ctx, ['msrs', 'regs'], indices));
      expect((r as BytesReadResult).msrsUnreadable).toEqual([0xdeadbeef]);
    }
  });

  it('reports the ioctls it made to the metrics observer, through bound recorders or onIoctl, as a read apart does', () => {
    const heard = (o: (seen: string[]) => IoctlObserver, fn: () => void): string[] => {
      const seen: string[] = [];
      setIoctlObserver(o(seen));
      try {
        fn();
      } finally {
        setIoctlObserver(undefined);
      }
      return seen.sort();
    };
    const plain = (seen: string[]): IoctlObserver => ({ onIoctl: (ioctl) => void seen.push(ioctl), onNegotiationRetry: () => {} });
    const bound = (seen: string[]): IoctlObserver => ({
      ...plain(seen),
      durationRecorder: (ioctl) => (seconds) => {
        expect(seconds).toBeGreaterThan(0);
        seen.push(ioctl);
      },
    });
    readStateBytes(vcpu, ctx, []); // the VM caches its KVM_CHECK_EXTENSION answers on first use
    const apart = heard(plain, () => readStateBytes(vcpu, ctx, []));
    expect(apart.length).toBeGreaterThanOrEqual(10);
    const read = reusedRead(vcpu, ctx, [])!;
    expect(heard(plain, () => encoder.readResponse(read, false))).toEqual(apart);
    expect(heard(bound, () => encoder.readResponse(read, false))).toEqual(apart);
    expect(heard(bound, () => encoder.readResponse(read, false))).toEqual(apart);
  });
});
