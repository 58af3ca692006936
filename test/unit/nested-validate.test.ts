import { NESTED_RULE_IDS, NESTED_RULES, validateNestedState, validateNestedStructure, type NestedRuleId, type NestedTarget } from '../../src/ffi/nested';
import { F, GOLDEN, NO_GPA, svm, vmx, buildSvm, SPECS } from '../support/nested-blobs';

const INTEL: NestedTarget = {
  vendor: 'intel',
  maxSize: 8320,
  maxPhysAddrBits: 46,
  guestHasVmx: true,
  inSmm: false,
  evmcsEnabled: false,
};
const AMD: NestedTarget = {
  vendor: 'amd',
  maxSize: 4224,
  maxPhysAddrBits: 48,
  guestHasSvm: true,
  efer: 0x1d01n, // SCE LME LMA NXE SVME
  cr0: 0x8005_0033n,
  inSmm: false,
  hostHasNpt: true,
};
const intel = (over: Partial<NestedTarget> = {}): NestedTarget => ({ ...INTEL, ...over });
const amd = (over: Partial<NestedTarget> = {}): NestedTarget => ({ ...AMD, ...over });

type Case = [blob: Buffer, target: NestedTarget];
interface RuleCase {
  rule: NestedRuleId;
  field: string;
  pass: Case;
  fail: Case;
}

const vmxonOnly = (over: Parameters<typeof vmx>[0] = {}) => vmx({ size: 128, vmcs12Pa: NO_GPA, ...over });
const noVmxon = (over: Parameters<typeof vmx>[0] = {}) => vmxonOnly({ vmxonPa: NO_GPA, ...over });
const header128 = (size: number) => {
  const b = GOLDEN.vmxVmxonOnly();
  b.writeUInt32LE(size, 4);
  return b;
};

