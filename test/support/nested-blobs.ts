/**
 * Golden KVM nested-state blobs written straight from the layout table of shared/docs/kvm-nested-state-abi.md and,
 * for the VMCB, from AMD APM vol. 2 appendix B / Linux asm/svm.h. Deliberately imports nothing from src/ffi/nested
 * and hard-codes every offset, so the codec is checked against an independent reading of the ABI.
 */

export const NO_GPA = 0xffff_ffff_ffff_ffffn; // -1 as u64

type Width = 1 | 2 | 4 | 8;

function put(buf: Buffer, offset: number, width: Width, value: number | bigint): void {
  if (width === 8) buf.writeBigUInt64LE(BigInt(value), offset);
  else if (width === 4)
    buf.writeUInt32LE(Number(value) >>> 0, offset); // bit 31 set via | is negative
  else if (width === 2) buf.writeUInt16LE(Number(value), offset);
  else buf.writeUInt8(Number(value), offset);
}

/** Deterministic filler so data slices are recognisable and runs are reproducible. */
export function patternBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

export interface VmxSpec {
  flags: number;
  size: number;
  vmxonPa: bigint;
  vmcs12Pa: bigint;
  smmFlags: number;
  hdrFlags: number;
  preemptionTimerDeadline: bigint;
  /** First u32 of the vmcs12 area (written when size >= 4224). */
  vmcs12Header: number;
  /** First u32 of the shadow vmcs12 area (written when size >= 8320). */
  shadowHeader: number;
  /** Buffer length when it should differ from size. */
  length?: number;
}

/** Layout from the doc: flags@0 u16, format@2 u16, size@4 u32, vmxon_pa@8, vmcs12_pa@16, smm.flags@24 u16,
 *  pad@26, flags@28 u32, preemption_timer_deadline@32, reserved 40..127, vmcs12@128, shadow_vmcs12@4224. */
export function buildVmx(spec: VmxSpec): Buffer {
  const len = spec.length ?? spec.size;
  const b = Buffer.alloc(len);
  const fill = patternBytes(len, 0x5eed);
  for (let i = 128; i < len; i++) b[i] = fill[i];
  b.writeUInt16LE(spec.flags, 0);
  b.writeUInt16LE(0, 2);
  b.writeUInt32LE(spec.size, 4);
  b.writeBigUInt64LE(spec.vmxonPa, 8);
  b.writeBigUInt64LE(spec.vmcs12Pa, 16);
  b.writeUInt16LE(spec.smmFlags, 24);
  b.writeUInt32LE(spec.hdrFlags, 28);
  b.writeBigUInt64LE(spec.preemptionTimerDeadline, 32);
  if (len >= 4224) b.writeUInt32LE(spec.vmcs12Header, 128);
  if (len >= 8320) b.writeUInt32LE(spec.shadowHeader, 4224);
  return b;
}

/** VMCB control-area fields: [offset, width] from struct vmcb_control_area. */
export const APM_VMCB_CONTROL = {
  intercept_cr_read: [0x00, 2],
  intercept_cr_write: [0x02, 2],
  intercept_dr_read: [0x04, 2],
  intercept_dr_write: [0x06, 2],
  intercept_exceptions: [0x08, 4],
  intercept_word3: [0x0c, 4],
  intercept_word4: [0x10, 4],
  intercept_word5: [0x14, 4],
  pause_filter_thresh: [0x3c, 2],
  pause_filter_count: [0x3e, 2],
  iopm_base_pa: [0x40, 8],
  msrpm_base_pa: [0x48, 8],
  tsc_offset: [0x50, 8],
  asid: [0x58, 4],
  tlb_ctl: [0x5c, 1],
  int_ctl: [0x60, 4],
  int_vector: [0x64, 4],
  int_state: [0x68, 4],
  exit_code: [0x70, 8],
  exit_info_1: [0x78, 8],
  exit_info_2: [0x80, 8],
  exit_int_info: [0x88, 4],
  exit_int_info_err: [0x8c, 4],
  nested_ctl: [0x90, 8],
  event_inj: [0xa8, 4],
  event_inj_err: [0xac, 4],
  nested_cr3: [0xb0, 8],
  virt_ext: [0xb8, 8],
  clean: [0xc0, 4],
  next_rip: [0xc8, 8],
  insn_len: [0xd0, 1],
} as const satisfies Record<string, readonly [number, Width]>;

