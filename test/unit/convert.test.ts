/**
 * src/server/convert/state + scalars: section enum mapping, VcpuState round trips from random section bytes
 * (through the protobuf wire format too), and every validation rule naming its field.
 */
import { randomBytes } from 'node:crypto';
import type * as protoLoader from '@grpc/proto-loader';
import { VcpudError } from '../../src/errors';
import * as S from '../../src/ffi/sections';
import { safeNumber, sectionFromProto, sectionsFromProto, sectionToProto, stateFromProto, stateToProto, u64 } from '../../src/server/convert';
import { vcpudPackageDefinition } from '../../src/api/proto';
import { allRandom, randomValue } from '../support/random-state';
import type { GetStateResponse__Output } from '../../src/api/generated/vcpud/v1/GetStateResponse';
import type { VcpuState__Output } from '../../src/api/generated/vcpud/v1/VcpuState';

/** The package definition the server itself loads (src/api/proto.ts). */
const definition = vcpudPackageDefinition();
const getState = (definition['vcpud.v1.VcpuStateService'] as protoLoader.ServiceDefinition).GetState;

/** stateToProto's output as a client would send it back: encoded and decoded by proto-loader. */
function throughWire(values: Partial<S.SectionValues>, msrsUnreadable?: number[]): VcpuState__Output {
  const bytes = getState.responseSerialize({ state: stateToProto(values, { msrsUnreadable }) });
  return (getState.responseDeserialize(bytes) as GetStateResponse__Output).state!;
}

const snakeToCamel = (s: string) => s.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** The error fn throws, which must be an invalid_argument VcpudError. */
function invalid(fn: () => unknown): VcpudError {
  try {
    fn();
  } catch (e) {
    expect(e).toBeInstanceOf(VcpudError);
    expect((e as VcpudError).kind).toBe('invalid_argument');
    return e as VcpudError;
  }
  throw new Error('expected invalid_argument, nothing was thrown');
}
const fieldsOf = (e: VcpudError) => (e.details.violations ?? []).map((v) => v.field).sort();
const rulesOf = (e: VcpudError) => Object.fromEntries((e.details.violations ?? []).map((v) => [v.field, v.rule]));

// ---- StateSection ----

describe('StateSection mapping', () => {
  const stateSectionEnum = (definition['vcpud.v1.StateSection'] as protoLoader.EnumTypeDefinition).type as unknown as {
    value: { name: string; number: number }[];
  };

  test.each(S.SECTION_NAMES.map((n) => [n]))('%s both ways, and its enum number', (name) => {
    const proto = sectionToProto(name);
    expect(proto).toBe(`STATE_SECTION_${name.toUpperCase()}`);
    expect(sectionFromProto(proto)).toBe(name);
    const number = stateSectionEnum.value.find((v) => v.name === proto)?.number;
    expect(number).toBe(S.SECTION_NAMES.indexOf(name) + 1);
    expect(sectionFromProto(number!)).toBe(name); // an enum value proto-loader passes as its number
  });

  test('the 13 sections are exactly the non-UNSPECIFIED enum values', () => {
    const names = stateSectionEnum.value.map((v) => v.name).filter((n) => n !== 'STATE_SECTION_UNSPECIFIED');
    expect(S.SECTION_NAMES.map(sectionToProto).sort()).toEqual(names.sort());
    expect(S.SECTION_NAMES).toHaveLength(13);
  });

  test('the VcpuState field of each section is the lower-case suffix', () => {
    const type = (definition['vcpud.v1.VcpuState'] as protoLoader.MessageTypeDefinition<object, object>).type as unknown as { field: { name: string }[] };
    const fields = type.field.map((f) => f.name);
    expect(fields.sort()).toEqual(S.SECTION_NAMES.map(snakeToCamel).sort()); // proto-loader keys (keepCase false)
  });

  test.each([['STATE_SECTION_UNSPECIFIED'], [0], ['STATE_SECTION_FOO'], ['STATE_SECTION_regs'], ['REGS'], ['regs'], [14], [-1]])(
    '%p is rejected naming the field',
    (bad) => {
      const e = invalid(() => sectionFromProto(bad));
      expect(e.details.violations).toEqual([expect.objectContaining({ rule: 'enum', field: 'sections' })]);
      expect(fieldsOf(invalid(() => sectionFromProto(bad, 'applied')))).toEqual(['applied']);
    },
  );

  test('a list reports every bad entry', () => {
    expect(sectionsFromProto(['STATE_SECTION_MSRS', 'STATE_SECTION_REGS'])).toEqual(['msrs', 'regs']);
    const e = invalid(() => sectionsFromProto(['STATE_SECTION_REGS', 'STATE_SECTION_UNSPECIFIED', 'X']));
    expect(fieldsOf(e)).toEqual(['sections[1]', 'sections[2]']);
  });
});

