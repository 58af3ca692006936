/**
 * The architectural AMD VMCB carried in an SVM nested-state blob (AMD APM vol. 2 appendix B; Linux
 * arch/x86/include/asm/svm.h struct vmcb_control_area / vmcb_save_area, whose BUILD_BUG_ON offset checks anchor the
 * numbers below). Decoded for inspection and validation only: the blob's bytes stay the truth.
 */
import { bitNames, bitsFromList, cloneBytes, extentOf, readFields, type FieldsOf } from './fields';

export const VMCB_CONTROL_OFFSET = 0x000;
export const VMCB_SAVE_OFFSET = 0x400;

/** Linux names nested_ctl/virt_ext misc_ctl/misc_ctl2 since 6.x; the older names match the APM's usage here. */
export const VMCB_CONTROL_FIELDS = [
  ['intercept_cr_read', 0x000, 2],
  ['intercept_cr_write', 0x002, 2],
  ['intercept_dr_read', 0x004, 2],
  ['intercept_dr_write', 0x006, 2],
  ['intercept_exceptions', 0x008, 4],
  ['intercept_word3', 0x00c, 4],
  ['intercept_word4', 0x010, 4],
  ['intercept_word5', 0x014, 4],
  ['pause_filter_thresh', 0x03c, 2],
  ['pause_filter_count', 0x03e, 2],
  ['iopm_base_pa', 0x040, 8],
  ['msrpm_base_pa', 0x048, 8],
  ['tsc_offset', 0x050, 8],
  ['asid', 0x058, 4],
  ['tlb_ctl', 0x05c, 1],
  ['int_ctl', 0x060, 4],
  ['int_vector', 0x064, 4],
  ['int_state', 0x068, 4],
  ['exit_code', 0x070, 8],
  ['exit_info_1', 0x078, 8],
  ['exit_info_2', 0x080, 8],
  ['exit_int_info', 0x088, 4],
  ['exit_int_info_err', 0x08c, 4],
  ['nested_ctl', 0x090, 8],
  ['avic_vapic_bar', 0x098, 8],
  ['ghcb_gpa', 0x0a0, 8],
  ['event_inj', 0x0a8, 4],
  ['event_inj_err', 0x0ac, 4],
  ['nested_cr3', 0x0b0, 8],
  ['virt_ext', 0x0b8, 8],
  ['clean', 0x0c0, 4],
  ['next_rip', 0x0c8, 8],
  ['insn_len', 0x0d0, 1],
  ['avic_backing_page', 0x0e0, 8],
  ['avic_logical_id', 0x0f0, 8],
  ['avic_physical_id', 0x0f8, 8],
  ['vmsa_pa', 0x108, 8],
] as const;

export const VMCB_INSN_BYTES_OFFSET = 0x0d1;
export const VMCB_INSN_BYTES_SIZE = 15;

/** Offsets relative to the save area (VMCB_SAVE_OFFSET); struct vmcb_save_area is 744 bytes. */
export const VMCB_SAVE_FIELDS = [
  ['vmpl', 0x0ca, 1],
  ['cpl', 0x0cb, 1],
  ['efer', 0x0d0, 8],
  ['cr4', 0x148, 8],
  ['cr3', 0x150, 8],
  ['cr0', 0x158, 8],
  ['dr7', 0x160, 8],
  ['dr6', 0x168, 8],
  ['rflags', 0x170, 8],
  ['rip', 0x178, 8],
  ['rsp', 0x1d8, 8],
  ['s_cet', 0x1e0, 8],
  ['ssp', 0x1e8, 8],
  ['isst_addr', 0x1f0, 8],
  ['rax', 0x1f8, 8],
  ['star', 0x200, 8],
  ['lstar', 0x208, 8],
  ['cstar', 0x210, 8],
  ['sfmask', 0x218, 8],
  ['kernel_gs_base', 0x220, 8],
  ['sysenter_cs', 0x228, 8],
  ['sysenter_esp', 0x230, 8],
  ['sysenter_eip', 0x238, 8],
  ['cr2', 0x240, 8],
  ['g_pat', 0x268, 8],
  ['dbgctl', 0x270, 8],
  ['br_from', 0x278, 8],
  ['br_to', 0x280, 8],
  ['last_excp_from', 0x288, 8],
  ['last_excp_to', 0x290, 8],
  ['spec_ctrl', 0x2e0, 8],
] as const;