const CASES: RuleCase[] = [
  { rule: 'common.header.length', field: 'blob', pass: [GOLDEN.vmxVmxonOnly(), INTEL], fail: [GOLDEN.vmxVmxonOnly().subarray(0, 64), INTEL] },
  { rule: 'common.size.min', field: 'size', pass: [header128(128), INTEL], fail: [header128(100), INTEL] },
  { rule: 'common.flags.known', field: 'flags', pass: [vmx({ flags: F.EVMCS }), intel({ evmcsEnabled: true })], fail: [vmx({ flags: 0x10 }), INTEL] },
  {
    rule: 'common.run_pending.requires_guest_mode',
    field: 'flags',
    pass: [vmx({ size: 8320, flags: F.GUEST_MODE | F.RUN_PENDING }), INTEL],
    fail: [vmx({ flags: F.RUN_PENDING }), INTEL],
  },
  { rule: 'common.size.buffer', field: 'size', pass: [GOLDEN.vmxCurrentVmcs(), INTEL], fail: [vmxonOnly({ length: 200 }), INTEL] },
  { rule: 'size.max', field: 'size', pass: [GOLDEN.vmxGuestModeShadow(), INTEL], fail: [GOLDEN.vmxGuestModeShadow(), intel({ maxSize: 4224 })] },
  { rule: 'format.matches_vendor', field: 'format', pass: [GOLDEN.svmGuestMode(), AMD], fail: [GOLDEN.svmGuestMode(), intel()] },
  { rule: 'vmx.no_vmxon.smm_flags', field: 'hdr.vmx.smm.flags', pass: [noVmxon(), INTEL], fail: [noVmxon({ smmFlags: 0x2 }), intel({ inSmm: true })] },
  { rule: 'vmx.no_vmxon.vmcs12_pa', field: 'hdr.vmx.vmcs12_pa', pass: [noVmxon(), INTEL], fail: [noVmxon({ vmcs12Pa: 0x11000n }), INTEL] },
  // EVMCS alone is accepted without VMXON for backward compatibility
  {
    rule: 'vmx.no_vmxon.flags',
    field: 'flags',
    pass: [noVmxon({ flags: F.EVMCS }), intel({ evmcsEnabled: true })],
    fail: [noVmxon({ flags: F.GUEST_MODE }), INTEL],
  },
  { rule: 'vmx.guest_cpuid', field: 'hdr.vmx.vmxon_pa', pass: [noVmxon(), intel({ guestHasVmx: false })], fail: [vmxonOnly(), intel({ guestHasVmx: false })] },
  { rule: 'vmx.vmxon_pa.aligned', field: 'hdr.vmx.vmxon_pa', pass: [vmxonOnly({ vmxonPa: 0x7f000n }), INTEL], fail: [vmxonOnly({ vmxonPa: 0x10010n }), INTEL] },
  {
    rule: 'vmx.vmxon_pa.maxphyaddr',
    field: 'hdr.vmx.vmxon_pa',
    pass: [vmxonOnly({ vmxonPa: (1n << 46n) - 0x1000n }), INTEL],
    fail: [vmxonOnly({ vmxonPa: 1n << 46n }), INTEL],
  },
  {
    rule: 'vmx.smm.guest_mode',
    field: 'hdr.vmx.smm.flags',
    pass: [vmx({ smmFlags: 0x3 }), intel({ inSmm: true })],
    fail: [vmx({ size: 8320, flags: F.GUEST_MODE, smmFlags: 0x3 }), intel({ inSmm: true })],
  },
  {
    rule: 'vmx.smm.flags_known',
    field: 'hdr.vmx.smm.flags',
    pass: [vmx({ smmFlags: 0x2 }), intel({ inSmm: true })],
    fail: [vmx({ smmFlags: 0x6 }), intel({ inSmm: true })],
  },
  { rule: 'vmx.hdr_flags', field: 'hdr.vmx.flags', pass: [vmx({ hdrFlags: 0x1 }), INTEL], fail: [vmx({ hdrFlags: 0x2 }), INTEL] },
  {
    rule: 'vmx.smm.vcpu_state',
    field: 'hdr.vmx.smm.flags',
    pass: [vmx({ smmFlags: 0x2 }), intel({ inSmm: true })],
    fail: [vmx({ smmFlags: 0x2 }), intel({ inSmm: false })],
  },
  {
    rule: 'vmx.smm.vmxon_required',
    field: 'hdr.vmx.smm.flags',
    pass: [vmx({ smmFlags: 0x3 }), intel({ inSmm: true })],
    fail: [vmx({ smmFlags: 0x1 }), intel({ inSmm: true })],
  },
  {
    rule: 'vmx.evmcs.enabled',
    field: 'flags',
    pass: [vmx({ flags: F.EVMCS }), intel({ evmcsEnabled: true })],
    fail: [vmx({ flags: F.EVMCS }), intel({ evmcsEnabled: false })],
  },
  { rule: 'vmx.size.vmcs12', field: 'size', pass: [vmxonOnly(), INTEL], fail: [vmxonOnly({ vmcs12Pa: 0x11000n }), INTEL] },
  {
    rule: 'vmx.vmcs12_pa.required',
    field: 'hdr.vmx.vmcs12_pa',
    pass: [vmx({ vmcs12Pa: NO_GPA, flags: F.EVMCS }), intel({ evmcsEnabled: true })],
    fail: [vmx({ vmcs12Pa: NO_GPA }), INTEL],
  },
  { rule: 'vmx.vmcs12_pa.vmxon', field: 'hdr.vmx.vmcs12_pa', pass: [GOLDEN.vmxCurrentVmcs(), INTEL], fail: [vmx({ vmcs12Pa: 0x10000n }), INTEL] },
  { rule: 'vmx.vmcs12_pa.aligned', field: 'hdr.vmx.vmcs12_pa', pass: [vmx({ vmcs12Pa: 0x3fff_f000n }), INTEL], fail: [vmx({ vmcs12Pa: 0x11008n }), INTEL] },
  { rule: 'vmx.vmcs12_pa.maxphyaddr', field: 'hdr.vmx.vmcs12_pa', pass: [vmx({ vmcs12Pa: 1n << 45n }), INTEL], fail: [vmx({ vmcs12Pa: 1n << 50n }), INTEL] },
  // KVM compares revision_id:31, so the shadow_vmcs bit does not matter here
  {
    rule: 'vmx.vmcs12_revision',
    field: 'data.vmcs12.revision_id',
    pass: [vmx({ vmcs12Header: 0x91e57ed0 }), INTEL],
    fail: [vmx({ vmcs12Header: 0x12345678 }), INTEL],
  },
  { rule: 'svm.flags.allowed', field: 'flags', pass: [GOLDEN.svmGuestMode(), AMD], fail: [svm({ flags: F.GUEST_MODE | F.GIF_SET | F.MTF_PENDING }), AMD] },
  {
    rule: 'svm.guest_cpuid',
    field: 'flags',
    pass: [GOLDEN.svmGifOnly(), amd({ guestHasSvm: false })],
    fail: [GOLDEN.svmGuestMode(), amd({ guestHasSvm: false })],
  },
  {
    rule: 'svm.efer_svme',
    field: 'flags',
    pass: [buildSvm({ ...SPECS.svmGifOnly, flags: 0 }), amd({ efer: 0xd01n })],
    fail: [GOLDEN.svmGuestMode(), amd({ efer: 0xd01n })],
  },
  { rule: 'svm.smm.guest_mode', field: 'flags', pass: [GOLDEN.svmGifOnly(), amd({ inSmm: true })], fail: [GOLDEN.svmGuestMode(), amd({ inSmm: true })] },
  // outside guest mode KVM ignores vmcb_pa
  {
    rule: 'svm.vmcb_pa.aligned',
    field: 'hdr.svm.vmcb_pa',
    pass: [buildSvm({ ...SPECS.svmGifOnly, vmcbPa: 0x10800n }), AMD],
    fail: [svm({ vmcbPa: 0x10800n }), AMD],
  },
  { rule: 'svm.vmcb_pa.maxphyaddr', field: 'hdr.svm.vmcb_pa', pass: [svm({ vmcbPa: (1n << 48n) - 0x1000n }), AMD], fail: [svm({ vmcbPa: 1n << 48n }), AMD] },
  { rule: 'svm.size.guest_mode', field: 'size', pass: [GOLDEN.svmGuestMode(), AMD], fail: [svm({ size: 128 }), AMD] },
  {
    rule: 'svm.vmcb12.vmrun_intercept',
    field: 'data.vmcb12.control.intercept_word4',
    pass: [svm({}, { intercept_word4: 0x1 }), AMD],
    fail: [svm({}, { intercept_word4: 0x2 }), AMD],
  },
  { rule: 'svm.vmcb12.asid', field: 'data.vmcb12.control.asid', pass: [svm({}, { asid: 0xffff_ffff }), AMD], fail: [svm({}, { asid: 0 }), AMD] },
  {
    rule: 'svm.vmcb12.np_supported',
    field: 'data.vmcb12.control.nested_ctl',
    pass: [svm({}, { nested_ctl: 0n }), amd({ hostHasNpt: false })],
    fail: [svm({}, { nested_ctl: 1n }), amd({ hostHasNpt: false })],
  },
  // bits 11:0 are ignored, so the map is checked from the next page boundary
  {
    rule: 'svm.vmcb12.msrpm_pa',
    field: 'data.vmcb12.control.msrpm_base_pa',
    pass: [svm({}, { msrpm_base_pa: 0xffff_ffff_d000n }), AMD],
    fail: [svm({}, { msrpm_base_pa: 0xffff_ffff_e001n }), AMD],
  },
  {
    rule: 'svm.vmcb12.iopm_pa',
    field: 'data.vmcb12.control.iopm_base_pa',
    pass: [svm({}, { iopm_base_pa: 0xffff_ffff_d000n }), AMD],
    fail: [svm({}, { iopm_base_pa: 0xffff_ffff_e000n }), AMD],
  },
  {
    rule: 'svm.l2_cr0.cd_nw',
    field: 'target.cr0',
    pass: [GOLDEN.svmGuestMode(), amd({ cr0: 0xe000_0011n })],
    fail: [GOLDEN.svmGuestMode(), amd({ cr0: 0xa000_0011n })],
  },
  { rule: 'svm.vmcb12.save.cr0_pg_pe', field: 'data.vmcb12.save.cr0', pass: [GOLDEN.svmGuestMode(), AMD], fail: [svm({}, {}, { cr0: 0x8000_0010n }), AMD] },
  {
    rule: 'svm.vmcb12.save.rflags_vm',
    field: 'data.vmcb12.save.rflags',
    pass: [svm({}, {}, { rflags: 0x3002n }), AMD],
    fail: [svm({}, {}, { rflags: 0x2_0002n }), AMD],
  },
  { rule: 'svm.vmcb12.save.efer_svme', field: 'data.vmcb12.save.efer', pass: [GOLDEN.svmGuestMode(), AMD], fail: [svm({}, {}, { efer: 0xd01n }), AMD] },
  {
    rule: 'svm.vmcb12.save.cr0_cd_nw',
    field: 'data.vmcb12.save.cr0',
    pass: [svm({}, {}, { cr0: 0xe005_0033n }), AMD],
    fail: [svm({}, {}, { cr0: 0xa005_0033n }), AMD],
  },
  { rule: 'svm.vmcb12.save.cr0_high', field: 'data.vmcb12.save.cr0', pass: [GOLDEN.svmGuestMode(), AMD], fail: [svm({}, {}, { cr0: 0x1_8005_0033n }), AMD] },
  {
    rule: 'svm.vmcb12.save.dr6',
    field: 'data.vmcb12.save.dr6',
    pass: [svm({}, {}, { dr6: 0xffff_ffffn }), AMD],
    fail: [svm({}, {}, { dr6: 0x1_ffff_0ff0n }), AMD],
  },
  {
    rule: 'svm.vmcb12.save.dr7',
    field: 'data.vmcb12.save.dr7',
    pass: [svm({}, {}, { dr7: 0xffff_ffffn }), AMD],
    fail: [svm({}, {}, { dr7: 0x1_0000_0400n }), AMD],
  },
  // legacy paging (LME clear) does not need PAE
  {
    rule: 'svm.vmcb12.save.long_mode_pae',
    field: 'data.vmcb12.save.cr4',
    pass: [svm({}, {}, { efer: 0x1001n, cr4: 0x80n }), AMD],
    fail: [svm({}, {}, { cr4: 0x80n }), AMD],
  },
  {
    rule: 'svm.vmcb12.save.cr3_maxphyaddr',
    field: 'data.vmcb12.save.cr3',
    pass: [svm({}, {}, { efer: 0x1001n, cr4: 0x80n, cr3: 1n << 48n }), AMD],
    fail: [svm({}, {}, { cr3: 1n << 48n }), AMD],
  },
  {
    rule: 'svm.vmcb12.save.cr4_reserved',
    field: 'data.vmcb12.save.cr4',
    pass: [svm({}, {}, { cr4: 0x10f7_3fffn }), AMD],
    fail: [svm({}, {}, { cr4: 0xa0n | (1n << 14n) }), AMD],
  },
  {
    rule: 'svm.vmcb12.save.cr4_vmxe',
    field: 'data.vmcb12.save.cr4',
    pass: [svm({}, {}, { cr4: 0x20n | (1n << 13n) }), amd({ guestHasVmx: true })],
    fail: [svm({}, {}, { cr4: 0x20n | (1n << 13n) }), amd({ guestHasVmx: false })],
  },
  {
    rule: 'svm.vmcb12.save.efer_reserved',
    field: 'data.vmcb12.save.efer',
    pass: [svm({}, {}, { efer: 0x20_fd01n }), AMD],
    fail: [svm({}, {}, { efer: 0x1d03n }), AMD],
  },
];