// ---- round trips ----

describe('VcpuState round trip', () => {
  test.each(S.SECTION_NAMES.map((n) => [n]))('%s from random bytes, with the values as base', (name) => {
    for (let i = 0; i < 25; i++) {
      const v = randomValue(name);
      const values = { [name]: v } as Partial<S.SectionValues>;
      const back = stateFromProto(stateToProto(values) as VcpuState__Output, values);
      expect(Object.keys(back)).toEqual([name]);
      expect(back[name]).toEqual(v);
      const codec = S.SECTIONS[name] as S.Section<unknown>;
      expect(codec.encode(back[name]).equals(codec.encode(v))).toBe(true); // byte-exact
    }
  });

  test('every section at once, through the protobuf wire format', () => {
    for (let i = 0; i < 10; i++) {
      const values = allRandom();
      const wire = throughWire(values, [0x10, 0xc0010015]);
      expect(stateFromProto(wire, values)).toEqual(values);
      expect(wire.msrs!.unreadableIndices).toEqual([0x10, 0xc0010015]);
    }
  });

  test('raw sections are byte-exact, padding and all', () => {
    const values = { xsave: randomBytes(11008), lapic: randomBytes(1024) };
    const back = stateFromProto(throughWire(values), values);
    expect(back.xsave!.equals(values.xsave)).toBe(true);
    expect(back.lapic!.equals(values.lapic)).toBe(true);
  });

  test('without a base, values with 0/1 flags and zeroed unused xcrs survive as they are', () => {
    const v = allRandom();
    const flags = (o: unknown): void => {
      for (const [k, x] of Object.entries(o as Record<string, unknown>)) {
        if (typeof x === 'object' && x !== null && !Buffer.isBuffer(x)) flags(x);
        else if (
          typeof x === 'number' &&
          /^(present|db|s|l|g|avl|unusable|injected|hasErrorCode|pending|soft|masked|smm|smmInsideNmi|latchedInit|exceptionHasPayload)$/.test(k)
        )
          (o as Record<string, number>)[k] = x & 1;
      }
    };
    for (const n of ['sregs', 'sregs2', 'vcpu_events'] as const) flags(v[n]);
    const xcrs = v.xcrs!;
    xcrs.xcrs.forEach((e, i) => {
      if (i >= xcrs.nrXcrs) Object.assign(e, { xcr: 0, value: 0n });
    });
    expect(stateFromProto(throughWire(v))).toEqual(v);
  });

  test('only present sections come back; an empty state is empty', () => {
    const wire = throughWire({ regs: randomValue('regs'), tsc_khz: 2_500_000 });
    expect(Object.keys(stateFromProto(wire))).toEqual(['regs', 'tsc_khz']);
    expect(stateFromProto(throughWire({}))).toEqual({});
  });
});

