/**
 * Pre-validation of a blob before KVM_SET_NESTED_STATE, in the order the kernel checks it (arch/x86/kvm/x86.c,
 * then vmx/nested.c or svm/nested.c), plus host checks. The kernel stays the last word: rules that need a target
 * fact the caller did not give are skipped, and checks that need KVM-private vmcs12 fields (shadow VMCS, VMX controls and host/guest state) or
 * guest CPUID bits beyond VMX/SVM are left to the kernel. Unlike the kernel, every violation is reported, but a rule
 * is only evaluated where the kernel would reach it (e.g. SVM without GUEST_MODE ignores vmcb_pa and size).
 */
import { bitNames, bitsOutside, hex, readFields, type BitTable } from './fields';
import { decodeNestedState, formatNumber, type NestedState } from './codec';
import {
  INVALID_GPA,
  NESTED_FLAGS,
  NESTED_FLAGS_ALL,
  NESTED_FORMAT,
  NESTED_HEADER_FIELDS,
  NESTED_HEADER_SIZE,
  NESTED_MIN_DECODE_SIZE,
  PAGE_SIZE,
  SHADOW_VMCS12_OFFSET,
  SVM_MAX_SIZE,
  VMCS12_REVISION,
  VMX_HDR_FLAGS,
  VMX_HDR_FLAGS_ALL,
  VMX_SMM_FLAGS,
  VMX_SMM_FLAGS_ALL,
} from './layout';
import { decodeVmcb12, VMCB_INTERCEPT_WORD4, VMCB_NESTED_CTL, type Vmcb12 } from './vmcb12';
import { decodeVmcs12 } from './vmcs12';

export interface NestedTarget {
  /** Vendor of the host that will run KVM_SET_NESTED_STATE. */
  vendor: 'intel' | 'amd';
  /** KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) on the host: 0 = no nested support. */
  maxSize: number;
  /** The vCPU's CPUID 0x80000008 EAX[7:0]. */
  maxPhysAddrBits: number;
  guestHasVmx?: boolean;
  guestHasSvm?: boolean;
  /** The vCPU's EFER from sregs as already set (L2's when restoring guest mode). */
  efer?: bigint;
  /** The vCPU's CR0 from sregs as already set (L2's when restoring guest mode); SVM checks CD/NW on it. */
  cr0?: bigint;
  /** vcpu_events smi.smm as already set. */
  inSmm?: boolean;
  /** KVM_CAP_HYPERV_ENLIGHTENED_VMCS enabled on the vCPU. */
  evmcsEnabled?: boolean;
  /** kvm_amd npt=1 on the host. */
  hostHasNpt?: boolean;
}

interface RuleSpec {
  readonly id: string;
  /** The field usually at fault (a few rules report another one depending on the case). */
  readonly field: string;
  readonly description: string;
}