describe('rule table', () => {
  test('ids are unique, dotted, described, and every one has a case below', () => {
    expect(new Set(NESTED_RULE_IDS).size).toBe(NESTED_RULE_IDS.length);
    for (const r of NESTED_RULES) {
      expect(r.id).toMatch(/^[a-z0-9_]+(\.[a-z0-9_]+)+$/);
      expect(r.description.length).toBeGreaterThan(10);
    }
    expect(CASES.map((c) => c.rule)).toEqual(NESTED_RULE_IDS);
  });
});

describe('golden blobs are clean on their own host', () => {
  test.each([
    ['vmxVmxonOnly', INTEL],
    ['vmxCurrentVmcs', INTEL],
    ['vmxGuestModeShadow', INTEL],
    ['svmGifOnly', AMD],
    ['svmGuestMode', AMD],
  ] as const)('%s', (name, target) => {
    expect(validateNestedState(GOLDEN[name](), target)).toEqual([]);
  });
});

describe.each(CASES)('$rule', ({ rule, field, pass, fail }) => {
  test('passes', () => {
    expect(validateNestedState(...pass)).toEqual([]);
  });
  test('fails', () => {
    const violations = validateNestedState(...fail);
    const hit = violations.find((v) => v.rule === rule);
    expect(hit).toMatchObject({ rule, field });
    expect(hit?.message).toMatch(/\S{3,}/);
  });
});