describe('stateToProto', () => {
  test('u64 as decimal strings (once on the wire), flags as bools, MSR names, mp_state named and numbered', () => {
    const regs = randomValue('regs');
    regs.rax = 0xffff_ffff_ffff_ffffn;
    const p = throughWire({
      regs,
      msrs: [
        { index: 0xc0000080, data: 0x500n },
        { index: 0x12345, data: 1n },
      ],
      mp_state: { mpState: S.KVM_MP_STATE.HALTED },
    });
    expect(p.regs!.rax).toBe('18446744073709551615');
    expect(p.msrs!.entries).toEqual([
      { index: 0xc0000080, data: '1280', name: 'EFER' },
      { index: 0x12345, data: '1', name: '' },
    ]);
    expect(p.msrs!.unreadableIndices).toEqual([]);
    expect(p.mpState).toEqual({ value: 'MP_STATE_HALTED', kvmValue: 3 });
    expect(throughWire({ mp_state: { mpState: 77 } }).mpState).toEqual({ value: 'MP_STATE_UNSPECIFIED', kvmValue: 77 });
  });

  test('raw sections carry their inspection', () => {
    const xsave = Buffer.alloc(4096);
    xsave.writeUInt16LE(0x37f, 0);
    xsave.writeUInt32LE(0x1f80, 24);
    xsave.writeBigUInt64LE(0x7n, 512);
    xsave.writeBigUInt64LE(1n << 63n, 520);
    const lapic = Buffer.alloc(1024);
    for (const [off, v] of [
      [0x20, 0x0300_0000],
      [0x30, 0x50014],
      [0x80, 0x10],
      [0xd0, 0x1000000],
      [0xf0, 0x1ff],
      [0x320, 0x400ef],
      [0x380, 1000],
      [0x390, 500],
      [0x3e0, 0xb],
    ])
      lapic.writeUInt32LE(v, off);
    const p = throughWire({ xsave, lapic });
    expect(p.xsave).toEqual({ raw: xsave, xstateBv: '7', xcompBv: '9223372036854775808', mxcsr: 0x1f80, fcw: 0x37f });
    expect(p.lapic).toEqual({
      raw: lapic,
      apicId: 3,
      version: 0x50014,
      tpr: 0x10,
      svr: 0x1ff,
      ldr: 0x1000000,
      lvtTimer: 0x400ef,
      timerInitialCount: 1000,
      timerCurrentCount: 500,
      timerDivide: 0xb,
    });
    expect(stateToProto({ xsave }).xsave!.raw).not.toBe(xsave); // a copy
  });

  test('xcrs lists the nr_xcrs meaningful entries', () => {
    const x = randomValue('xcrs');
    x.nrXcrs = 1;
    const p = throughWire({ xcrs: x });
    expect(p.xcrs).toEqual({ flags: x.flags, xcrs: [{ xcr: x.xcrs[0].xcr, value: x.xcrs[0].value.toString() }] });
  });

  test('every field of every message is filled', () => {
    const p = stateToProto(allRandom()) as Record<string, Record<string, unknown>>;
    type Descriptor = { field: { name: string }[]; nestedType: (Descriptor & { name: string })[] };
    const messageFields = (type: string) => {
      const [top, nested] = type.split('.');
      let d = (definition[`vcpud.v1.${top}`] as protoLoader.MessageTypeDefinition<object, object>).type as unknown as Descriptor;
      if (nested) d = d.nestedType.find((t) => t.name === nested)!;
      return d.field.map((f) => f.name).sort();
    };
    const TYPES: Record<string, string> = {
      regs: 'Regs',
      sregs: 'Sregs',
      sregs2: 'Sregs2',
      fpu: 'Fpu',
      xsave: 'Xsave',
      xcrs: 'Xcrs',
      msrs: 'Msrs',
      lapic: 'Lapic',
      vcpuEvents: 'VcpuEvents',
      debugregs: 'DebugRegs',
      mpState: 'VcpuMpState',
      cpuid2: 'Cpuid',
      tscKhz: 'TscKhz',
    };
    for (const [key, type] of Object.entries(TYPES)) expect([key, Object.keys(p[key]).sort()]).toEqual([key, messageFields(type)]);
    const ev = p.vcpuEvents as Record<string, Record<string, unknown>>;
    expect(Object.keys(ev.exception).sort()).toEqual(messageFields('VcpuEvents.Exception'));
    expect(Object.keys((p.sregs as Record<string, object>).cs).sort()).toEqual(messageFields('Segment'));
  });
});

// ---- base and absent sub-messages ----

