/**
 * src/ffi/sections: the layout tables against the C compiler's view of this machine's KVM headers,
 * and byte-exact round trips of every section.
 */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import * as S from '../../src/ffi/sections';

const ROOT = path.resolve(__dirname, '../..');
const LAYOUT_C = path.join(ROOT, 'test/support/kvm_layout.c');
const HEADERS = ['/usr/include/linux/kvm.h', '/usr/include/x86_64-linux-gnu/asm/kvm.h', '/usr/include/x86_64-linux-gnu/asm/kvm_para.h'];

interface CLayout {
  structs: Record<string, { size: number; fields: Record<string, [offset: number, size: number]> }>;
  constants: Record<string, number>;
}

/** Compiles and runs test/support/kvm_layout.c, cached by the source's and headers' contents. */
function compileAndRunLayoutProgram(): CLayout {
  const hash = createHash('sha256').update(fs.readFileSync(LAYOUT_C));
  for (const h of HEADERS) if (fs.existsSync(h)) hash.update(fs.readFileSync(h));
  const dir = path.join(ROOT, '.cache');
  const bin = path.join(dir, `kvm_layout-${hash.digest('hex').slice(0, 16)}`);
  if (!fs.existsSync(bin)) {
    fs.mkdirSync(dir, { recursive: true });
    const tmp = `${bin}.${process.pid}.tmp`;
    execFileSync('cc', ['-std=gnu11', '-Wall', '-Wextra', '-Werror', '-o', tmp, LAYOUT_C], { stdio: 'pipe' });
    fs.renameSync(tmp, bin); // atomic: parallel workers never run a half-written binary
  }
  return JSON.parse(execFileSync(bin, { encoding: 'utf8' })) as CLayout;
}

const C = compileAndRunLayoutProgram();

// ---- walking layouts ----

type Key = string | number;
interface Node {
  path: string; // C member path, as kvm_layout.c prints it: "cs.base", "xcrs[0].value"
  keys: Key[]; // where the value sits in the decoded object
  offset: number;
  type: S.FieldType;
}

/** Every field and sub-field; arrays contribute element [0] only, or every element with `all`. */
function flatten(fields: readonly S.Field[], all: boolean, base = 0, prefix = '', keys: Key[] = []): Node[] {
  return fields.flatMap((f) =>
    expand({ path: prefix ? `${prefix}.${f.cName}` : f.cName, keys: [...keys, f.name], offset: base + f.offset, type: f.type }, all),
  );
}

function expand(n: Node, all: boolean): Node[] {
  const t = n.type;
  if (t.kind === 'struct') return [n, ...flatten(t.layout.fields, all, n.offset, n.path, n.keys)];
  if (t.kind !== 'array') return [n];
  const count = all ? t.count : 1;
  const elems = Array.from({ length: count }, (_, i) =>
    expand({ path: `${n.path}[${i}]`, keys: [...n.keys, i], offset: n.offset + i * t.of.size, type: t.of }, all),
  );
  return [n, ...elems.flat()];
}

function listNodes(l: S.ListCodec<unknown>): Node[] {
  const entries = { path: `${l.entriesName}[0]`, keys: [], offset: l.header.size, type: l.entry };
  return [...flatten(l.header.fields, false), ...expand(entries, false)];
}

const isLeaf = (t: S.FieldType): boolean => t.kind !== 'struct' && t.kind !== 'array' && t.kind !== 'reserved';

function getAt(obj: unknown, keys: Key[]): unknown {
  return keys.reduce<unknown>((o, k) => (o as Record<Key, unknown>)[k], obj);
}
function setAt(obj: unknown, keys: Key[], v: unknown): void {
  (getAt(obj, keys.slice(0, -1)) as Record<Key, unknown>)[keys[keys.length - 1]] = v;
}

/** The value with every bit inverted, so every byte of the field changes. */
function invert(v: unknown, t: S.FieldType): unknown {
  if (t.kind === 'u64') return (v as bigint) ^ 0xffff_ffff_ffff_ffffn;
  if (t.kind === 'bytes') return Buffer.from((v as Buffer).map((b) => b ^ 0xff));
  return ((v as number) ^ (2 ** (8 * t.size) - 1)) >>> 0;
}