/** VMCB save-area fields: [offset from the save area at 0x400, width] from struct vmcb_save_area. */
export const APM_VMCB_SAVE = {
  cpl: [0xcb, 1],
  efer: [0xd0, 8],
  cr4: [0x148, 8],
  cr3: [0x150, 8],
  cr0: [0x158, 8],
  dr7: [0x160, 8],
  dr6: [0x168, 8],
  rflags: [0x170, 8],
  rip: [0x178, 8],
  rsp: [0x1d8, 8],
  rax: [0x1f8, 8],
  star: [0x200, 8],
  lstar: [0x208, 8],
  cstar: [0x210, 8],
  sfmask: [0x218, 8],
  kernel_gs_base: [0x220, 8],
  sysenter_cs: [0x228, 8],
  sysenter_esp: [0x230, 8],
  sysenter_eip: [0x238, 8],
  cr2: [0x240, 8],
  g_pat: [0x268, 8],
} as const satisfies Record<string, readonly [number, Width]>;

/** Ten struct vmcb_seg of 16 bytes (selector u16, attrib u16, limit u32, base u64) at save-area offset 0. */
export const APM_VMCB_SEGMENTS = ['es', 'cs', 'ss', 'ds', 'fs', 'gs', 'gdtr', 'ldtr', 'idtr', 'tr'] as const;

export type VmcbControlName = keyof typeof APM_VMCB_CONTROL;
export type VmcbSaveName = keyof typeof APM_VMCB_SAVE;
export interface SegmentSpec {
  selector: number;
  attrib: number;
  limit: number;
  base: bigint;
}
export interface VmcbSpec {
  control: Partial<Record<VmcbControlName, number | bigint>>;
  save: Partial<Record<VmcbSaveName, number | bigint>>;
  segments: Partial<Record<(typeof APM_VMCB_SEGMENTS)[number], SegmentSpec>>;
}

export function buildVmcb(spec: VmcbSpec): Buffer {
  const b = Buffer.alloc(4096);
  for (const [name, value] of Object.entries(spec.control)) {
    const [offset, width] = APM_VMCB_CONTROL[name as VmcbControlName];
    put(b, offset, width, value);
  }
  for (const [name, value] of Object.entries(spec.save)) {
    const [offset, width] = APM_VMCB_SAVE[name as VmcbSaveName];
    put(b, 0x400 + offset, width, value);
  }
  APM_VMCB_SEGMENTS.forEach((name, i) => {
    const seg = spec.segments[name];
    if (!seg) return;
    const at = 0x400 + i * 16;
    b.writeUInt16LE(seg.selector, at);
    b.writeUInt16LE(seg.attrib, at + 2);
    b.writeUInt32LE(seg.limit, at + 4);
    b.writeBigUInt64LE(seg.base, at + 8);
  });
  return b;
}

export interface SvmSpec {
  flags: number;
  size: number;
  vmcbPa: bigint;
  vmcb?: VmcbSpec;
  length?: number;
}

/** Layout from the doc: flags@0, format@2 (1), size@4, vmcb_pa@8, padding 16..127, vmcb12@128. */
export function buildSvm(spec: SvmSpec): Buffer {
  const b = Buffer.alloc(spec.length ?? spec.size);
  b.writeUInt16LE(spec.flags, 0);
  b.writeUInt16LE(1, 2);
  b.writeUInt32LE(spec.size, 4);
  b.writeBigUInt64LE(spec.vmcbPa, 8);
  if (spec.vmcb && b.length >= 4224) b.set(buildVmcb(spec.vmcb), 128);
  return b;
}

export const VMCS12_REVISION = 0x11e57ed0;
const SHADOW_BIT = 0x8000_0000;

/** Bits used by the specs below, spelled out from the doc / APM rather than imported. */
export const F = { GUEST_MODE: 0x1, RUN_PENDING: 0x2, EVMCS: 0x4, MTF_PENDING: 0x8, GIF_SET: 0x100 } as const;