describe('fields the proto does not carry', () => {
  test('an unset sub-message comes from the base, or is zero', () => {
    const base = randomValue('sregs');
    const p = throughWire({ sregs: base });
    p.sregs!.cs = null;
    p.sregs!.gdt = null;
    expect(stateFromProto(p, { sregs: base }).sregs).toEqual(base);
    const zero = stateFromProto(p).sregs!;
    expect(zero.cs).toEqual({ base: 0n, limit: 0, selector: 0, type: 0, present: 0, dpl: 0, db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0 });
    expect(zero.gdt).toEqual({ base: 0n, limit: 0 });
  });

  test('a set flag keeps a non-zero base byte; a cleared one is 0; without a base 1', () => {
    const base = randomValue('sregs');
    base.cs.present = 0x80;
    base.cs.g = 0x7;
    const p = throughWire({ sregs: base });
    p.sregs!.cs!.g = false;
    const back = stateFromProto(p, { sregs: base }).sregs!;
    expect([back.cs.present, back.cs.g]).toEqual([0x80, 0]);
    expect(stateFromProto(p).sregs!.cs.present).toBe(1);
  });

  test('xcrs entries beyond the listed ones come from the base', () => {
    const base = randomValue('xcrs');
    base.nrXcrs = 3;
    const p = throughWire({ xcrs: base });
    p.xcrs!.xcrs = p.xcrs!.xcrs.slice(0, 1);
    const back = stateFromProto(p, { xcrs: base }).xcrs!;
    expect(back.nrXcrs).toBe(1);
    expect(back.xcrs).toEqual(base.xcrs);
    const noBase = stateFromProto(p).xcrs!;
    expect(noBase.xcrs.slice(1).every((e) => e.xcr === 0 && e.value === 0n)).toBe(true);
  });

  test('xsave shorter than the base is zero-padded to it; longer is rejected', () => {
    const base = randomBytes(8192);
    const short = randomBytes(4096);
    const back = stateFromProto(throughWire({ xsave: short }), { xsave: base }).xsave!;
    expect(back.length).toBe(8192);
    expect(back.subarray(0, 4096).equals(short)).toBe(true);
    expect(back.subarray(4096).every((b) => b === 0)).toBe(true);
    const e = invalid(() => stateFromProto(throughWire({ xsave: randomBytes(8256) }), { xsave: base }));
    expect(rulesOf(e)).toEqual({ 'state.xsave.raw': 'length' });
    expect(stateFromProto(throughWire({ xsave: randomBytes(8256) })).xsave!.length).toBe(8256); // no base: no upper bound
  });

  test('mp_state: a named value wins over kvm_value; UNSPECIFIED uses kvm_value', () => {
    const p = throughWire({ mp_state: { mpState: 3 } });
    p.mpState!.kvmValue = 9;
    expect(stateFromProto(p).mp_state).toEqual({ mpState: 3 });
    p.mpState!.value = 'MP_STATE_UNSPECIFIED';
    expect(stateFromProto(p).mp_state).toEqual({ mpState: 9 });
  });

  test('the result shares no Buffer with the input or the base', () => {
    const values = { fpu: randomValue('fpu'), lapic: randomBytes(1024) };
    const p = stateToProto(values) as VcpuState__Output;
    const back = stateFromProto(p, values);
    expect(back.lapic).not.toBe(p.lapic!.raw);
    expect(back.fpu!.fpr[0]).not.toBe(p.fpu!.fpr[0]);
  });
});

// ---- validation ----