/** Every rule, in evaluation order. */
export const NESTED_RULES = [
  { id: 'common.header.length', field: 'blob', description: 'the blob holds the whole 128-byte header KVM always reads' },
  { id: 'common.size.min', field: 'size', description: 'size is at least 128 (the header)' },
  { id: 'common.flags.known', field: 'flags', description: 'flags only has GUEST_MODE, RUN_PENDING, EVMCS, MTF_PENDING, GIF_SET' },
  { id: 'common.run_pending.requires_guest_mode', field: 'flags', description: 'RUN_PENDING only together with GUEST_MODE' },
  { id: 'common.size.buffer', field: 'size', description: 'the blob is exactly size bytes long (KVM reads size bytes from the pointer)' },
  { id: 'size.max', field: 'size', description: "size fits the host's KVM_CAP_NESTED_STATE maximum (0: no nested support)" },
  { id: 'format.matches_vendor', field: 'format', description: 'format is VMX (0) on Intel hosts and SVM (1) on AMD hosts' },
  { id: 'vmx.no_vmxon.smm_flags', field: 'hdr.vmx.smm.flags', description: 'without VMXON (vmxon_pa -1) smm.flags is 0' },
  { id: 'vmx.no_vmxon.vmcs12_pa', field: 'hdr.vmx.vmcs12_pa', description: 'without VMXON vmcs12_pa is -1' },
  { id: 'vmx.no_vmxon.flags', field: 'flags', description: 'without VMXON no flag but EVMCS is set' },
  { id: 'vmx.guest_cpuid', field: 'hdr.vmx.vmxon_pa', description: "VMXON state needs VMX in the guest's CPUID" },
  { id: 'vmx.vmxon_pa.aligned', field: 'hdr.vmx.vmxon_pa', description: 'vmxon_pa is 4 KiB aligned' },
  { id: 'vmx.vmxon_pa.maxphyaddr', field: 'hdr.vmx.vmxon_pa', description: "vmxon_pa is below the guest's MAXPHYADDR" },
  { id: 'vmx.smm.guest_mode', field: 'hdr.vmx.smm.flags', description: 'SMM_GUEST_MODE is not combined with GUEST_MODE' },
  { id: 'vmx.smm.flags_known', field: 'hdr.vmx.smm.flags', description: 'smm.flags only has SMM_GUEST_MODE, SMM_VMXON' },
  { id: 'vmx.hdr_flags', field: 'hdr.vmx.flags', description: 'hdr.vmx.flags only has PREEMPTION_TIMER_DEADLINE' },
  { id: 'vmx.smm.vcpu_state', field: 'hdr.vmx.smm.flags', description: 'in SMM no GUEST_MODE/RUN_PENDING, outside SMM smm.flags 0 (set vcpu_events first)' },
  { id: 'vmx.smm.vmxon_required', field: 'hdr.vmx.smm.flags', description: 'SMM_GUEST_MODE only together with SMM_VMXON' },
  { id: 'vmx.evmcs.enabled', field: 'flags', description: 'EVMCS needs guest VMX and the enlightened-VMCS cap enabled' },
  { id: 'vmx.size.vmcs12', field: 'size', description: 'GUEST_MODE, EVMCS or a vmcs12_pa need size >= 4224 (destructive from here)' },
  { id: 'vmx.vmcs12_pa.required', field: 'hdr.vmx.vmcs12_pa', description: 'a blob carrying vmcs12 has a vmcs12_pa or EVMCS' },
  { id: 'vmx.vmcs12_pa.vmxon', field: 'hdr.vmx.vmcs12_pa', description: 'vmcs12_pa differs from vmxon_pa' },
  { id: 'vmx.vmcs12_pa.aligned', field: 'hdr.vmx.vmcs12_pa', description: 'vmcs12_pa is 4 KiB aligned' },
  { id: 'vmx.vmcs12_pa.maxphyaddr', field: 'hdr.vmx.vmcs12_pa', description: "vmcs12_pa is below the guest's MAXPHYADDR" },
  { id: 'vmx.vmcs12_revision', field: 'data.vmcs12.revision_id', description: 'the vmcs12 revision is 0x11e57ed0' },
  { id: 'svm.flags.allowed', field: 'flags', description: 'SVM flags only has GUEST_MODE, RUN_PENDING, GIF_SET' },
  { id: 'svm.guest_cpuid', field: 'flags', description: "flags other than 0/GIF_SET need SVM in the guest's CPUID (else EFER.SVME cannot be 1)" },
  { id: 'svm.efer_svme', field: 'flags', description: "flags other than 0/GIF_SET need the vCPU's EFER.SVME set (set sregs first)" },
  { id: 'svm.smm.guest_mode', field: 'flags', description: 'no GUEST_MODE while the vCPU is in SMM' },
  { id: 'svm.vmcb_pa.aligned', field: 'hdr.svm.vmcb_pa', description: 'in guest mode vmcb_pa is 4 KiB aligned' },
  { id: 'svm.vmcb_pa.maxphyaddr', field: 'hdr.svm.vmcb_pa', description: "in guest mode vmcb_pa is below the guest's MAXPHYADDR" },
  { id: 'svm.size.guest_mode', field: 'size', description: 'in guest mode size is at least 4224 (header + vmcb12)' },
  { id: 'svm.vmcb12.vmrun_intercept', field: 'data.vmcb12.control.intercept_word4', description: 'vmcb12 intercepts VMRUN' },
  { id: 'svm.vmcb12.asid', field: 'data.vmcb12.control.asid', description: 'vmcb12 ASID is not 0' },
  { id: 'svm.vmcb12.np_supported', field: 'data.vmcb12.control.nested_ctl', description: 'vmcb12 NP_ENABLE only if the host has NPT' },
  { id: 'svm.vmcb12.msrpm_pa', field: 'data.vmcb12.control.msrpm_base_pa', description: "the 8 KiB MSR permission map lies below the guest's MAXPHYADDR" },
  { id: 'svm.vmcb12.iopm_pa', field: 'data.vmcb12.control.iopm_base_pa', description: "the 12 KiB I/O permission map lies below the guest's MAXPHYADDR" },
  { id: 'svm.l2_cr0.cd_nw', field: 'target.cr0', description: "the vCPU's (L2) CR0 does not have NW=1 with CD=0" },
  { id: 'svm.vmcb12.save.cr0_pg_pe', field: 'data.vmcb12.save.cr0', description: 'L1 CR0 has PG and PE' },
  { id: 'svm.vmcb12.save.rflags_vm', field: 'data.vmcb12.save.rflags', description: 'L1 RFLAGS.VM is clear' },
  { id: 'svm.vmcb12.save.efer_svme', field: 'data.vmcb12.save.efer', description: 'L1 EFER.SVME is set' },
  { id: 'svm.vmcb12.save.cr0_cd_nw', field: 'data.vmcb12.save.cr0', description: 'L1 CR0 does not have NW=1 with CD=0' },
  { id: 'svm.vmcb12.save.cr0_high', field: 'data.vmcb12.save.cr0', description: 'L1 CR0 bits 63:32 are 0' },
  { id: 'svm.vmcb12.save.dr6', field: 'data.vmcb12.save.dr6', description: 'L1 DR6 bits 63:32 are 0' },
  { id: 'svm.vmcb12.save.dr7', field: 'data.vmcb12.save.dr7', description: 'L1 DR7 bits 63:32 are 0' },
  { id: 'svm.vmcb12.save.long_mode_pae', field: 'data.vmcb12.save.cr4', description: 'L1 with EFER.LME and CR0.PG has CR4.PAE' },
  { id: 'svm.vmcb12.save.cr3_maxphyaddr', field: 'data.vmcb12.save.cr3', description: "L1 with EFER.LME and CR0.PG has CR3 below the guest's MAXPHYADDR" },
  {
    id: 'svm.vmcb12.save.cr4_reserved',
    field: 'data.vmcb12.save.cr4',
    description: 'L1 CR4 has no bit KVM ever accepts as reserved (CPUID-dependent bits left to the kernel)',
  },
  {
    id: 'svm.vmcb12.save.cr4_vmxe',
    field: 'data.vmcb12.save.cr4',
    description: 'L1 CR4.VMXE only when the guest CPUID has VMX (found by the lab fuzzer: the kernel refused it)',
  },
  {
    id: 'svm.vmcb12.save.efer_reserved',
    field: 'data.vmcb12.save.efer',
    description: 'L1 EFER has no bit KVM ever accepts as reserved (CPUID-dependent bits left to the kernel)',
  },
] as const satisfies readonly RuleSpec[];

