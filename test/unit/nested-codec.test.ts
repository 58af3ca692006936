import {
  decodeNestedState,
  decodeVmcb12,
  decodeVmcs12,
  encodeNestedState,
  NestedStateTooShortError,
  VMCB_CONTROL_FIELDS,
  VMCB_SAVE_FIELDS,
  VMCB_SEGMENT_FIELDS,
  type NestedState,
} from '../../src/ffi/nested';
import {
  APM_VMCB_CONTROL,
  APM_VMCB_SAVE,
  APM_VMCB_SEGMENTS,
  buildSvm,
  buildVmcb,
  buildVmx,
  GOLDEN,
  NO_GPA,
  patternBytes,
  SPECS,
  VMCS12_REVISION,
  type VmxSpec,
} from '../support/nested-blobs';

const roundTrip = (blob: Buffer): Buffer => encodeNestedState(decodeNestedState(blob));

/** Indices where two equal-length buffers differ. */
function diffIndices(a: Buffer, b: Buffer): number[] {
  expect(b.length).toBe(a.length);
  const out: number[] = [];
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) out.push(i);
  return out;
}

function expectVmx(s: NestedState, spec: VmxSpec, blob: Buffer): void {
  expect(s.format).toBe('vmx');
  expect(s.flags).toBe(spec.flags);
  expect(s.size).toBe(spec.size);
  expect(s.header).toEqual(blob.subarray(0, 128));
  expect(s.raw).toBe(blob);
  expect(s.svm).toBeUndefined();
  expect(s.vmx).toMatchObject({
    vmxonPa: spec.vmxonPa,
    vmcs12Pa: spec.vmcs12Pa,
    smmFlags: spec.smmFlags,
    hdrFlags: spec.hdrFlags,
    preemptionTimerDeadline: spec.preemptionTimerDeadline,
  });
}

describe('golden blobs decode to what the builder wrote and re-encode byte-identically', () => {
  test('VMX, VMXON only (128 bytes, vmcs12_pa -1)', () => {
    const blob = GOLDEN.vmxVmxonOnly();
    const s = decodeNestedState(blob);
    expectVmx(s, SPECS.vmxVmxonOnly, blob);
    expect(s.vmx?.vmcs12Pa).toBe(NO_GPA);
    expect(s.flagNames).toEqual([]);
    expect(s.data).toEqual({});
    expect(encodeNestedState(s)).toEqual(blob);
  });

  test('VMX, current VMCS (4224 bytes)', () => {
    const blob = GOLDEN.vmxCurrentVmcs();
    const s = decodeNestedState(blob);
    expectVmx(s, SPECS.vmxCurrentVmcs, blob);
    expect(s.data.vmcs12).toEqual(blob.subarray(128, 4224));
    expect(s.data.shadowVmcs12).toBeUndefined();
    expect(decodeVmcs12(s.data.vmcs12!)).toMatchObject({ revisionId: VMCS12_REVISION, shadowVmcs: false });
    expect(encodeNestedState(s)).toEqual(blob);
  });

  test('VMX, guest mode with shadow VMCS and PREEMPTION_TIMER_DEADLINE (8320 bytes)', () => {
    const blob = GOLDEN.vmxGuestModeShadow();
    const s = decodeNestedState(blob);
    expectVmx(s, SPECS.vmxGuestModeShadow, blob);
    expect(s.flagNames).toEqual(['GUEST_MODE']);
    expect(s.vmx?.hdrFlagNames).toEqual(['PREEMPTION_TIMER_DEADLINE']);
    expect(s.vmx?.smmFlagNames).toEqual([]);
    expect(s.data.vmcs12).toEqual(blob.subarray(128, 4224));
    expect(s.data.shadowVmcs12).toEqual(blob.subarray(4224, 8320));
    expect(decodeVmcs12(s.data.shadowVmcs12!)).toMatchObject({
      header: 0x91e57ed0,
      revisionId: VMCS12_REVISION,
      shadowVmcs: true,
    });
    expect(encodeNestedState(s)).toEqual(blob);
  });

  test('SVM, GIF only (128 bytes, vmcb_pa 0)', () => {
    const blob = GOLDEN.svmGifOnly();
    const s = decodeNestedState(blob);
    expect(s).toMatchObject({ format: 'svm', flags: 0x100, flagNames: ['GIF_SET'], size: 128, svm: { vmcbPa: 0n } });
    expect(s.vmx).toBeUndefined();
    expect(s.data).toEqual({});
    expect(encodeNestedState(s)).toEqual(blob);
  });

  test('SVM, guest mode (4224 bytes) with a VMCB12', () => {
    const blob = GOLDEN.svmGuestMode();
    const s = decodeNestedState(blob);
    expect(s).toMatchObject({ format: 'svm', flags: 0x101, flagNames: ['GUEST_MODE', 'GIF_SET'], size: 4224 });
    expect(s.svm).toEqual({ vmcbPa: 0x10000n });
    expect(s.data.vmcb12).toEqual(blob.subarray(128, 4224));
    const vmcb = decodeVmcb12(s.data.vmcb12!);
    const { control, save } = SPECS.svmGuestMode.vmcb;
    expect(vmcb.control).toMatchObject(control);
    expect(vmcb.save).toMatchObject(save);
    expect(vmcb.save.cs).toEqual(SPECS.svmGuestMode.vmcb.segments.cs);
    expect(vmcb.save.ss).toEqual(SPECS.svmGuestMode.vmcb.segments.ss);
    expect(encodeNestedState(s)).toEqual(blob);
  });
});