describe('validation names every bad field', () => {
  const valid = () => throughWire(allRandom());

  type Case = [string, (p: VcpuState__Output) => void, Record<string, string>];
  const cases: Case[] = [
    ['uint64 not decimal', (p) => (p.regs!.rax = 'abc'), { 'state.regs.rax': 'uint64' }],
    ['uint64 hex', (p) => (p.regs!.rip = '0x10'), { 'state.regs.rip': 'uint64' }],
    ['uint64 negative', (p) => (p.regs!.rsp = '-1'), { 'state.regs.rsp': 'uint64' }],
    ['uint64 empty', (p) => (p.sregs!.cr3 = ''), { 'state.sregs.cr3': 'uint64' }],
    ['uint64 2^64', (p) => (p.debugregs!.dr7 = '18446744073709551616'), { 'state.debugregs.dr7': 'uint64' }],
    ['uint64 in a nested message', (p) => (p.sregs2!.gs!.base = '1e3'), { 'state.sregs2.gs.base': 'uint64' }],
    ['uint64 in a list', (p) => (p.debugregs!.db[2] = 'x'), { 'state.debugregs.db[2]': 'uint64' }],
    ['fpr count', (p) => p.fpu!.fpr.pop(), { 'state.fpu.fpr': 'length' }],
    ['fpr entry size', (p) => (p.fpu!.fpr[3] = Buffer.alloc(15)), { 'state.fpu.fpr[3]': 'length' }],
    ['xmm count', (p) => p.fpu!.xmm.push(Buffer.alloc(16)), { 'state.fpu.xmm': 'length' }],
    ['xmm entry size', (p) => (p.fpu!.xmm[15] = Buffer.alloc(17)), { 'state.fpu.xmm[15]': 'length' }],
    ['fcw u16', (p) => (p.fpu!.fcw = 0x10000), { 'state.fpu.fcw': 'uint16' }],
    ['ftwx u8', (p) => (p.fpu!.ftwx = 256), { 'state.fpu.ftwx': 'uint8' }],
    ['last_opcode u16', (p) => (p.fpu!.lastOpcode = 1.5), { 'state.fpu.last_opcode': 'uint16' }],
    ['db count', (p) => p.debugregs!.db.pop(), { 'state.debugregs.db': 'length' }],
    ['interrupt_bitmap count', (p) => p.sregs!.interruptBitmap.push('0'), { 'state.sregs.interrupt_bitmap': 'length' }],
    ['pdptrs count', (p) => (p.sregs2!.pdptrs = ['1', '2', '3']), { 'state.sregs2.pdptrs': 'length' }],
    ['dpl', (p) => (p.sregs!.cs!.dpl = 4), { 'state.sregs.cs.dpl': 'range' }],
    ['type', (p) => (p.sregs!.ss!.type = 16), { 'state.sregs.ss.type': 'range' }],
    ['selector', (p) => (p.sregs2!.ds!.selector = 0x10000), { 'state.sregs2.ds.selector': 'uint16' }],
    ['segment limit', (p) => (p.sregs!.tr!.limit = -1), { 'state.sregs.tr.limit': 'uint32' }],
    ['dtable limit', (p) => (p.sregs!.gdt!.limit = 0x10000), { 'state.sregs.gdt.limit': 'uint16' }],
    ['xsave too short', (p) => (p.xsave!.raw = Buffer.alloc(4095)), { 'state.xsave.raw': 'length' }],
    ['lapic too short', (p) => (p.lapic!.raw = Buffer.alloc(1023)), { 'state.lapic.raw': 'length' }],
    ['lapic too long', (p) => (p.lapic!.raw = Buffer.alloc(1025)), { 'state.lapic.raw': 'length' }],
    ['xcrs at most 16', (p) => (p.xcrs!.xcrs = Array.from({ length: 17 }, () => ({ xcr: 0, value: '1' }))), { 'state.xcrs.xcrs': 'max_items' }],
    ['xcr value', (p) => (p.xcrs!.xcrs = [{ xcr: 0, value: 'z' }]), { 'state.xcrs.xcrs[0].value': 'uint64' }],
    [
      'cpuid u32',
      (p) => (p.cpuid2!.entries = [{ function: 0, index: 0, flags: 0, eax: 2 ** 32, ebx: 0, ecx: 0, edx: -1 }]),
      { 'state.cpuid2.entries[0].eax': 'uint32', 'state.cpuid2.entries[0].edx': 'uint32' },
    ],
    [
      'cpuid at most 256',
      (p) => (p.cpuid2!.entries = Array.from({ length: 257 }, () => ({ function: 0, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0 }))),
      { 'state.cpuid2.entries': 'max_items' },
    ],
    ['msr index', (p) => (p.msrs!.entries = [{ index: 2 ** 32, data: '0', name: '' }]), { 'state.msrs.entries[0].index': 'uint32' }],
    ['exception nr', (p) => (p.vcpuEvents!.exception!.nr = 256), { 'state.vcpu_events.exception.nr': 'uint8' }],
    ['exception payload', (p) => (p.vcpuEvents!.exception!.payload = '?'), { 'state.vcpu_events.exception.payload': 'uint64' }],
    ['interrupt shadow', (p) => (p.vcpuEvents!.interrupt!.shadow = 300), { 'state.vcpu_events.interrupt.shadow': 'uint8' }],
    ['bool', (p) => ((p.vcpuEvents!.nmi as unknown as Record<string, unknown>).masked = 1), { 'state.vcpu_events.nmi.masked': 'bool' }],
    ['mp_state value', (p) => (p.mpState!.value = 'MP_STATE_BOGUS' as 'MP_STATE_HALTED'), { 'state.mp_state.value': 'enum' }],
    ['mp_state kvm_value', (p) => Object.assign(p.mpState!, { value: 'MP_STATE_UNSPECIFIED', kvmValue: -2 }), { 'state.mp_state.kvm_value': 'uint32' }],
    ['tsc_khz', (p) => (p.tscKhz!.khz = 2 ** 32), { 'state.tsc_khz.khz': 'uint32' }],
    ['not a list', (p) => ((p.cpuid2 as unknown as Record<string, unknown>).entries = 'x'), { 'state.cpuid2.entries': 'list' }],
    ['not a list, fixed length', (p) => ((p.fpu as unknown as Record<string, unknown>).xmm = {}), { 'state.fpu.xmm': 'list' }],
    ['bytes type', (p) => ((p.lapic as unknown as Record<string, unknown>).raw = 'AAAA'), { 'state.lapic.raw': 'bytes' }],
  ];

  test.each(cases)('%s', (_name, corrupt, expected) => {
    const p = valid();
    corrupt(p);
    const e = invalid(() => stateFromProto(p));
    expect(rulesOf(e)).toEqual(expected);
    for (const field of Object.keys(expected)) expect(e.message).toContain(`${field}: `);
    for (const v of e.details.violations!) expect(v.message).toMatch(/\S/);
  });

  test('all violations of a request are reported in one error', () => {
    const p = valid();
    for (const [, corrupt] of cases.slice(0, 12)) corrupt(p);
    p.sregs!.cs!.dpl = 7;
    p.tscKhz!.khz = -1;
    const e = invalid(() => stateFromProto(p));
    expect(fieldsOf(e)).toEqual(
      [
        'state.regs.rax',
        'state.regs.rip',
        'state.regs.rsp',
        'state.sregs.cr3',
        'state.debugregs.dr7',
        'state.sregs2.gs.base',
        'state.debugregs.db[2]',
        'state.fpu.fpr',
        'state.fpu.fpr[3]',
        'state.fpu.xmm',
        'state.fpu.xmm[15]',
        'state.fpu.fcw',
        'state.sregs.cs.dpl',
        'state.tsc_khz.khz',
      ].sort(),
    );
    expect(e.message).toMatch(/^14 invalid fields: state\.regs\.rax: /);
  });

  test('the largest values are accepted', () => {
    const p = valid();
    p.regs!.rax = '18446744073709551615';
    p.sregs!.cs!.dpl = 3;
    p.sregs!.cs!.type = 15;
    p.sregs!.cs!.selector = 0xffff;
    p.xcrs!.xcrs = Array.from({ length: 16 }, (_, i) => ({ xcr: i, value: '0' }));
    p.cpuid2!.entries = Array.from({ length: 256 }, () => ({ function: 0, index: 0, flags: 0, eax: 2 ** 32 - 1, ebx: 0, ecx: 0, edx: 0 }));
    const v = stateFromProto(p);
    expect(v.regs!.rax).toBe(2n ** 64n - 1n);
    expect(v.xcrs!.nrXcrs).toBe(16);
    expect(v.cpuid2).toHaveLength(256);
  });

  test('u64 fields accept numbers and Longs from in-process callers', () => {
    const p = valid() as unknown as { regs: Record<string, unknown> };
    p.regs.rax = 42;
    p.regs.rbx = { low: -1, high: -1, unsigned: true };
    p.regs.rcx = 2 ** 53; // not exact as a number
    const e = invalid(() => stateFromProto(p as unknown as VcpuState__Output));
    expect(fieldsOf(e)).toEqual(['state.regs.rcx']);
    p.regs.rcx = '0';
    const v = stateFromProto(p as unknown as VcpuState__Output).regs!;
    expect([v.rax, v.rbx]).toEqual([42n, 2n ** 64n - 1n]);
  });
});