function randomValue(t: S.FieldType): unknown {
  switch (t.kind) {
    case 'u8':
    case 'u16':
    case 'u32':
      return randomBytes(t.size).readUIntLE(0, t.size);
    case 'u64':
      return randomBytes(8).readBigUInt64LE(0);
    case 'bytes':
      return randomBytes(t.size);
    case 'reserved':
      return undefined;
    case 'struct':
      return Object.fromEntries(t.layout.fields.filter((f) => f.type.kind !== 'reserved').map((f) => [f.name, randomValue(f.type)]));
    case 'array':
      return Array.from({ length: t.count }, () => randomValue(t.of));
  }
}

/** Byte offsets at which two equal-length buffers differ. */
function diffOffsets(a: Buffer, b: Buffer): number[] {
  return [...a.keys()].filter((i) => a[i] !== b[i]);
}
const range = (from: number, size: number): number[] => Array.from({ length: size }, (_, i) => from + i);

// ---- the tables under test ----

/** Every fixed-size struct layout that mirrors a C struct. */
const C_LAYOUTS: S.Layout<unknown>[] = [
  S.REGS_LAYOUT,
  S.SEGMENT_LAYOUT,
  S.DTABLE_LAYOUT,
  S.SREGS_LAYOUT,
  S.SREGS2_LAYOUT,
  S.FPU_LAYOUT,
  S.XCR_LAYOUT,
  S.XCRS_LAYOUT,
  S.MSR_ENTRY_LAYOUT,
  S.VCPU_EVENTS_LAYOUT,
  S.DEBUGREGS_LAYOUT,
  S.MP_STATE_LAYOUT,
  S.CPUID_ENTRY2_LAYOUT,
];
/** The counted lists; their headers (kvm_msrs, kvm_cpuid2, kvm_msr_list) are checked with them. */
const LISTS: S.ListCodec<unknown>[] = [S.MSRS, S.MSR_INDEX_LIST, S.CPUID2];

