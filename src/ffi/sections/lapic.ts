/**
 * struct kvm_lapic_state: KVM_GET_LAPIC / KVM_SET_LAPIC. The 1 KiB APIC register page is kept as
 * raw bytes (its meaning depends on xAPIC/x2APIC mode and KVM caps); inspectLapic reads the
 * registers a human usually wants.
 */
import { field, raw, struct, u32, type LayoutValue } from './struct';

export const KVM_APIC_REG_SIZE = 0x400;
export const LAPIC = raw('kvm_lapic_state', KVM_APIC_REG_SIZE, true);
export const LAPIC_SIZE = LAPIC.size;
export const decodeLapic = LAPIC.decode;
export const encodeLapic = LAPIC.encode;

// Architectural APIC register offsets (Intel SDM vol. 3 table 11-1), each a 32-bit word.
export const LAPIC_REGISTERS_LAYOUT = struct('apic register page', KVM_APIC_REG_SIZE, [
  field('idRegister', 0x20, u32),
  field('version', 0x30, u32),
  field('tpr', 0x80, u32),
  field('ldr', 0xd0, u32),
  field('svr', 0xf0, u32),
  field('isr0', 0x100, u32),
  field('irr0', 0x200, u32),
  field('lvtTimer', 0x320, u32),
  field('tmict', 0x380, u32),
  field('tmcct', 0x390, u32),
  field('tdcr', 0x3e0, u32),
]);

export type LapicInfo = LayoutValue<typeof LAPIC_REGISTERS_LAYOUT> & {
  /** ID register bits 31:24 (xAPIC format; with 32-bit x2APIC IDs the whole idRegister is the ID). */
  apicId: number;
};

export function inspectLapic(buf: Buffer): LapicInfo {
  const regs = LAPIC_REGISTERS_LAYOUT.decode(buf);
  return { apicId: regs.idRegister >>> 24, ...regs };
}
