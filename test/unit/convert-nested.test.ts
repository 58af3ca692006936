/**
 * src/server/convert/nested: NestedState from the golden blobs of test/support/nested-blobs.ts (built from an
 * independent reading of the ABI), every VmcbControl / VmcbSave field against the APM offsets, raw byte-exact.
 */
import type * as protoLoader from '@grpc/proto-loader';
import { VcpudError } from '../../src/errors';
import { nestedToProto } from '../../src/server/convert';
import { vcpudPackageDefinition } from '../../src/api/proto';
import type { GetNestedStateResponse__Output } from '../../src/api/generated/vcpud/v1/GetNestedStateResponse';
import type { NestedState } from '../../src/api/generated/vcpud/v1/NestedState';
import {
  APM_VMCB_CONTROL,
  APM_VMCB_SAVE,
  APM_VMCB_SEGMENTS,
  buildSvm,
  F,
  GOLDEN,
  NO_GPA,
  SPECS,
  VMCS12_REVISION,
  type VmcbSpec,
} from '../support/nested-blobs';

/** The package definition the server itself loads (src/api/proto.ts). */
const definition = vcpudPackageDefinition();
const getNested = (definition['vcpud.v1.VcpuStateService'] as protoLoader.ServiceDefinition).GetNestedState;
const protoFields = (type: string) =>
  ((definition[`vcpud.v1.${type}`] as protoLoader.MessageTypeDefinition<object, object>).type as unknown as { field: { name: string }[] }).field
    .map((f) => f.name)
    .sort();
const camel = (s: string) => s.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** What a client receives: encoded and decoded by proto-loader. */
function throughWire(n: NestedState): NonNullable<GetNestedStateResponse__Output['nestedState']> {
  return (getNested.responseDeserialize(getNested.responseSerialize({ nestedState: n })) as GetNestedStateResponse__Output).nestedState!;
}

function expectRawExact(blob: Buffer, n: NestedState): void {
  expect(Buffer.compare(n.raw as Buffer, blob)).toBe(0);
  expect(n.raw).not.toBe(blob);
  expect(Buffer.compare(n.header as Buffer, blob.subarray(0, 128))).toBe(0);
}

