/** struct kvm_cpuid2 + kvm_cpuid_entry2: KVM_GET/SET_CPUID2, KVM_GET_SUPPORTED_CPUID. */
import { field, list, nested, reserved, struct, u32, type LayoutValue } from './struct';

/** kvm_cpuid_entry2.flags (the header spells the first one KVM_CPUID_FLAG_SIGNIFCANT_INDEX). */
export const KVM_CPUID_FLAG = { SIGNIFICANT_INDEX: 1, STATEFUL_FUNC: 2, STATE_READ_NEXT: 4 } as const;

export const CPUID_ENTRY2_LAYOUT = struct('kvm_cpuid_entry2', 40, [
  field('function', 0, u32),
  field('index', 4, u32),
  field('flags', 8, u32),
  field('eax', 12, u32),
  field('ebx', 16, u32),
  field('ecx', 20, u32),
  field('edx', 24, u32),
  field('padding', 28, reserved(12)),
]);
export type CpuidEntry2 = LayoutValue<typeof CPUID_ENTRY2_LAYOUT>;
export const CPUID_ENTRY2_SIZE = CPUID_ENTRY2_LAYOUT.size;

export const CPUID2_HEADER_LAYOUT = struct('kvm_cpuid2', 8, [field('nent', 0, u32), field('padding', 4, reserved(4))]);
export const CPUID2 = list(CPUID2_HEADER_LAYOUT, 'nent', 'entries', nested(CPUID_ENTRY2_LAYOUT));
export const CPUID2_HEADER_SIZE = CPUID2.size;
export const cpuid2Size = CPUID2.sizeFor;
export const decodeCpuid2 = CPUID2.decode;
export const encodeCpuid2 = CPUID2.encode;