describe('ABI: layouts equal the C compiler on this machine', () => {
  function expectMatchesC(name: string, size: number, nodes: Node[]): void {
    const c = C.structs[name];
    expect(c).toBeDefined();
    expect({ name, size }).toEqual({ name, size: c.size });
    for (const n of nodes) expect([name, n.path, c.fields[n.path]]).toEqual([name, n.path, [n.offset, n.type.size]]);
    // The converse: every C member is described (inside a reserved span counts).
    const reservedPaths = nodes.filter((n) => n.type.kind === 'reserved').map((n) => n.path);
    const described = new Set(nodes.map((n) => n.path));
    const missing = Object.keys(c.fields).filter((p) => !described.has(p) && !reservedPaths.some((r) => p.startsWith(`${r}[`) || p.startsWith(`${r}.`)));
    expect([name, missing]).toEqual([name, []]);
  }

  test.each(C_LAYOUTS.map((l) => [l.name, l] as const))('%s', (_, layout) => {
    expectMatchesC(layout.name, layout.size, flatten(layout.fields, false));
    // Every byte belongs to exactly one field (none of these structs has implicit padding).
    const sorted = [...layout.fields].sort((a, b) => a.offset - b.offset);
    let end = 0;
    for (const f of sorted) {
      expect([f.name, f.offset]).toEqual([f.name, end]);
      end += f.type.size;
    }
    expect(end).toBe(layout.size);
  });

  test.each(LISTS.map((l) => [l.name, l] as const))('%s (header + flexible array)', (_, l) => {
    expectMatchesC(l.name, l.size, listNodes(l));
  });

  test('the event sub-structs and the sregs2 pdptrs are among the checked paths', () => {
    const paths = flatten(S.VCPU_EVENTS_LAYOUT.fields, false).map((n) => n.path);
    const expected = [
      'exception.error_code',
      'interrupt.shadow',
      'nmi.masked',
      'smi.latched_init',
      'triple_fault.pending',
      'reserved',
      'exception_has_payload',
      'exception_payload',
    ];
    expect(paths).toEqual(expect.arrayContaining(expected));
    const sregs2 = flatten(S.SREGS2_LAYOUT.fields, false).map((n) => n.path);
    expect(sregs2).toEqual(expect.arrayContaining(['flags', 'pdptrs', 'pdptrs[0]']));
  });

  test('raw sections: kvm_lapic_state and kvm_xsave sizes', () => {
    expect(S.LAPIC.size).toBe(C.structs.kvm_lapic_state.size);
    expect(S.XSAVE.size).toBe(C.structs.kvm_xsave.size);
    expect(C.structs.kvm_xsave.fields['extra[0]'][0]).toBe(S.XSAVE.size); // XSAVE2's extra bytes start there
  });

  test('every registered section is one of the checked structs (tsc_khz is by value)', () => {
    const checked = new Map<string, number>([...C_LAYOUTS, ...LISTS, S.LAPIC, S.XSAVE].map((c) => [c.name, c.size]));
    for (const name of S.SECTION_NAMES) {
      if (name === 'tsc_khz') continue;
      expect([name, checked.get(S.SECTIONS[name].name)]).toEqual([name, S.SECTIONS[name].size]);
    }
  });

  test('constants equal the headers', () => {
    const k = C.constants;
    expect(S.KVM_NR_INTERRUPTS).toBe(k.KVM_NR_INTERRUPTS);
    expect(S.KVM_MAX_XCRS).toBe(k.KVM_MAX_XCRS);
    expect(S.KVM_APIC_REG_SIZE).toBe(k.KVM_APIC_REG_SIZE);
    expect(S.KVM_SREGS2_FLAGS_PDPTRS_VALID).toBe(BigInt(k.KVM_SREGS2_FLAGS_PDPTRS_VALID));
    for (const [n, v] of Object.entries(S.KVM_MP_STATE)) expect([n, v]).toEqual([n, k[`KVM_MP_STATE_${n}`]]);
    expect(Object.keys(S.KVM_MP_STATE).length).toBe(Object.keys(k).filter((n) => n.startsWith('KVM_MP_STATE_')).length);
    for (const [n, v] of Object.entries(S.KVM_VCPUEVENT_VALID)) expect([n, v]).toEqual([n, k[`KVM_VCPUEVENT_VALID_${n}`]]);
    for (const [n, v] of Object.entries(S.KVM_X86_SHADOW_INT)) expect([n, v]).toEqual([n, k[`KVM_X86_SHADOW_INT_${n}`]]);
    for (const [n, v] of Object.entries(S.KVM_CPUID_FLAG)) {
      const cName = `KVM_CPUID_FLAG_${n === 'SIGNIFICANT_INDEX' ? 'SIGNIFCANT_INDEX' : n}`; // sic, in the header
      expect([n, v]).toEqual([n, k[cName]]);
    }
  });

  test('the KVM paravirtual MSR names and indices equal <asm/kvm_para.h>', () => {
    const fromHeader = Object.entries(C.constants).filter(([n]) => n.startsWith('MSR_KVM_'));
    expect(fromHeader.length).toBe(11);
    for (const [cName, index] of fromHeader) expect([cName, S.msrName(index)]).toEqual([cName, cName.slice('MSR_'.length)]);
    const ours = Object.entries(S.MSR).filter(([n]) => n.startsWith('KVM_'));
    expect(ours.length).toBe(fromHeader.length);
  });
});

// ---- round trips ----