describe('VMX', () => {
  test('VMXON only (128 bytes): header view, no data', () => {
    const blob = GOLDEN.vmxVmxonOnly();
    const n = throughWire(nestedToProto(blob));
    expectRawExact(blob, n);
    expect(n).toMatchObject({ flags: 0, flagNames: [], format: 'NESTED_FORMAT_VMX', formatValue: 0, size: 128, headerView: 'vmx' });
    expect(n.vmx).toEqual({
      vmxonPa: '65536',
      vmcs12Pa: NO_GPA.toString(),
      smmFlags: 0,
      smmFlagNames: [],
      flags: 0,
      flagNames: [],
      preemptionTimerDeadline: '0',
    });
    expect(n.svm ?? null).toBeNull();
    expect(n.dataView).toBeUndefined();
    expect(n.vmcs12 ?? null).toBeNull();
    expect(n.shadowVmcs12).toBeNull();
  });

  test('current VMCS (4224 bytes): vmcs12, no shadow', () => {
    const blob = GOLDEN.vmxCurrentVmcs();
    const n = throughWire(nestedToProto(blob));
    expectRawExact(blob, n);
    expect(n.size).toBe(4224);
    expect(n.vmx!.vmcs12Pa).toBe(String(0x11000));
    expect(n.dataView).toBe('vmcs12');
    expect(n.vmcs12!.revisionId).toBe(VMCS12_REVISION);
    expect(Buffer.compare(n.vmcs12!.raw, blob.subarray(128, 4224))).toBe(0);
    expect(n.shadowVmcs12).toBeNull();
  });

  test('guest mode with shadow vmcs12 and preemption timer (8320 bytes)', () => {
    const blob = GOLDEN.vmxGuestModeShadow();
    const n = throughWire(nestedToProto(blob));
    expectRawExact(blob, n);
    expect(n).toMatchObject({ flags: F.GUEST_MODE, flagNames: ['GUEST_MODE'], size: 8320 });
    expect(n.vmx).toMatchObject({
      flags: 1,
      flagNames: ['PREEMPTION_TIMER_DEADLINE'],
      preemptionTimerDeadline: SPECS.vmxGuestModeShadow.preemptionTimerDeadline.toString(),
    });
    expect(n.vmcs12!.revisionId).toBe(VMCS12_REVISION);
    // The shadow's first u32 has bit 31 set; revision_id is what KVM compares (bits 30:0), the raw keeps the word.
    expect(n.shadowVmcs12!.revisionId).toBe(VMCS12_REVISION);
    expect(n.shadowVmcs12!.raw.readUInt32LE(0)).toBe(SPECS.vmxGuestModeShadow.shadowHeader);
    expect(Buffer.compare(n.shadowVmcs12!.raw, blob.subarray(4224, 8320))).toBe(0);
  });

  test('flag names for unknown bits and SMM flags', () => {
    const blob = GOLDEN.vmxCurrentVmcs();
    blob.writeUInt16LE(F.RUN_PENDING | F.MTF_PENDING | 0x20, 0);
    blob.writeUInt16LE(0x3, 24);
    blob.writeUInt32LE(0x3, 28);
    const n = nestedToProto(blob);
    expect(n.flagNames).toEqual(['RUN_PENDING', 'MTF_PENDING', 'UNKNOWN_0x20']);
    expect(n.vmx).toMatchObject({ smmFlags: 3, smmFlagNames: ['SMM_GUEST_MODE', 'SMM_VMXON'], flagNames: ['PREEMPTION_TIMER_DEADLINE', 'UNKNOWN_0x2'] });
  });
});

