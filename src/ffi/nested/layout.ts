/**
 * struct kvm_nested_state (arch/x86/include/uapi/asm/kvm.h) as named values.
 * Authority: shared/docs/kvm-nested-state-abi.md.
 *
 * Deliberately absent: the 2018 "kvm_state" proposal (KVM_CAP_STATE, ioctls 0xbb/0xbc, GIF=4) was never merged;
 * 0xbb/0xbc are now SEV KVM_MEMORY_ENCRYPT_(UN)REG_REGION and bit 0x4 now means EVMCS, so using them would be
 * actively wrong.
 */
import { bitNames, type FieldSpec } from './fields';

export const KVM_CAP_NESTED_STATE = 157;
/** _IOWR(0xAE, 0xbe, struct kvm_nested_state) */
export const KVM_GET_NESTED_STATE = 0xc080aebe;
/** _IOW(0xAE, 0xbf, struct kvm_nested_state) */
export const KVM_SET_NESTED_STATE = 0x4080aebf;

export const NESTED_HEADER_SIZE = 128;
/** flags, format and size: the least a buffer must hold to be decoded at all. */
export const NESTED_MIN_DECODE_SIZE = 8;
export const PAGE_SIZE = 4096;
/** -1 as u64: "no VMXON region" / "no current VMCS". */
export const INVALID_GPA = 0xffff_ffff_ffff_ffffn;

export const NESTED_FLAGS = {
  GUEST_MODE: 0x1,
  RUN_PENDING: 0x2,
  EVMCS: 0x4,
  MTF_PENDING: 0x8,
  GIF_SET: 0x100,
} as const;
export const NESTED_FLAGS_ALL = Object.values(NESTED_FLAGS).reduce((a, b) => a | b, 0);

export const NESTED_FORMAT = { VMX: 0, SVM: 1 } as const;

export const VMX_SMM_FLAGS = { SMM_GUEST_MODE: 0x1, SMM_VMXON: 0x2 } as const;
export const VMX_SMM_FLAGS_ALL = VMX_SMM_FLAGS.SMM_GUEST_MODE | VMX_SMM_FLAGS.SMM_VMXON;
export const VMX_HDR_FLAGS = { PREEMPTION_TIMER_DEADLINE: 0x1 } as const;
export const VMX_HDR_FLAGS_ALL = VMX_HDR_FLAGS.PREEMPTION_TIMER_DEADLINE;

/** Header fields common to both formats (offsets from the start of the blob). */
export const NESTED_HEADER_FIELDS = [
  ['flags', 0, 2],
  ['format', 2, 2],
  ['size', 4, 4],
] as const satisfies readonly FieldSpec[];

/** struct kvm_vmx_nested_state_hdr; bytes 26..27 (pad) and 40..127 stay opaque. */
export const VMX_HEADER_FIELDS = [
  ['vmxonPa', 8, 8],
  ['vmcs12Pa', 16, 8],
  ['smmFlags', 24, 2],
  ['hdrFlags', 28, 4],
  ['preemptionTimerDeadline', 32, 8],
] as const satisfies readonly FieldSpec[];

/** struct kvm_svm_nested_state_hdr; bytes 16..127 are padding that newer kernels use (gpat), kept opaque. */
export const SVM_HEADER_FIELDS = [['vmcbPa', 8, 8]] as const satisfies readonly FieldSpec[];

/** Data areas: offset in the blob and size. */
export const VMCS12_OFFSET = NESTED_HEADER_SIZE;
export const VMCS12_SIZE = 4096;
export const SHADOW_VMCS12_OFFSET = VMCS12_OFFSET + VMCS12_SIZE;
export const SHADOW_VMCS12_SIZE = 4096;
export const VMCB12_OFFSET = NESTED_HEADER_SIZE;
export const VMCB12_SIZE = 4096;

export const VMX_MAX_SIZE = SHADOW_VMCS12_OFFSET + SHADOW_VMCS12_SIZE; // 8320
export const SVM_MAX_SIZE = VMCB12_OFFSET + VMCB12_SIZE; // 4224

export const VMCS12_REVISION = 0x11e57ed0;

export const nestedFlagNames = (flags: number): string[] => bitNames(flags, NESTED_FLAGS);
export const vmxSmmFlagNames = (flags: number): string[] => bitNames(flags, VMX_SMM_FLAGS);
export const vmxHdrFlagNames = (flags: number): string[] => bitNames(flags, VMX_HDR_FLAGS);