const TYPICAL = {
  regs: {
    ...{ rax: 1n, rbx: 2n, rcx: 3n, rdx: 0x600n, rsi: 0n, rdi: 0n, rsp: 0x7000n, rbp: 0n },
    ...{ r8: 8n, r9: 9n, r10: 10n, r11: 11n, r12: 12n, r13: 13n, r14: 14n, r15: 0xffff_ffff_ffff_ffffn },
    ...{ rip: 0xfff0n, rflags: 0x2n },
  },
  sregs: (() => {
    // Real-mode segments as after reset.
    const seg = (selector: number, type: number) => ({
      ...{ base: BigInt(selector) << 4n, limit: 0xffff, selector, type },
      ...{ present: 1, dpl: 0, db: 0, s: 1, l: 0, g: 0, avl: 0, unusable: 0 },
    });
    return {
      cs: { ...seg(0xf000, 11), base: 0xffff0000n },
      ds: seg(0, 3),
      es: seg(0, 3),
      fs: seg(0, 3),
      gs: seg(0, 3),
      ss: seg(0, 3),
      tr: { ...seg(0, 11), s: 0 },
      ldt: { ...seg(0, 2), s: 0 },
      gdt: { base: 0n, limit: 0xffff },
      idt: { base: 0n, limit: 0xffff },
      cr0: 0x60000010n,
      cr2: 0n,
      cr3: 0n,
      cr4: 0n,
      cr8: 0n,
      efer: 0n,
      apicBase: 0xfee00900n,
      interruptBitmap: [0n, 1n << 32n, 0n, 0n],
    };
  })(),
  fpu: {
    fpr: Array.from({ length: 8 }, (_, i) => Buffer.alloc(16, i)),
    fcw: 0x37f,
    fsw: 0,
    ftwx: 0,
    lastOpcode: 0,
    lastIp: 0n,
    lastDp: 0n,
    xmm: Array.from({ length: 16 }, (_, i) => Buffer.alloc(16, 0x10 + i)),
    mxcsr: 0x1f80,
  },
  xcrs: {
    nrXcrs: 1,
    flags: 0,
    xcrs: Array.from({ length: S.KVM_MAX_XCRS }, (_, i) => ({ xcr: 0, value: i === 0 ? 0x7n : 0n })),
  },
  vcpu_events: {
    exception: { injected: 0, nr: 14, hasErrorCode: 1, pending: 1, errorCode: 2 },
    interrupt: { injected: 1, nr: 0x20, soft: 0, shadow: S.KVM_X86_SHADOW_INT.STI },
    nmi: { injected: 0, pending: 1, masked: 0 },
    sipiVector: 0x9f,
    flags: S.KVM_VCPUEVENT_VALID.NMI_PENDING | S.KVM_VCPUEVENT_VALID.PAYLOAD,
    smi: { smm: 0, pending: 0, smmInsideNmi: 0, latchedInit: 1 },
    tripleFault: { pending: 0 },
    exceptionHasPayload: 1,
    exceptionPayload: 0xdead_b000n,
  },
  debugregs: { db: [0x1000n, 0n, 0n, 0n], dr6: 0xffff0ff0n, dr7: 0x400n, flags: 0n },
  mp_state: { mpState: S.KVM_MP_STATE.HALTED },
  tsc_khz: 2_400_000,
};
const { interruptBitmap: _bitmap, ...SREGS_COMMON } = TYPICAL.sregs;
const TYPICAL_SREGS2 = { ...SREGS_COMMON, flags: S.KVM_SREGS2_FLAGS_PDPTRS_VALID, pdptrs: [0x1001n, 0x2001n, 0x3001n, 0x4001n] };