export const SPECS = {
  vmxVmxonOnly: {
    flags: 0,
    size: 128,
    vmxonPa: 0x10000n,
    vmcs12Pa: NO_GPA,
    smmFlags: 0,
    hdrFlags: 0,
    preemptionTimerDeadline: 0n,
    vmcs12Header: VMCS12_REVISION,
    shadowHeader: (VMCS12_REVISION | SHADOW_BIT) >>> 0,
  },
  vmxCurrentVmcs: {
    flags: 0,
    size: 4224,
    vmxonPa: 0x10000n,
    vmcs12Pa: 0x11000n,
    smmFlags: 0,
    hdrFlags: 0,
    preemptionTimerDeadline: 0n,
    vmcs12Header: VMCS12_REVISION,
    shadowHeader: (VMCS12_REVISION | SHADOW_BIT) >>> 0,
  },
  vmxGuestModeShadow: {
    flags: F.GUEST_MODE,
    size: 8320,
    vmxonPa: 0x10000n,
    vmcs12Pa: 0x11000n,
    smmFlags: 0,
    hdrFlags: 0x1, // PREEMPTION_TIMER_DEADLINE
    preemptionTimerDeadline: 0x0000_1234_5678_9abcn,
    vmcs12Header: VMCS12_REVISION,
    shadowHeader: (VMCS12_REVISION | SHADOW_BIT) >>> 0,
  },
  svmGifOnly: { flags: F.GIF_SET, size: 128, vmcbPa: 0n },
  svmGuestMode: {
    flags: F.GUEST_MODE | F.GIF_SET,
    size: 4224,
    vmcbPa: 0x10000n,
    vmcb: {
      control: {
        intercept_word3: (1 << 18) | (1 << 24) | (1 << 27) | (1 << 28), // CPUID HLT IOIO_PROT MSR_PROT
        intercept_word4: 0x3, // VMRUN VMMCALL
        intercept_exceptions: 1 << 14, // #PF
        asid: 1,
        iopm_base_pa: 0x20000n,
        msrpm_base_pa: 0x24000n,
        int_ctl: (1 << 9) | (1 << 24) | (1 << 25), // V_GIF V_INTR_MASKING V_GIF_ENABLE
        nested_ctl: 1n, // NP_ENABLE
        nested_cr3: 0x30000n,
        tlb_ctl: 1,
      },
      save: {
        efer: 0x1d01n, // SCE LME LMA NXE SVME
        cr0: 0x8005_0033n, // PG AM WP NE ET MP PE
        cr4: 0xa0n, // PAE PGE
        cr3: 0x40000n,
        rflags: 0x2n,
        rip: 0xffff_ffff_8100_0000n,
        rsp: 0xffff_c900_0000_8000n,
        rax: 0x1234n,
        dr6: 0xffff_0ff0n,
        dr7: 0x400n,
        g_pat: 0x0007_0406_0007_0406n,
      },
      segments: {
        cs: { selector: 0x10, attrib: 0x29b, limit: 0xffff_ffff, base: 0n },
        ss: { selector: 0x18, attrib: 0xc93, limit: 0xffff_ffff, base: 0n },
      },
    },
  },
} as const satisfies {
  vmxVmxonOnly: VmxSpec;
  vmxCurrentVmcs: VmxSpec;
  vmxGuestModeShadow: VmxSpec;
  svmGifOnly: SvmSpec;
  svmGuestMode: SvmSpec;
};

export const GOLDEN = {
  vmxVmxonOnly: () => buildVmx(SPECS.vmxVmxonOnly),
  vmxCurrentVmcs: () => buildVmx(SPECS.vmxCurrentVmcs),
  vmxGuestModeShadow: () => buildVmx(SPECS.vmxGuestModeShadow),
  svmGifOnly: () => buildSvm(SPECS.svmGifOnly),
  svmGuestMode: () => buildSvm(SPECS.svmGuestMode),
};

export const vmx = (over: Partial<VmxSpec> = {}): Buffer => buildVmx({ ...SPECS.vmxCurrentVmcs, ...over });

/** The guest-mode SVM golden blob with header, control and save overrides. */
export function svm(over: Partial<Omit<SvmSpec, 'vmcb'>> = {}, control: VmcbSpec['control'] = {}, save: VmcbSpec['save'] = {}): Buffer {
  const base = SPECS.svmGuestMode;
  return buildSvm({
    ...base,
    ...over,
    vmcb: {
      control: { ...base.vmcb.control, ...control },
      save: { ...base.vmcb.save, ...save },
      segments: base.vmcb.segments,
    },
  });
}