describe('opaque bytes survive a round trip', () => {
  const cases = Object.entries(GOLDEN);
  test.each(cases)('%s with random reserved header bytes', (name, build) => {
    // VMX: pad 26..27 and reserved 40..127; SVM: padding 16..127 (where newer kernels put gpat).
    const ranges: Array<[number, number]> = name.startsWith('vmx')
      ? [
          [26, 28],
          [40, 128],
        ]
      : [[16, 128]];
    for (const seed of [1, 2, 3]) {
      const blob = build();
      const noise = patternBytes(128, seed * 7919);
      for (const [from, to] of ranges) for (let i = from; i < to; i++) blob[i] = noise[i];
      const s = decodeNestedState(blob);
      expect(s.header).toEqual(blob.subarray(0, 128));
      expect(encodeNestedState(s)).toEqual(blob);
    }
  });

  test('bytes past the declared size and unknown formats are kept', () => {
    const longer = buildSvm({ ...SPECS.svmGifOnly, length: 168 });
    longer.set(patternBytes(40, 9), 128);
    expect(roundTrip(longer)).toEqual(longer);
    const unknown = GOLDEN.vmxCurrentVmcs();
    unknown.writeUInt16LE(7, 2);
    const s = decodeNestedState(unknown);
    expect(s.format).toBe(7);
    expect(s.vmx).toBeUndefined();
    expect(s.data).toEqual({});
    expect(encodeNestedState(s)).toEqual(unknown);
  });

  test('garbage of any length from 8 bytes on decodes without throwing and round-trips', () => {
    const lengths = [8, 9, 15, 16, 17, 39, 40, 41, 127, 128, 129, 4223, 4224, 4225, 8319, 8320, 8321];
    lengths.forEach((length, i) => {
      for (const format of [0, 1, 2, 0xffff]) {
        const blob = patternBytes(length, 1000 + i);
        blob.writeUInt16LE(format, 2);
        // a size pointing at, before and past the buffer end
        for (const size of [length, Math.max(0, length - 1), length + 1, 0xffff_ffff]) {
          blob.writeUInt32LE(size, 4);
          expect(roundTrip(blob)).toEqual(blob);
        }
      }
    });
  });
});