describe('round trips', () => {
  const FIXED = S.SECTION_NAMES.filter((n) => S.SECTIONS[n].fixedSize);

  test.each(FIXED)('%s: encode(decode(bytes), bytes) gives the same bytes', (name) => {
    const codec = S.SECTIONS[name] as S.Section<unknown>;
    for (let i = 0; i < 20; i++) {
      const buf = randomBytes(codec.size);
      expect(codec.encode(codec.decode(buf), buf)).toEqual(buf);
    }
  });

  test.each(C_LAYOUTS.map((l) => [l.name, l] as const))('%s: without a base only reserved bytes are lost (zeroed)', (_, layout) => {
    const buf = randomBytes(layout.size);
    const expected = Buffer.from(buf);
    for (const n of flatten(layout.fields, true)) if (n.type.kind === 'reserved') expected.fill(0, n.offset, n.offset + n.type.size);
    expect(layout.encode(layout.decode(buf))).toEqual(expected);
  });

  test.each(C_LAYOUTS.map((l) => [l.name, l] as const))('%s: changing one field changes exactly its bytes', (_, layout) => {
    const buf = randomBytes(layout.size);
    const leaves = flatten(layout.fields, true).filter((n) => isLeaf(n.type));
    expect(leaves.length).toBeGreaterThan(0);
    for (const n of leaves) {
      const value = layout.decode(buf);
      setAt(value, n.keys, invert(getAt(value, n.keys), n.type));
      expect([n.path, diffOffsets(buf, layout.encode(value, buf))]).toEqual([n.path, range(n.offset, n.type.size)]);
    }
  });

  test.each(C_LAYOUTS.map((l) => [l.name, l] as const))('%s: decode(encode(random object)) deep-equals it', (_, layout) => {
    const value = randomValue(S.nested(layout));
    expect(layout.decode(layout.encode(value))).toStrictEqual(value);
  });

  test.each([
    ['regs', TYPICAL.regs],
    ['sregs', TYPICAL.sregs],
    ['sregs2', TYPICAL_SREGS2],
    ['fpu', TYPICAL.fpu],
    ['xcrs', TYPICAL.xcrs],
    ['vcpu_events', TYPICAL.vcpu_events],
    ['debugregs', TYPICAL.debugregs],
    ['mp_state', TYPICAL.mp_state],
    ['tsc_khz', TYPICAL.tsc_khz],
  ] as const)('%s: decode(encode(typical value)) deep-equals it', (name, value) => {
    const codec = S.SECTIONS[name] as S.Section<unknown>;
    const bytes = codec.encode(value);
    expect(bytes.length).toBe(codec.size);
    expect(codec.decode(bytes)).toStrictEqual(value);
  });

  test('typical values land at the header offsets', () => {
    const regs = S.encodeRegs(TYPICAL.regs);
    expect(regs.readBigUInt64LE(128)).toBe(0xfff0n); // rip
    expect(regs.readBigUInt64LE(120)).toBe(0xffff_ffff_ffff_ffffn); // r15
    const sregs = S.encodeSregs(TYPICAL.sregs);
    expect(sregs.readBigUInt64LE(0)).toBe(0xffff0000n); // cs.base
    expect(sregs.readUInt16LE(12)).toBe(0xf000); // cs.selector
    expect(sregs.readBigUInt64LE(272)).toBe(0xfee00900n); // apic_base
    expect(sregs.readBigUInt64LE(288)).toBe(1n << 32n); // interrupt_bitmap[1]
    const sregs2 = S.encodeSregs2(TYPICAL_SREGS2);
    expect(sregs2.readBigUInt64LE(280)).toBe(1n); // flags
    expect(sregs2.readBigUInt64LE(312)).toBe(0x4001n); // pdptrs[3]
    const ev = S.encodeVcpuEvents(TYPICAL.vcpu_events);
    expect([ev[1], ev[2], ev.readUInt32LE(4)]).toEqual([14, 1, 2]); // exception nr, has_error_code, error_code
    expect(ev[11]).toBe(S.KVM_X86_SHADOW_INT.STI); // interrupt.shadow
    expect(ev.readUInt32LE(16)).toBe(0x9f); // sipi_vector
    expect(ev[27]).toBe(1); // smi.latched_init
    expect(ev[55]).toBe(1); // exception_has_payload
    expect(ev.readBigUInt64LE(56)).toBe(0xdead_b000n);
    expect(S.encodeFpu(TYPICAL.fpu).readUInt32LE(408)).toBe(0x1f80); // mxcsr
    expect(S.encodeTscKhz(2_400_000)).toEqual(Buffer.from([0x00, 0x9f, 0x24, 0x00]));
  });

  test('bad input is refused with the field named', () => {
    expect(() => S.decodeRegs(Buffer.alloc(143))).toThrow(RangeError);
    expect(() => S.encodeRegs(TYPICAL.regs, Buffer.alloc(8))).toThrow(/kvm_regs base/);
    expect(() => S.encodeRegs({ ...TYPICAL.regs, rip: 1 as unknown as bigint })).toThrow(/kvm_regs\.rip: expected a bigint/);
    expect(() => S.encodeRegs({ ...TYPICAL.regs, rip: -1n })).toThrow(/kvm_regs\.rip/);
    expect(() => S.encodeSregs({ ...TYPICAL.sregs, cs: { ...TYPICAL.sregs.cs, dpl: 256 } })).toThrow(/kvm_sregs\.cs\.dpl/);
    const { rax: _rax, ...noRax } = TYPICAL.regs;
    expect(() => S.encodeRegs(noRax as S.Regs)).toThrow(/kvm_regs\.rax: missing/);
    expect(() => S.encodeFpu({ ...TYPICAL.fpu, fpr: TYPICAL.fpu.fpr.slice(1) })).toThrow(/kvm_fpu\.fpr: expected an array of 8/);
    expect(() => S.encodeFpu({ ...TYPICAL.fpu, xmm: [Buffer.alloc(15), ...TYPICAL.fpu.xmm.slice(1)] })).toThrow(/kvm_fpu\.xmm\[0\]/);
  });

  test('decoded Buffers are copies, not views of the input', () => {
    const buf = randomBytes(S.FPU_SIZE);
    const fpu = S.decodeFpu(buf);
    fpu.xmm[0].fill(0);
    expect(S.decodeFpu(buf).xmm[0]).toEqual(buf.subarray(152, 168));
  });
});