export type NestedRuleId = (typeof NESTED_RULES)[number]['id'];
export const NESTED_RULE_IDS: readonly NestedRuleId[] = NESTED_RULES.map((r) => r.id);

export interface NestedViolation {
  rule: NestedRuleId;
  field: string;
  message: string;
}

const RULE_FIELD = Object.fromEntries(NESTED_RULES.map((r) => [r.id, r.field])) as Record<NestedRuleId, string>;

type Report = (rule: NestedRuleId, message: string, field?: string) => void;

/** x86 architectural bits the SVM rules look at. */
const X86 = {
  CR0_PE: 1n << 0n,
  CR0_NW: 1n << 29n,
  CR0_CD: 1n << 30n,
  CR0_PG: 1n << 31n,
  CR4_PAE: 1n << 5n,
  CR4_VMXE: 1n << 13n,
  RFLAGS_VM: 1n << 17n,
  EFER_SVME: 1n << 12n,
  EFER_LME: 1n << 8n,
  /** SCE LME LMA NXE SVME LMSLE FFXSR TCE AUTOIBRS: every EFER bit some KVM version accepts. */
  EFER_KVM_KNOWN: 0x20_fd01n,
  /** CR4 bits 0-13, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET, LAM_SUP: KVM's CR4_RESERVED_BITS complement. */
  CR4_KVM_KNOWN: 0x10f7_3fffn,
} as const;

