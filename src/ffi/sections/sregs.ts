/** struct kvm_sregs (KVM_GET/SET_SREGS) and struct kvm_sregs2 (KVM_GET/SET_SREGS2). */
import { array, field, nested, reserved, struct, u16, u32, u64, u8, type LayoutValue } from './struct';

export const SEGMENT_LAYOUT = struct('kvm_segment', 24, [
  field('base', 0, u64),
  field('limit', 8, u32),
  field('selector', 12, u16),
  field('type', 14, u8),
  field('present', 15, u8),
  field('dpl', 16, u8),
  field('db', 17, u8),
  field('s', 18, u8),
  field('l', 19, u8),
  field('g', 20, u8),
  field('avl', 21, u8),
  field('unusable', 22, u8),
  field('padding', 23, reserved(1)),
]);
export type Segment = LayoutValue<typeof SEGMENT_LAYOUT>;

export const DTABLE_LAYOUT = struct('kvm_dtable', 16, [field('base', 0, u64), field('limit', 8, u16), field('padding', 10, reserved(6))]);
export type Dtable = LayoutValue<typeof DTABLE_LAYOUT>;

const segment = nested(SEGMENT_LAYOUT);
const dtable = nested(DTABLE_LAYOUT);

// kvm_sregs and kvm_sregs2 are identical up to apic_base; they differ only in what follows.
const SREGS_COMMON = [
  field('cs', 0, segment),
  field('ds', 24, segment),
  field('es', 48, segment),
  field('fs', 72, segment),
  field('gs', 96, segment),
  field('ss', 120, segment),
  field('tr', 144, segment),
  field('ldt', 168, segment),
  field('gdt', 192, dtable),
  field('idt', 208, dtable),
  field('cr0', 224, u64),
  field('cr2', 232, u64),
  field('cr3', 240, u64),
  field('cr4', 248, u64),
  field('cr8', 256, u64),
  field('efer', 264, u64),
  field('apicBase', 272, u64),
] as const;

/** KVM_NR_INTERRUPTS: interrupt_bitmap has one bit per vector, in 64-bit words. */
export const KVM_NR_INTERRUPTS = 256;

export const SREGS_LAYOUT = struct('kvm_sregs', 312, [...SREGS_COMMON, field('interruptBitmap', 280, array(u64, KVM_NR_INTERRUPTS / 64))]);
export type Sregs = LayoutValue<typeof SREGS_LAYOUT>;
export const SREGS_SIZE = SREGS_LAYOUT.size;
export const decodeSregs = SREGS_LAYOUT.decode;
export const encodeSregs = SREGS_LAYOUT.encode;

/** kvm_sregs2.flags: pdptrs hold the PAE page-directory pointers KVM loaded. */
export const KVM_SREGS2_FLAGS_PDPTRS_VALID = 1n;

export const SREGS2_LAYOUT = struct('kvm_sregs2', 320, [...SREGS_COMMON, field('flags', 280, u64), field('pdptrs', 288, array(u64, 4))]);
export type Sregs2 = LayoutValue<typeof SREGS2_LAYOUT>;
export const SREGS2_SIZE = SREGS2_LAYOUT.size;
export const decodeSregs2 = SREGS2_LAYOUT.decode;
export const encodeSregs2 = SREGS2_LAYOUT.encode;