describe('variable-length lists', () => {
  const msrEntry = (): S.MsrEntry => randomValue(S.nested(S.MSR_ENTRY_LAYOUT)) as S.MsrEntry;
  const cpuidEntry = (): S.CpuidEntry2 => randomValue(S.nested(S.CPUID_ENTRY2_LAYOUT)) as S.CpuidEntry2;
  const index = (): number => randomBytes(4).readUInt32LE(0);
  const cases: [string, S.ListCodec<unknown>, () => unknown, number, number][] = [
    ['kvm_msrs', S.MSRS, msrEntry, 8, 16],
    ['kvm_cpuid2', S.CPUID2, cpuidEntry, 8, 40],
    ['kvm_msr_list', S.MSR_INDEX_LIST, index, 4, 4],
  ];

  describe.each(cases)('%s', (_, codec, make, header, entrySize) => {
    test.each([0, 1, 100])('%i entries: count header, size and round trip', (n) => {
      const entries = Array.from({ length: n }, make);
      const buf = codec.encode(entries);
      expect(buf.length).toBe(header + n * entrySize);
      expect(codec.sizeFor(n)).toBe(buf.length);
      expect(buf.readUInt32LE(0)).toBe(n);
      expect(codec.decode(buf)).toStrictEqual(entries);
    });

    test.each([0, 1, 100])('%i entries: reserved bytes round-trip over a base', (n) => {
      const buf = randomBytes(codec.sizeFor(n));
      buf.writeUInt32LE(n, 0);
      expect(codec.encode(codec.decode(buf), buf)).toEqual(buf);
    });

    test('spare capacity after the counted entries is ignored', () => {
      const entries = Array.from({ length: 3 }, make);
      const filled = Buffer.concat([codec.encode(entries), randomBytes(5 * entrySize)]);
      expect(codec.decode(filled)).toStrictEqual(entries);
    });

    test('a count larger than the buffer is refused', () => {
      const buf = codec.encode([make(), make()]);
      buf.writeUInt32LE(3, 0);
      expect(() => codec.decode(buf)).toThrow(RangeError);
      expect(() => codec.decode(Buffer.alloc(header - 1))).toThrow(RangeError);
    });
  });

  test('exact bytes of one MSR entry and one CPUID entry', () => {
    expect(S.encodeMsrs([{ index: 0xc0000080, data: 0x1122334455667788n }]).toString('hex')).toBe(
      '01000000' + '00000000' + '800000c0' + '00000000' + '8877665544332211',
    );
    const cpuid = S.encodeCpuid2([{ function: 0xd, index: 1, flags: S.KVM_CPUID_FLAG.SIGNIFICANT_INDEX, eax: 0xa, ebx: 0xb, ecx: 0xc, edx: 0xe }]);
    expect(cpuid.toString('hex')).toBe(`0100000000000000${['0d', '01', '01', '0a', '0b', '0c', '0e'].map((b) => `${b}000000`).join('')}${'00'.repeat(12)}`);
    expect(S.encodeMsrIndexList([0x10, 0x1b]).toString('hex')).toBe('02000000' + '10000000' + '1b000000');
    expect(S.decodeMsrIndexList(Buffer.from('0200000010000000' + '1b000000', 'hex'))).toEqual([0x10, 0x1b]);
  });
});

describe('raw sections', () => {
  test('lapic: bytes kept exactly, inspect reads the registers', () => {
    const page = randomBytes(S.LAPIC_SIZE);
    const put = (off: number, v: number) => page.writeUInt32LE(v, off);
    put(0x20, 0x03000000);
    put(0x30, 0x00050014);
    put(0x80, 0x10);
    put(0xd0, 0x01000000);
    put(0xf0, 0x1ff);
    put(0x100, 0x1);
    put(0x200, 0x2);
    put(0x320, 0x000200ec);
    put(0x380, 1000);
    put(0x390, 500);
    put(0x3e0, 0xb);
    expect(S.encodeLapic(S.decodeLapic(page))).toEqual(page);
    expect(S.inspectLapic(page)).toStrictEqual({
      apicId: 3,
      idRegister: 0x03000000,
      version: 0x00050014,
      tpr: 0x10,
      ldr: 0x01000000,
      svr: 0x1ff,
      isr0: 1,
      irr0: 2,
      lvtTimer: 0x000200ec,
      tmict: 1000,
      tmcct: 500,
      tdcr: 0xb,
    });
    expect(() => S.decodeLapic(Buffer.alloc(1023))).toThrow(RangeError);
    expect(() => S.encodeLapic(Buffer.alloc(1025))).toThrow(RangeError);
  });

  test.each([4096, 4096 + 8192])('xsave of %i bytes: kept exactly, inspect reads the legacy region and header', (size) => {
    const area = randomBytes(size);
    area.writeUInt16LE(0x37f, 0);
    area.writeUInt16LE(0x3800, 2);
    area.writeUInt32LE(0x1f80, 24);
    area.writeBigUInt64LE(0x60007n, 512);
    area.writeBigUInt64LE(0n, 520);
    expect(S.encodeXsave(S.decodeXsave(area))).toEqual(area);
    expect(S.inspectXsave(area)).toStrictEqual({ fcw: 0x37f, fsw: 0x3800, mxcsr: 0x1f80, xstateBv: 0x60007n, xcompBv: 0n });
  });

  test('xsave shorter than 4096 bytes is refused', () => {
    expect(() => S.decodeXsave(Buffer.alloc(4095))).toThrow(RangeError);
  });

  test('the decoded value is a copy', () => {
    const page = randomBytes(S.LAPIC_SIZE);
    const value = S.decodeLapic(page);
    value.fill(0);
    expect(page.equals(Buffer.alloc(S.LAPIC_SIZE))).toBe(false);
  });
});