const MSRPM_SIZE = 2 * PAGE_SIZE;
const IOPM_SIZE = 3 * PAGE_SIZE;
const SVM_FLAGS_ALLOWED = NESTED_FLAGS.GUEST_MODE | NESTED_FLAGS.RUN_PENDING | NESTED_FLAGS.GIF_SET;
const U64 = (1n << 64n) - 1n;

export function validateNestedState(blob: Buffer, target: NestedTarget): NestedViolation[] {
  const violations: NestedViolation[] = [];
  const report: Report = (rule, message, field = RULE_FIELD[rule]) => violations.push({ rule, field, message });
  if (blob.length < NESTED_HEADER_SIZE) report('common.header.length', headerLengthMessage(blob.length));
  if (blob.length < NESTED_MIN_DECODE_SIZE) return violations;
  const s = decodeNestedState(blob);
  checkCommon(s, report);
  if (checkHost(s, target, report)) {
    if (target.vendor === 'intel') checkVmx(s, target, report);
    else checkSvm(s, target, report);
  }
  return violations;
}

/**
 * The rules every blob passes before KVM_SET_NESTED_STATE, also when the semantic validation above is
 * skipped: KVM always reads the 128-byte header and then `size` bytes from the blob, so a blob shorter
 * than either would be read past its end (the addon refuses both before any ioctl). A blob longer than
 * its size field is the kernel's to judge; only validateNestedState refuses that too (common.size.buffer).
 */
export function validateNestedStructure(blob: Buffer): NestedViolation[] {
  const violations: NestedViolation[] = [];
  const report = (rule: NestedRuleId, message: string) => violations.push({ rule, field: RULE_FIELD[rule], message });
  if (blob.length < NESTED_HEADER_SIZE) report('common.header.length', headerLengthMessage(blob.length));
  if (blob.length < NESTED_MIN_DECODE_SIZE) return violations;
  const { size } = readFields(blob, 0, NESTED_HEADER_FIELDS);
  if (size > blob.length) report('common.size.buffer', sizeBufferMessage(blob.length, size));
  return violations;
}

const headerLengthMessage = (length: number) => `the blob is ${length} bytes, KVM reads a ${NESTED_HEADER_SIZE}-byte header`;
const sizeBufferMessage = (length: number, size: number) => `the blob is ${length} bytes but its size field says ${size}`;