/** struct vmcb_seg, 16 bytes each, the ten of them at the start of the save area in this order. */
export const VMCB_SEGMENT_NAMES = ['es', 'cs', 'ss', 'ds', 'fs', 'gs', 'gdtr', 'ldtr', 'idtr', 'tr'] as const;
export const VMCB_SEGMENT_SIZE = 16;
export const VMCB_SEGMENT_FIELDS = [
  ['selector', 0, 2],
  ['attrib', 2, 2],
  ['limit', 4, 4],
  ['base', 8, 8],
] as const;

const numbered = (fmt: (n: number) => string, count: number): string[] => Array.from({ length: count }, (_, n) => fmt(n));

export const VMCB_INTERCEPT_CR_READ = bitsFromList(numbered((n) => `CR${n}_READ`, 16));
export const VMCB_INTERCEPT_CR_WRITE = bitsFromList(numbered((n) => `CR${n}_WRITE`, 16));
export const VMCB_INTERCEPT_DR_READ = bitsFromList(numbered((n) => `DR${n}_READ`, 16));
export const VMCB_INTERCEPT_DR_WRITE = bitsFromList(numbered((n) => `DR${n}_WRITE`, 16));
export const VMCB_INTERCEPT_EXCEPTIONS = bitsFromList([
  'DE',
  'DB',
  'NMI',
  'BP',
  'OF',
  'BR',
  'UD',
  'NM',
  'DF',
  'CSO',
  'TS',
  'NP',
  'SS',
  'GP',
  'PF',
  null,
  'MF',
  'AC',
  'MC',
  'XM',
  'VE',
  'CP',
  null,
  null,
  null,
  null,
  null,
  null,
  'HV',
  'VC',
  'SX',
  null,
] as const);
/** Intercept vector 3 (0x0C). */
export const VMCB_INTERCEPT_WORD3 = bitsFromList([
  'INTR',
  'NMI',
  'SMI',
  'INIT',
  'VINTR',
  'SELECTIVE_CR0',
  'STORE_IDTR',
  'STORE_GDTR',
  'STORE_LDTR',
  'STORE_TR',
  'LOAD_IDTR',
  'LOAD_GDTR',
  'LOAD_LDTR',
  'LOAD_TR',
  'RDTSC',
  'RDPMC',
  'PUSHF',
  'POPF',
  'CPUID',
  'RSM',
  'IRET',
  'INTN',
  'INVD',
  'PAUSE',
  'HLT',
  'INVLPG',
  'INVLPGA',
  'IOIO_PROT',
  'MSR_PROT',
  'TASK_SWITCH',
  'FERR_FREEZE',
  'SHUTDOWN',
] as const);
/** Intercept vector 4 (0x10). */
export const VMCB_INTERCEPT_WORD4 = bitsFromList([
  'VMRUN',
  'VMMCALL',
  'VMLOAD',
  'VMSAVE',
  'STGI',
  'CLGI',
  'SKINIT',
  'RDTSCP',
  'ICEBP',
  'WBINVD',
  'MONITOR',
  'MWAIT',
  'MWAIT_COND',
  'XSETBV',
  'RDPRU',
  'TRAP_EFER_WRITE',
  'TRAP_CR0_WRITE',
  'TRAP_CR1_WRITE',
  'TRAP_CR2_WRITE',
  'TRAP_CR3_WRITE',
  'TRAP_CR4_WRITE',
  'TRAP_CR5_WRITE',
  'TRAP_CR6_WRITE',
  'TRAP_CR7_WRITE',
  'TRAP_CR8_WRITE',
] as const);
/** Intercept vector 5 (0x14). */
export const VMCB_INTERCEPT_WORD5 = bitsFromList(['INVLPGB', 'INVLPGB_ILLEGAL', 'INVPCID', 'MCOMMIT', 'TLBSYNC', 'BUSLOCK', 'IDLE_HLT'] as const);

