/**
 * The CPUID a VM's vCPUs get: the host's KVM_GET_SUPPORTED_CPUID, with the nested
 * virtualization bit of the host's vendor (VMX or SVM) exposed or hidden.
 */
import { SVM_BIT, VMX_BIT } from '../ffi/cpuid-facts';
import type { CpuidEntry2 } from '../ffi/sections';

export interface CpuidPolicy {
  exposeNested: boolean;
}

export function applyCpuidPolicy(supported: CpuidEntry2[], policy: CpuidPolicy): CpuidEntry2[] {
  return supported.map((e) => {
    const out = { ...e };
    for (const b of [VMX_BIT, SVM_BIT]) {
      if (e.function !== b.function) continue;
      const mask = 1 << b.bit;
      // Only clear when hiding: exposing cannot add a bit the host does not support.
      if (!policy.exposeNested) out[b.register] = (out[b.register] & ~mask) >>> 0;
    }
    return out;
  });
}