function checkCommon(s: NestedState, report: Report): void {
  if (s.size < NESTED_HEADER_SIZE) {
    report('common.size.min', `size ${s.size} is below the ${NESTED_HEADER_SIZE}-byte minimum`);
  }
  reportBitsOutside(s.flags, NESTED_FLAGS_ALL, NESTED_FLAGS, 'flags', 'common.flags.known', report);
  if (s.flags & NESTED_FLAGS.RUN_PENDING && !(s.flags & NESTED_FLAGS.GUEST_MODE)) {
    report('common.run_pending.requires_guest_mode', `flags ${describeFlags(s.flags, NESTED_FLAGS)} has RUN_PENDING without GUEST_MODE`);
  }
  if (s.raw.length !== s.size) report('common.size.buffer', sizeBufferMessage(s.raw.length, s.size));
}

/** Returns whether the blob's format is the host vendor's, i.e. whether the vendor rules apply at all. */
function checkHost(s: NestedState, t: NestedTarget, report: Report): boolean {
  if (s.size > t.maxSize) {
    const why = t.maxSize === 0 ? ' (the host reports KVM_CAP_NESTED_STATE = 0: no nested support)' : '';
    report('size.max', `size ${s.size} exceeds the host's KVM_CAP_NESTED_STATE maximum ${t.maxSize}${why}`);
  }
  const expected = t.vendor === 'intel' ? NESTED_FORMAT.VMX : NESTED_FORMAT.SVM;
  const actual = formatNumber(s.format);
  if (actual === expected) return true;
  report('format.matches_vendor', `format ${describeFormat(actual)} cannot be set on an ${t.vendor} host, which takes format ${describeFormat(expected)}`);
  return false;
}

function checkVmx(s: NestedState, t: NestedTarget, report: Report): void {
  const h = s.vmx;
  if (!h) return; // header truncated: common.header.length already says so
  const flags = describeFlags(s.flags, NESTED_FLAGS);
  const smm = describeFlags(h.smmFlags, VMX_SMM_FLAGS);
  const noVmxon = h.vmxonPa === INVALID_GPA;
  if (noVmxon) {
    if (h.smmFlags) report('vmx.no_vmxon.smm_flags', `smm.flags ${smm} must be 0 when vmxon_pa is -1`);
    if (h.vmcs12Pa !== INVALID_GPA) report('vmx.no_vmxon.vmcs12_pa', `vmcs12_pa ${hex(h.vmcs12Pa)} must be -1 when vmxon_pa is -1`);
    if (s.flags & ~NESTED_FLAGS.EVMCS) report('vmx.no_vmxon.flags', `flags ${flags} may only have EVMCS when vmxon_pa is -1`);
  } else {
    if (t.guestHasVmx === false) report('vmx.guest_cpuid', `vmxon_pa ${hex(h.vmxonPa)} is VMXON state but the guest CPUID has no VMX`);
    checkPageAddress('vmx.vmxon_pa', h.vmxonPa, t, report);
  }
  const smmGuest = (h.smmFlags & VMX_SMM_FLAGS.SMM_GUEST_MODE) !== 0;
  if (smmGuest && s.flags & NESTED_FLAGS.GUEST_MODE) {
    report('vmx.smm.guest_mode', `smm.flags ${smm} has SMM_GUEST_MODE while flags ${flags} has GUEST_MODE`);
  }
  reportBitsOutside(h.smmFlags, VMX_SMM_FLAGS_ALL, VMX_SMM_FLAGS, 'smm.flags', 'vmx.smm.flags_known', report);
  reportBitsOutside(h.hdrFlags, VMX_HDR_FLAGS_ALL, VMX_HDR_FLAGS, 'hdr.vmx.flags', 'vmx.hdr_flags', report);
  if (t.inSmm === true && s.flags & (NESTED_FLAGS.GUEST_MODE | NESTED_FLAGS.RUN_PENDING)) {
    report('vmx.smm.vcpu_state', `the vCPU is in SMM, so flags ${flags} may not have GUEST_MODE or RUN_PENDING`, 'flags');
  } else if (t.inSmm === false && h.smmFlags) {
    report('vmx.smm.vcpu_state', `the vCPU is not in SMM, so smm.flags ${smm} must be 0 (set vcpu_events first)`);
  }
  if (smmGuest && !(h.smmFlags & VMX_SMM_FLAGS.SMM_VMXON)) {
    report('vmx.smm.vmxon_required', `smm.flags ${smm} has SMM_GUEST_MODE without SMM_VMXON`);
  }
  if (s.flags & NESTED_FLAGS.EVMCS && (t.evmcsEnabled === false || t.guestHasVmx === false)) {
    const missing = t.guestHasVmx === false ? 'the guest CPUID has no VMX' : 'the enlightened-VMCS cap is not enabled on the vCPU';
    report('vmx.evmcs.enabled', `flags ${flags} has EVMCS but ${missing}`);
  }
  // The kernel leaves nested mode here; with no VMXON region it is done.
  if (noVmxon) return;
  const refersToVmcs12 = (s.flags & (NESTED_FLAGS.GUEST_MODE | NESTED_FLAGS.EVMCS)) !== 0 || h.vmcs12Pa !== INVALID_GPA;
  if (s.size < SHADOW_VMCS12_OFFSET) {
    if (refersToVmcs12) {
      report('vmx.size.vmcs12', `size ${s.size} < ${SHADOW_VMCS12_OFFSET} but flags ${flags} / vmcs12_pa ${hex(h.vmcs12Pa)} need a vmcs12`);
    }
    return;
  }
  if (h.vmcs12Pa !== INVALID_GPA) {
    if (h.vmcs12Pa === h.vmxonPa) report('vmx.vmcs12_pa.vmxon', `vmcs12_pa ${hex(h.vmcs12Pa)} equals vmxon_pa`);
    checkPageAddress('vmx.vmcs12_pa', h.vmcs12Pa, t, report);
  } else if (!(s.flags & NESTED_FLAGS.EVMCS)) {
    report('vmx.vmcs12_pa.required', `size ${s.size} carries a vmcs12 but vmcs12_pa is -1 and flags ${flags} has no EVMCS`);
  }
  if (s.data.vmcs12) {
    const { revisionId } = decodeVmcs12(s.data.vmcs12);
    if (revisionId !== VMCS12_REVISION) {
      report('vmx.vmcs12_revision', `vmcs12 revision ${hex(revisionId)} is not ${hex(VMCS12_REVISION)}`);
    }
  }
}