describe('edits', () => {
  test('changing vmcb_pa changes exactly those 8 bytes', () => {
    const blob = GOLDEN.svmGuestMode();
    const s = decodeNestedState(blob);
    s.svm!.vmcbPa = 0xdead_b000n;
    const out = encodeNestedState(s);
    const changed = diffIndices(blob, out);
    expect(changed.length).toBeGreaterThan(0);
    expect(changed.every((i) => i >= 8 && i < 16)).toBe(true);
    expect(out.readBigUInt64LE(8)).toBe(0xdead_b000n);
  });

  test('flags, a VMX header field and a data byte edit only their own bytes', () => {
    const blob = GOLDEN.vmxGuestModeShadow();
    const s = decodeNestedState(blob);
    s.flags |= 0x2; // RUN_PENDING
    s.vmx!.preemptionTimerDeadline = 0n;
    s.data.vmcs12![100] ^= 0xff;
    const changed = diffIndices(blob, encodeNestedState(s));
    expect(changed.filter((i) => i < 2)).toEqual([0]);
    expect(changed.filter((i) => i >= 2 && i < 32)).toEqual([]);
    expect(changed.filter((i) => i >= 32 && i < 40).length).toBeGreaterThan(0);
    expect(changed.filter((i) => i >= 40)).toEqual([128 + 100]);
  });

  test('adding a vmcs12 to VMXON-only state grows the blob', () => {
    const s = decodeNestedState(GOLDEN.vmxVmxonOnly());
    const vmcs12 = Buffer.alloc(4096);
    vmcs12.writeUInt32LE(VMCS12_REVISION, 0);
    s.size = 4224;
    s.vmx!.vmcs12Pa = 0x11000n;
    s.data.vmcs12 = vmcs12;
    expect(encodeNestedState(s)).toEqual(buildVmx({ ...SPECS.vmxCurrentVmcs, length: 4224 }).fill(0, 132));
  });

  test('a data area of the wrong size is refused', () => {
    const s = decodeNestedState(GOLDEN.svmGuestMode());
    s.data.vmcb12 = Buffer.alloc(100);
    expect(() => encodeNestedState(s)).toThrow(RangeError);
  });
});

describe('decoder tolerance', () => {
  test('fewer than 8 bytes is the one typed error', () => {
    for (const length of [0, 1, 7]) {
      let caught: unknown;
      try {
        decodeNestedState(Buffer.alloc(length));
      } catch (e) {
        caught = e;
      }
      expect(caught).toBeInstanceOf(NestedStateTooShortError);
      expect(caught).toMatchObject({ code: 'NESTED_STATE_TOO_SHORT', length });
    }
  });

  test('a truncated header decodes the common fields only', () => {
    const blob = GOLDEN.vmxVmxonOnly().subarray(0, 30);
    const s = decodeNestedState(blob);
    expect(s).toMatchObject({ format: 'vmx', size: 128, flags: 0 });
    expect(s.vmx).toBeUndefined();
    expect(s.header.length).toBe(30);
  });

  test('data areas appear only when both size and buffer cover them', () => {
    const declaredOnly = buildVmx({ ...SPECS.vmxCurrentVmcs, length: 2000 });
    expect(decodeNestedState(declaredOnly).data.vmcs12).toBeUndefined();
    const bufferOnly = buildVmx({ ...SPECS.vmxCurrentVmcs, size: 2000, length: 4224 });
    expect(decodeNestedState(bufferOnly).data.vmcs12).toBeUndefined();
  });

  test('unknown flag bits are named per bit', () => {
    const blob = GOLDEN.svmGifOnly();
    blob.writeUInt16LE(0x1111, 0);
    expect(decodeNestedState(blob).flagNames).toEqual(['GUEST_MODE', 'GIF_SET', 'UNKNOWN_0x10', 'UNKNOWN_0x1000']);
    const vmxBlob = buildVmx({ ...SPECS.vmxVmxonOnly, smmFlags: 0x6, hdrFlags: 0x8000_0001 });
    const { vmx } = decodeNestedState(vmxBlob);
    expect(vmx?.smmFlagNames).toEqual(['SMM_VMXON', 'UNKNOWN_0x4']);
    expect(vmx?.hdrFlagNames).toEqual(['PREEMPTION_TIMER_DEADLINE', 'UNKNOWN_0x80000000']);
  });
});

