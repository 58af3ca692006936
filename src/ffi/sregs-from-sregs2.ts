/**
 * KVM_GET_SREGS answered without its ioctl when the same batch reads KVM_GET_SREGS2 and KVM_GET_VCPU_EVENTS:
 * one vCPU ioctl fewer per full GetState (each costs ~7 µs on kvm_pvm, mostly vcpu_load), the same bytes.
 *
 * Why the bytes are the same (arch/x86/kvm/x86.c, since KVM_GET_SREGS2 came in 5.14): __get_sregs and
 * __get_sregs2 both fill the fields up to apic_base with __get_sregs_common (kvm_sregs2 is laid out as
 * kvm_sregs up to there), each into a zeroed struct. All __get_sregs adds is interrupt_bitmap's bit
 * vcpu->arch.interrupt.nr, set when interrupt.injected && !interrupt.soft: exactly what
 * kvm_vcpu_ioctl_x86_get_vcpu_events reports as interrupt.injected and interrupt.nr. No GET of a batch
 * changes them (the vCPU is out of KVM_RUN). Guests with protected state (SEV-ES, TDX), whose bitmap
 * __get_sregs leaves empty, are not something vcpud creates.
 *
 * The batch fills the bytes itself, after its ioctls (SregsFromSregs2 in native/kvm_ioctls.cc): a
 * prepared batch encodes its buffers in the same native call.
 */
import type { SregsDerivation } from './native';

interface Read {
  ioctl: string;
  buf?: Buffer;
}

/**
 * In a batch's reads: the KVM_GET_SREGS read to leave out, with the buffers the batch fills it from
 * (its own, KVM_GET_SREGS2's and KVM_GET_VCPU_EVENTS'); undefined unless all three are there (a
 * GET_VCPU_EVENTS is never added: it has side effects, process_nmi among them).
 */
export function sregsAnsweredBySregs2(reads: readonly Read[]): { index: number; from: SregsDerivation } | undefined {
  const find = (ioctl: string) => reads.find((r) => r.ioctl === ioctl)?.buf;
  const index = reads.findIndex((r) => r.ioctl === 'KVM_GET_SREGS');
  const [sregs, sregs2, events] = [reads[index]?.buf, find('KVM_GET_SREGS2'), find('KVM_GET_VCPU_EVENTS')];
  if (!sregs || !sregs2 || !events) return undefined;
  return { index, from: [sregs, sregs2, events] };
}
