/** struct kvm_vcpu_events: KVM_GET_VCPU_EVENTS / KVM_SET_VCPU_EVENTS. */
import { field, nested, reserved, struct, u32, u64, u8, type LayoutValue } from './struct';

/** kvm_vcpu_events.flags: which optional fields KVM_SET_VCPU_EVENTS should apply. */
export const KVM_VCPUEVENT_VALID = {
  NMI_PENDING: 0x01,
  SIPI_VECTOR: 0x02,
  SHADOW: 0x04,
  SMM: 0x08,
  PAYLOAD: 0x10,
  TRIPLE_FAULT: 0x20,
} as const;

/** interrupt.shadow bits. */
export const KVM_X86_SHADOW_INT = { MOV_SS: 0x01, STI: 0x02 } as const;

// The sub-structs are anonymous in C; their names here are the member paths.
export const EVENTS_EXCEPTION_LAYOUT = struct('kvm_vcpu_events.exception', 8, [
  field('injected', 0, u8),
  field('nr', 1, u8),
  field('hasErrorCode', 2, u8),
  field('pending', 3, u8),
  field('errorCode', 4, u32),
]);
export const EVENTS_INTERRUPT_LAYOUT = struct('kvm_vcpu_events.interrupt', 4, [
  field('injected', 0, u8),
  field('nr', 1, u8),
  field('soft', 2, u8),
  field('shadow', 3, u8),
]);
export const EVENTS_NMI_LAYOUT = struct('kvm_vcpu_events.nmi', 4, [
  field('injected', 0, u8),
  field('pending', 1, u8),
  field('masked', 2, u8),
  field('pad', 3, reserved(1)),
]);
export const EVENTS_SMI_LAYOUT = struct('kvm_vcpu_events.smi', 4, [
  field('smm', 0, u8),
  field('pending', 1, u8),
  field('smmInsideNmi', 2, u8),
  field('latchedInit', 3, u8),
]);
export const EVENTS_TRIPLE_FAULT_LAYOUT = struct('kvm_vcpu_events.triple_fault', 1, [field('pending', 0, u8)]);

export const VCPU_EVENTS_LAYOUT = struct('kvm_vcpu_events', 64, [
  field('exception', 0, nested(EVENTS_EXCEPTION_LAYOUT)),
  field('interrupt', 8, nested(EVENTS_INTERRUPT_LAYOUT)),
  field('nmi', 12, nested(EVENTS_NMI_LAYOUT)),
  field('sipiVector', 16, u32),
  field('flags', 20, u32),
  field('smi', 24, nested(EVENTS_SMI_LAYOUT)),
  field('tripleFault', 28, nested(EVENTS_TRIPLE_FAULT_LAYOUT)),
  field('reserved', 29, reserved(26)),
  field('exceptionHasPayload', 55, u8),
  field('exceptionPayload', 56, u64),
]);
export type VcpuEvents = LayoutValue<typeof VCPU_EVENTS_LAYOUT>;
export const VCPU_EVENTS_SIZE = VCPU_EVENTS_LAYOUT.size;
export const decodeVcpuEvents = VCPU_EVENTS_LAYOUT.decode;
export const encodeVcpuEvents = VCPU_EVENTS_LAYOUT.encode;