function checkSvm(s: NestedState, t: NestedTarget, report: Report): void {
  const flags = describeFlags(s.flags, NESTED_FLAGS);
  const disallowed = bitsOutside(s.flags, SVM_FLAGS_ALLOWED);
  if (disallowed) {
    report(
      'svm.flags.allowed',
      `flags ${flags} has ${bitNames(disallowed, NESTED_FLAGS).join('|')}, SVM allows only ${describeAllowed(SVM_FLAGS_ALLOWED, NESTED_FLAGS)}`,
    );
  }
  // With EFER.SVME clear only "nothing" and "GIF set" are states KVM accepts.
  const needsSvme = s.flags !== 0 && s.flags !== NESTED_FLAGS.GIF_SET;
  if (needsSvme && t.guestHasSvm === false) {
    report('svm.guest_cpuid', `flags ${flags} needs EFER.SVME, which a guest CPUID without SVM cannot set; only 0 or GIF_SET fit`);
  }
  if (needsSvme && t.efer !== undefined && !(t.efer & X86.EFER_SVME)) {
    report('svm.efer_svme', `flags ${flags} needs the vCPU's EFER.SVME but EFER is ${hex(t.efer)}; only 0 or GIF_SET fit`);
  }
  const guestMode = (s.flags & NESTED_FLAGS.GUEST_MODE) !== 0;
  if (guestMode && t.inSmm === true) report('svm.smm.guest_mode', `flags ${flags} has GUEST_MODE but the vCPU is in SMM`);
  // Outside guest mode the kernel leaves nested mode, sets GIF and ignores vmcb_pa and size.
  if (!guestMode || !s.svm) return;
  checkPageAddress('svm.vmcb_pa', s.svm.vmcbPa, t, report);
  if (s.size < SVM_MAX_SIZE) {
    report('svm.size.guest_mode', `size ${s.size} < ${SVM_MAX_SIZE}: GUEST_MODE needs the vmcb12`);
    return;
  }
  if (!s.data.vmcb12) return; // the blob is shorter than size: common.size.buffer already says so
  const vmcb = decodeVmcb12(s.data.vmcb12);
  checkVmcb12Control(vmcb, t, report);
  if (t.cr0 !== undefined && cdNwIllegal(t.cr0)) {
    report('svm.l2_cr0.cd_nw', `the vCPU's CR0 ${hex(t.cr0)} has NW=1 with CD=0`);
  }
  checkVmcb12Save(vmcb, t, report);
}