describe('u64 and safeNumber', () => {
  test('parse decimal strings, numbers and Longs', () => {
    expect(u64('18446744073709551615', 'x')).toBe(2n ** 64n - 1n);
    expect(u64(7, 'x')).toBe(7n);
    expect(u64({ low: 1, high: 1, unsigned: true }, 'x')).toBe((1n << 32n) + 1n);
    expect(safeNumber('9007199254740991', 'length')).toBe(Number.MAX_SAFE_INTEGER);
    expect(safeNumber('4096', 'memory_bytes')).toBe(4096);
  });

  test.each([['18446744073709551616'], ['-1'], [' 1'], ['1.0'], ['0x1'], [''], [-1], [0.5]])('u64 rejects %p naming the field', (bad) => {
    const e = invalid(() => u64(bad, 'guest_physical_address'));
    expect(e.details.violations).toEqual([expect.objectContaining({ rule: 'uint64', field: 'guest_physical_address' })]);
    expect(e.message).toMatch(/^guest_physical_address: /);
  });

  test('safeNumber rejects values beyond Number.MAX_SAFE_INTEGER', () => {
    for (const bad of ['9007199254740992', '18446744073709551615', { low: 0, high: 0x200000, unsigned: true }]) {
      const e = invalid(() => safeNumber(bad, 'length'));
      expect(e.details.violations).toEqual([expect.objectContaining({ rule: 'safe_integer', field: 'length' })]);
    }
    expect(fieldsOf(invalid(() => safeNumber('abc', 'memory_bytes')))).toEqual(['memory_bytes']);
  });
});