describe('SVM', () => {
  test('GIF only (128 bytes)', () => {
    const blob = GOLDEN.svmGifOnly();
    const n = throughWire(nestedToProto(blob));
    expectRawExact(blob, n);
    expect(n).toMatchObject({ flags: F.GIF_SET, flagNames: ['GIF_SET'], format: 'NESTED_FORMAT_SVM', formatValue: 1, size: 128, headerView: 'svm' });
    expect(n.svm).toEqual({ vmcbPa: '0' });
    expect(n.dataView).toBeUndefined();
    expect(n.shadowVmcs12).toBeNull();
  });

  test('guest mode: the golden VMCB decoded', () => {
    const blob = GOLDEN.svmGuestMode();
    const n = throughWire(nestedToProto(blob));
    expectRawExact(blob, n);
    const spec = SPECS.svmGuestMode;
    expect(n.svm).toEqual({ vmcbPa: String(0x10000) });
    expect(n.dataView).toBe('vmcb12');
    const c = n.vmcb12!.control!;
    expect(c).toMatchObject({
      interceptExceptions: 1 << 14,
      interceptWords: [spec.vmcb.control.intercept_word3, 0x3, 0],
      asid: 1,
      tlbCtl: 1,
      iopmBasePa: '131072',
      msrpmBasePa: '147456',
      intCtl: spec.vmcb.control.int_ctl,
      nestedCtl: '1',
      npEnabled: true,
      nestedCr3: '196608',
    });
    expect(c.intercepts).toEqual(['CPUID', 'HLT', 'IOIO_PROT', 'MSR_PROT', 'VMRUN', 'VMMCALL']);
    const s = n.vmcb12!.save!;
    expect(s).toMatchObject({
      efer: String(0x1d01),
      cr0: String(0x8005_0033),
      cr4: String(0xa0),
      cr3: String(0x40000),
      rip: spec.vmcb.save.rip.toString(),
      rsp: spec.vmcb.save.rsp.toString(),
      gPat: spec.vmcb.save.g_pat.toString(),
    });
    expect(s.cs).toEqual({ selector: 0x10, attrib: 0x29b, limit: 0xffff_ffff, base: '0' });
    expect(s.ss).toEqual({ selector: 0x18, attrib: 0xc93, limit: 0xffff_ffff, base: '0' });
    expect(s.ds).toEqual({ selector: 0, attrib: 0, limit: 0, base: '0' });
  });

  test('every VmcbControl and VmcbSave field, each with a distinct value at its APM offset', () => {
    const control: VmcbSpec['control'] = {};
    const save: VmcbSpec['save'] = {};
    const segments: VmcbSpec['segments'] = {};
    let k = 1;
    const distinct = (width: number) => (width === 8 ? 0x1_0000_0000n * BigInt(k++) + 0x77n : (k++ * 0x1234567) % 2 ** (8 * width));
    for (const [name, [, width]] of Object.entries(APM_VMCB_CONTROL)) control[name as keyof typeof APM_VMCB_CONTROL] = distinct(width);
    for (const [name, [, width]] of Object.entries(APM_VMCB_SAVE)) save[name as keyof typeof APM_VMCB_SAVE] = distinct(width);
    for (const seg of APM_VMCB_SEGMENTS) segments[seg] = { selector: k++, attrib: k++, limit: k++ * 0x10001, base: BigInt(k++) << 40n };
    const blob = buildSvm({ flags: F.GUEST_MODE, size: 4224, vmcbPa: 0x5000n, vmcb: { control, save, segments } });
    const n = throughWire(nestedToProto(blob));
    const c = n.vmcb12!.control! as unknown as Record<string, unknown>;
    const s = n.vmcb12!.save! as unknown as Record<string, unknown>;
    const wire = (v: number | bigint) => (typeof v === 'bigint' ? v.toString() : v);
    const words = ['intercept_word3', 'intercept_word4', 'intercept_word5'] as const;
    for (const [name, v] of Object.entries(control)) {
      if (!(words as readonly string[]).includes(name)) expect([name, c[camel(name)]]).toEqual([name, wire(v)]);
    }
    expect(c.interceptWords).toEqual(words.map((w) => control[w]));
    expect(c.npEnabled).toBe(((control.nested_ctl as bigint) & 1n) === 1n);
    for (const [name, v] of Object.entries(save)) expect([name, s[camel(name)]]).toEqual([name, wire(v)]);
    for (const seg of APM_VMCB_SEGMENTS) {
      const want = segments[seg]!;
      expect([seg, s[seg]]).toEqual([seg, { ...want, base: want.base.toString() }]);
    }
    // Nothing the proto declares is left out.
    expect(Object.keys(c).sort()).toEqual(protoFields('VmcbControl'));
    expect(Object.keys(s).sort()).toEqual(protoFields('VmcbSave'));
  });
});

describe('edge cases', () => {
  test('an unknown format: no header or data view', () => {
    const blob = GOLDEN.vmxCurrentVmcs();
    blob.writeUInt16LE(7, 2);
    const n = throughWire(nestedToProto(blob));
    expect(n).toMatchObject({ format: 'NESTED_FORMAT_UNSPECIFIED', formatValue: 7, size: 4224 });
    expect(n.headerView).toBeUndefined();
    expect(n.dataView).toBeUndefined();
    expectRawExact(blob, n);
  });

  test('size not covering the data: no data view, raw still exact', () => {
    const blob = GOLDEN.svmGuestMode();
    blob.writeUInt32LE(200, 4);
    const n = nestedToProto(blob);
    expect(n.vmcb12).toBeUndefined();
    expect(n.size).toBe(200);
    expectRawExact(blob, n);
  });

  test('fewer than 8 bytes: invalid_argument naming raw', () => {
    try {
      nestedToProto(Buffer.alloc(4));
      throw new Error('no error');
    } catch (e) {
      expect(e).toBeInstanceOf(VcpudError);
      expect((e as VcpudError).kind).toBe('invalid_argument');
      expect((e as VcpudError).details.violations).toEqual([expect.objectContaining({ field: 'raw' })]);
    }
  });
});