function checkVmcb12Control({ control: c }: Vmcb12, t: NestedTarget, report: Report): void {
  if (!(c.intercept_word4 & VMCB_INTERCEPT_WORD4.VMRUN)) {
    report('svm.vmcb12.vmrun_intercept', `vmcb12 intercept vector 4 ${hex(c.intercept_word4)} lacks VMRUN (bit 0)`);
  }
  if (c.asid === 0) report('svm.vmcb12.asid', 'vmcb12 ASID is 0; L2 needs a non-zero ASID');
  if (c.nested_ctl & BigInt(VMCB_NESTED_CTL.NP_ENABLE) && t.hostHasNpt === false) {
    report('svm.vmcb12.np_supported', `vmcb12 nested_ctl ${hex(c.nested_ctl)} has NP_ENABLE but the host has no NPT`);
  }
  checkBitmap('svm.vmcb12.msrpm_pa', 'msrpm_base_pa', c.msrpm_base_pa, MSRPM_SIZE, t, report);
  checkBitmap('svm.vmcb12.iopm_pa', 'iopm_base_pa', c.iopm_base_pa, IOPM_SIZE, t, report);
}

function checkVmcb12Save({ save: v }: Vmcb12, t: NestedTarget, report: Report): void {
  const missing = (['PG', 'PE'] as const).filter((bit) => !(v.cr0 & X86[`CR0_${bit}`]));
  if (missing.length) report('svm.vmcb12.save.cr0_pg_pe', `L1 CR0 ${hex(v.cr0)} lacks ${missing.join(' and ')}`);
  if (v.rflags & X86.RFLAGS_VM) report('svm.vmcb12.save.rflags_vm', `L1 RFLAGS ${hex(v.rflags)} has VM (bit 17) set`);
  if (!(v.efer & X86.EFER_SVME)) report('svm.vmcb12.save.efer_svme', `L1 EFER ${hex(v.efer)} lacks SVME (bit 12)`);
  if (cdNwIllegal(v.cr0)) report('svm.vmcb12.save.cr0_cd_nw', `L1 CR0 ${hex(v.cr0)} has NW=1 with CD=0`);
  for (const [rule, name, value] of [
    ['svm.vmcb12.save.cr0_high', 'CR0', v.cr0],
    ['svm.vmcb12.save.dr6', 'DR6', v.dr6],
    ['svm.vmcb12.save.dr7', 'DR7', v.dr7],
  ] as const) {
    if (value >> 32n) report(rule, `L1 ${name} ${hex(value)} has bits set above bit 31`);
  }
  if (v.efer & X86.EFER_LME && v.cr0 & X86.CR0_PG) {
    if (!(v.cr4 & X86.CR4_PAE)) {
      report('svm.vmcb12.save.long_mode_pae', `L1 has EFER.LME and CR0.PG but CR4 ${hex(v.cr4)} lacks PAE`);
    }
    if (!legalGpa(v.cr3, t)) {
      report('svm.vmcb12.save.cr3_maxphyaddr', `L1 CR3 ${hex(v.cr3)} ${beyondMaxPhys(t)}`);
    }
  }
  const cr4Bad = bitsOutside(v.cr4, X86.CR4_KVM_KNOWN);
  if (cr4Bad) report('svm.vmcb12.save.cr4_reserved', `L1 CR4 ${hex(v.cr4)} has reserved bits ${hex(cr4Bad)}`);
  if (v.cr4 & X86.CR4_VMXE && t.guestHasVmx === false) report('svm.vmcb12.save.cr4_vmxe', `L1 CR4 ${hex(v.cr4)} has VMXE but the guest CPUID has no VMX`);
  const eferBad = bitsOutside(v.efer, X86.EFER_KVM_KNOWN);
  if (eferBad) report('svm.vmcb12.save.efer_reserved', `L1 EFER ${hex(v.efer)} has reserved bits ${hex(eferBad)}`);
}