describe('VMCB12 decoding', () => {
  test('every control field reads back from its APM offset', () => {
    const control = Object.fromEntries(Object.entries(APM_VMCB_CONTROL).map(([name, [offset, width]]) => [name, distinct(offset, width)]));
    const vmcb = decodeVmcb12(buildVmcb({ control, save: {}, segments: {} }));
    for (const [name, value] of Object.entries(control)) {
      expect([name, vmcb.control[name as keyof typeof vmcb.control]]).toEqual([name, value]);
    }
  });

  test('every save field and segment reads back from its APM offset', () => {
    const save = Object.fromEntries(Object.entries(APM_VMCB_SAVE).map(([name, [offset, width]]) => [name, distinct(0x400 + offset, width)]));
    const segments = Object.fromEntries(
      APM_VMCB_SEGMENTS.map((name, i) => [name, { selector: 0x100 + i, attrib: 0x200 + i, limit: 0x1_0000 + i, base: 0x1_0000_0000n + BigInt(i) }]),
    );
    const vmcb = decodeVmcb12(buildVmcb({ control: {}, save, segments }));
    for (const [name, value] of Object.entries(save)) {
      expect([name, vmcb.save[name as keyof typeof APM_VMCB_SAVE]]).toEqual([name, value]);
    }
    for (const [name, seg] of Object.entries(segments)) {
      expect([name, vmcb.save[name as (typeof APM_VMCB_SEGMENTS)[number]]]).toEqual([name, seg]);
    }
  });

  test('named bits', () => {
    const vmcb = decodeVmcb12(
      buildVmcb({
        control: {
          intercept_cr_read: 0x1,
          intercept_cr_write: 0x100,
          intercept_word3: (1 << 18) | (1 << 24) | (1 << 27) | (1 << 28) | (2 ** 31),
          intercept_word4: 0x3,
          intercept_word5: 0x80,
          int_ctl: (1 << 9) | (1 << 25) | 0x5 | (0x3 << 16), // V_GIF, V_GIF_ENABLE, V_TPR 5, V_INTR_PRIO 3
          nested_ctl: 1n,
          virt_ext: 0x3n,
        },
        save: {},
        segments: {},
      }),
    );
    expect(vmcb.controlBits.intercept_cr_read).toEqual(['CR0_READ']);
    expect(vmcb.controlBits.intercept_cr_write).toEqual(['CR8_WRITE']);
    expect(vmcb.controlBits.intercept_word3).toEqual(['CPUID', 'HLT', 'IOIO_PROT', 'MSR_PROT', 'SHUTDOWN']);
    expect(vmcb.controlBits.intercept_word4).toEqual(['VMRUN', 'VMMCALL']);
    expect(vmcb.controlBits.intercept_word5).toEqual(['UNKNOWN_0x80']);
    expect(vmcb.controlBits.int_ctl).toEqual(['V_GIF', 'V_GIF_ENABLE']);
    expect(vmcb.controlBits.nested_ctl).toEqual(['NP_ENABLE']);
    expect(vmcb.controlBits.virt_ext).toEqual(['LBR_VIRTUALIZATION_ENABLE', 'V_VMLOAD_VMSAVE_ENABLE']);
  });

  test('the layout tables have no overlaps and fit their areas', () => {
    const fits = (table: readonly (readonly [string, number, number])[], limit: number) => {
      const sorted = [...table].sort((a, b) => a[1] - b[1]);
      sorted.forEach(([, offset, width], i) => {
        expect(offset % width).toBe(0); // natural alignment, as in the packed C structs
        if (i + 1 < sorted.length) expect(offset + width).toBeLessThanOrEqual(sorted[i + 1][1]);
      });
      const [, lastOffset, lastWidth] = sorted[sorted.length - 1];
      expect(lastOffset + lastWidth).toBeLessThanOrEqual(limit);
    };
    fits(VMCB_CONTROL_FIELDS, 0x400);
    fits(VMCB_SAVE_FIELDS, 744); // sizeof(struct vmcb_save_area)
    fits(VMCB_SEGMENT_FIELDS, 16);
    expect(VMCB_SAVE_FIELDS.find(([n]) => n === 'spec_ctrl')?.[1]).toBe(0x2e0); // svm.h comment anchor
  });

  test('too short a VMCB is a RangeError', () => {
    expect(() => decodeVmcb12(Buffer.alloc(1024))).toThrow(RangeError);
  });
});

test('a guest-mode SVM blob built with a longer buffer keeps its tail', () => {
  const blob = buildSvm({ ...SPECS.svmGuestMode, length: 4300 });
  expect(roundTrip(blob)).toEqual(blob);
  expect(decodeNestedState(blob).data.vmcb12?.length).toBe(4096);
});

/** A value unique to the field and as wide as it, so a wrong offset or width shows up as a mismatch. */
function distinct(offset: number, width: number): number | bigint {
  if (width === 8) return 0x0102_0304_0000_0000n + BigInt(offset);
  if (width === 4) return 0x0a00_0000 + offset;
  if (width === 2) return 0x8000 + offset;
  return (offset % 251) + 1;
}