describe('registry', () => {
  test('SECTION_NAMES lists every section once, in registry order', () => {
    expect(Object.keys(S.SECTIONS)).toEqual([...S.SECTION_NAMES]);
    expect(new Set(S.SECTION_NAMES).size).toBe(13);
    for (const n of S.SECTION_NAMES) expect(S.SECTIONS[n].section).toBe(n);
  });

  test('lapic and xsave are raw with an inspector; the rest are decoded', () => {
    const raw = S.SECTION_NAMES.filter((n) => S.SECTIONS[n].kind === 'raw');
    expect(raw.sort()).toEqual(['lapic', 'xsave']);
    for (const n of raw) expect(typeof S.SECTIONS[n].inspect).toBe('function');
    expect(S.SECTION_NAMES.filter((n) => !S.SECTIONS[n].fixedSize).sort()).toEqual(['cpuid2', 'msrs', 'xsave']);
  });

  test('lookup by an outside name', () => {
    expect(S.isSectionName('vcpu_events')).toBe(true);
    expect(S.isSectionName('nested_state')).toBe(false);
    expect(S.sectionByName('regs')).toBe(S.SECTIONS.regs);
    expect(S.sectionByName('toString')).toBeUndefined();
  });

  test('tsc_khz is a plain number with a u32 byte form', () => {
    expect(S.SECTIONS.tsc_khz.decode(S.SECTIONS.tsc_khz.encode(1_000_000))).toBe(1_000_000);
    expect(() => S.encodeTscKhz(2 ** 32)).toThrow(/tsc_khz\.khz/);
  });
});

describe('names', () => {
  test('msrName knows the well-known MSRs and falls back to hex', () => {
    const expected: Record<number, string> = {
      0x10: 'TSC',
      0x11: 'KVM_WALL_CLOCK',
      0x12: 'KVM_SYSTEM_TIME',
      0x1b: 'APIC_BASE',
      0x3a: 'FEATURE_CONTROL',
      0x174: 'SYSENTER_CS',
      0x175: 'SYSENTER_ESP',
      0x176: 'SYSENTER_EIP',
      0x1a0: 'MISC_ENABLE',
      0x277: 'PAT',
      0x6e0: 'TSC_DEADLINE',
      0xc0000080: 'EFER',
      0xc0000081: 'STAR',
      0xc0000082: 'LSTAR',
      0xc0000083: 'CSTAR',
      0xc0000084: 'SFMASK',
      0xc0000100: 'FS_BASE',
      0xc0000101: 'GS_BASE',
      0xc0000102: 'KERNEL_GS_BASE',
      0xc0000103: 'TSC_AUX',
      0xc0010114: 'VM_CR',
      0xc0010117: 'VM_HSAVE_PA',
      0x4b564d05: 'KVM_POLL_CONTROL',
    };
    for (const [index, name] of Object.entries(expected)) expect(S.msrName(Number(index))).toBe(name);
    expect(S.msrName(0xc0010015)).toBe('0xc0010015');
    expect(S.MSR_NAMES.size).toBe(Object.keys(S.MSR).length); // no index named twice
  });

  test('mpStateName', () => {
    expect(S.mpStateName(0)).toBe('RUNNABLE');
    expect(S.mpStateName(3)).toBe('HALTED');
    expect(S.mpStateName(99)).toBe('0x63');
  });
});