describe('reporting', () => {
  test('a blob breaking several rules reports all of them, in rule order', () => {
    const blob = svm({ vmcbPa: 0x10800n, length: 4300 }, { asid: 0, intercept_word4: 0 }, { rflags: 0x2_0002n, dr7: 1n << 40n });
    const rules = validateNestedState(blob, amd({ cr0: 0x2000_0011n })).map((v) => v.rule);
    expect(rules).toEqual([
      'common.size.buffer',
      'svm.vmcb_pa.aligned',
      'svm.vmcb12.vmrun_intercept',
      'svm.vmcb12.asid',
      'svm.l2_cr0.cd_nw',
      'svm.vmcb12.save.rflags_vm',
      'svm.vmcb12.save.dr7',
    ]);
  });

  test('VMX header problems are all reported', () => {
    const blob = noVmxon({ smmFlags: 0x5, vmcs12Pa: 0x11000n, flags: F.GUEST_MODE | F.RUN_PENDING | 0x20, hdrFlags: 0x4 });
    const rules = validateNestedState(blob, intel({ inSmm: false })).map((v) => v.rule);
    expect(rules).toEqual([
      'common.flags.known',
      'vmx.no_vmxon.smm_flags',
      'vmx.no_vmxon.vmcs12_pa',
      'vmx.no_vmxon.flags',
      'vmx.smm.guest_mode',
      'vmx.smm.flags_known',
      'vmx.hdr_flags',
      'vmx.smm.vcpu_state',
      'vmx.smm.vmxon_required',
    ]);
  });

  test('the SMM state rule names the field at fault', () => {
    const inSmm = validateNestedState(vmx({ size: 8320, flags: F.GUEST_MODE }), intel({ inSmm: true }));
    expect(inSmm).toContainEqual(expect.objectContaining({ rule: 'vmx.smm.vcpu_state', field: 'flags' }));
  });

  test('messages carry the actual and allowed values', () => {
    const [flags] = validateNestedState(vmx({ flags: 0x10 }), INTEL);
    expect(flags.message).toBe('flags 0x10 has UNKNOWN_0x10 outside {GUEST_MODE 0x1, RUN_PENDING 0x2, EVMCS 0x4, MTF_PENDING 0x8, GIF_SET 0x100}');
    const [max] = validateNestedState(GOLDEN.svmGifOnly(), amd({ maxSize: 0 }));
    expect(max.message).toMatch(/size 128 exceeds .* 0 .*no nested support/);
    const pa = validateNestedState(svm({ vmcbPa: 1n << 48n }), AMD)[0];
    expect(pa.message).toBe('vmcb_pa 0x1000000000000 is beyond the guest MAXPHYADDR of 48 bits (must be < 0x1000000000000)');
  });

  test('the wrong vendor stops at the format rule', () => {
    expect(validateNestedState(svm({}, { asid: 0 }), INTEL).map((v) => v.rule)).toEqual(['format.matches_vendor']);
  });

  test('unknown target facts skip their rules instead of guessing', () => {
    const bare: NestedTarget = { vendor: 'amd', maxSize: 4224, maxPhysAddrBits: 48 };
    expect(validateNestedState(svm({}, { nested_ctl: 1n }), bare)).toEqual([]);
  });

  test('tiny and truncated blobs are reported, not thrown', () => {
    expect(validateNestedState(Buffer.alloc(4), INTEL)).toEqual([expect.objectContaining({ rule: 'common.header.length', field: 'blob' })]);
    const truncated = GOLDEN.svmGuestMode().subarray(0, 2000);
    expect(validateNestedState(truncated, AMD).map((v) => v.rule)).toEqual(['common.size.buffer']);
  });
});

describe('structural rules (checked even when validation is skipped)', () => {
  test('the header and the size field against the buffer, named as validateNestedState names them', () => {
    const truncated = GOLDEN.svmGuestMode().subarray(0, 2000);
    for (const blob of [Buffer.alloc(4), GOLDEN.vmxVmxonOnly().subarray(0, 127), truncated])
      expect(validateNestedStructure(blob)).toEqual(
        validateNestedState(blob, AMD).filter((v) => ['common.header.length', 'common.size.buffer'].includes(v.rule)),
      );
  });

  test('a blob longer than its size field, or with semantic faults, passes: the kernel judges those', () => {
    expect(validateNestedStructure(header128(64))).toEqual([]);
    expect(validateNestedStructure(vmxonOnly({ length: 200 }))).toEqual([]);
    expect(validateNestedStructure(vmx({ flags: 0x10 }))).toEqual([]);
  });
});