export const VMCB_INT_CTL = {
  V_IRQ: 1 << 8,
  V_GIF: 1 << 9,
  V_NMI_PENDING: 1 << 11,
  V_NMI_BLOCKING: 1 << 12,
  V_IGN_TPR: 1 << 20,
  V_INTR_MASKING: 1 << 24,
  V_GIF_ENABLE: 1 << 25,
  V_NMI_ENABLE: 1 << 26,
  X2APIC_MODE: 1 << 30,
  AVIC_ENABLE: 2 ** 31,
} as const;
/** Multi-bit int_ctl fields, left out of the bit names. */
export const VMCB_INT_CTL_V_TPR_MASK = 0x0f;
export const VMCB_INT_CTL_V_INTR_PRIO_MASK = 0x0f << 16;

export const VMCB_NESTED_CTL = { NP_ENABLE: 1, SEV_ENABLE: 2, SEV_ES_ENABLE: 4 } as const;
export const VMCB_VIRT_EXT = { LBR_VIRTUALIZATION_ENABLE: 1, V_VMLOAD_VMSAVE_ENABLE: 2 } as const;

/** Which control fields get bit names, and which bits of them are multi-bit fields rather than flags. */
const CONTROL_BIT_TABLES = {
  intercept_cr_read: [VMCB_INTERCEPT_CR_READ, 0],
  intercept_cr_write: [VMCB_INTERCEPT_CR_WRITE, 0],
  intercept_dr_read: [VMCB_INTERCEPT_DR_READ, 0],
  intercept_dr_write: [VMCB_INTERCEPT_DR_WRITE, 0],
  intercept_exceptions: [VMCB_INTERCEPT_EXCEPTIONS, 0],
  intercept_word3: [VMCB_INTERCEPT_WORD3, 0],
  intercept_word4: [VMCB_INTERCEPT_WORD4, 0],
  intercept_word5: [VMCB_INTERCEPT_WORD5, 0],
  int_ctl: [VMCB_INT_CTL, VMCB_INT_CTL_V_TPR_MASK | VMCB_INT_CTL_V_INTR_PRIO_MASK],
  nested_ctl: [VMCB_NESTED_CTL, 0],
  virt_ext: [VMCB_VIRT_EXT, 0],
} as const;

export type VmcbControl = FieldsOf<typeof VMCB_CONTROL_FIELDS>;
export type VmcbSegment = FieldsOf<typeof VMCB_SEGMENT_FIELDS>;
export type VmcbSegmentName = (typeof VMCB_SEGMENT_NAMES)[number];
export type VmcbSave = FieldsOf<typeof VMCB_SAVE_FIELDS> & Record<VmcbSegmentName, VmcbSegment>;
export type VmcbControlBitNames = Record<keyof typeof CONTROL_BIT_TABLES, string[]>;

export interface Vmcb12 {
  control: VmcbControl;
  /** Set bits of the flag-like control fields by name (unknown bits as 'UNKNOWN_0x...'). */
  controlBits: VmcbControlBitNames;
  insnBytes: Buffer;
  save: VmcbSave;
}

/** Bytes a buffer must hold to be decoded: through the last save-area field. */
export const VMCB12_DECODE_SIZE = VMCB_SAVE_OFFSET + extentOf(VMCB_SAVE_FIELDS);

export function decodeVmcb12(buf: Buffer): Vmcb12 {
  if (buf.length < VMCB12_DECODE_SIZE) {
    throw new RangeError(`a VMCB needs ${VMCB12_DECODE_SIZE} bytes to decode, got ${buf.length}`);
  }
  const control = readFields(buf, VMCB_CONTROL_OFFSET, VMCB_CONTROL_FIELDS);
  const controlBits = {} as VmcbControlBitNames;
  for (const [field, [table, ignore]] of Object.entries(CONTROL_BIT_TABLES)) {
    controlBits[field as keyof VmcbControlBitNames] = bitNames(control[field as keyof VmcbControl], table, ignore);
  }
  const save = readFields(buf, VMCB_SAVE_OFFSET, VMCB_SAVE_FIELDS) as VmcbSave;
  VMCB_SEGMENT_NAMES.forEach((name, i) => {
    save[name] = readFields(buf, VMCB_SAVE_OFFSET + i * VMCB_SEGMENT_SIZE, VMCB_SEGMENT_FIELDS);
  });
  const insnStart = VMCB_CONTROL_OFFSET + VMCB_INSN_BYTES_OFFSET;
  const insnBytes = cloneBytes(buf, insnStart, insnStart + VMCB_INSN_BYTES_SIZE);
  return { control, controlBits, insnBytes, save };
}