const cdNwIllegal = (cr0: bigint): boolean => !(cr0 & X86.CR0_CD) && (cr0 & X86.CR0_NW) !== 0n;

const legalGpa = (pa: bigint, t: NestedTarget): boolean => pa >> BigInt(t.maxPhysAddrBits) === 0n;

const beyondMaxPhys = (t: NestedTarget): string =>
  `is beyond the guest MAXPHYADDR of ${t.maxPhysAddrBits} bits (must be < ${hex(1n << BigInt(t.maxPhysAddrBits))})`;

/** KVM's page_address_valid(): 4 KiB aligned and a legal GPA; one rule per half. */
function checkPageAddress(prefix: 'vmx.vmxon_pa' | 'vmx.vmcs12_pa' | 'svm.vmcb_pa', pa: bigint, t: NestedTarget, report: Report): void {
  const name = prefix.slice(prefix.indexOf('.') + 1);
  if (pa % BigInt(PAGE_SIZE)) report(`${prefix}.aligned`, `${name} ${hex(pa)} is not 4 KiB aligned`);
  if (!legalGpa(pa, t)) report(`${prefix}.maxphyaddr`, `${name} ${hex(pa)} ${beyondMaxPhys(t)}`);
}

/** nested_svm_check_bitmap_pa(): hardware ignores bits 11:0, so the page-rounded-up map must be a legal GPA range. */
function checkBitmap(rule: NestedRuleId, name: string, pa: bigint, size: number, t: NestedTarget, report: Report): void {
  const start = (pa + BigInt(PAGE_SIZE - 1)) & ~BigInt(PAGE_SIZE - 1) & U64;
  const last = (start + BigInt(size - 1)) & U64;
  if (!legalGpa(start, t) || !legalGpa(last, t)) {
    report(rule, `${name} ${hex(pa)}: the ${size / 1024} KiB map ${hex(start)}..${hex(last)} ${beyondMaxPhys(t)}`);
  }
}

function reportBitsOutside(value: number, allowed: number, table: BitTable, label: string, rule: NestedRuleId, report: Report): void {
  const extra = bitsOutside(value, allowed);
  if (extra) {
    const names = bitNames(extra, table).join('|');
    report(rule, `${label} ${hex(value)} has ${names} outside {${describeAllowed(allowed, table)}}`);
  }
}

const describeFormat = (format: number): string => `${format} (${format === NESTED_FORMAT.VMX ? 'VMX' : format === NESTED_FORMAT.SVM ? 'SVM' : 'unknown'})`;

const describeFlags = (value: number, table: BitTable): string => (value === 0 ? '0x0' : `${hex(value)} (${bitNames(value, table).join('|')})`);

const describeAllowed = (allowed: number, table: BitTable): string =>
  Object.entries(table)
    .filter(([, mask]) => bitsOutside(mask, allowed) === 0n)
    .map(([name, mask]) => `${name} ${hex(mask)}`)
    .join(', ');
