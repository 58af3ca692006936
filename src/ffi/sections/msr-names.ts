/**
 * Names for well-known MSR indices, for humans reading KVM_GET_MSRS output. Architectural names
 * drop the kernel's MSR_/MSR_IA32_ prefix; the KVM paravirtual ones keep KVM_ (they are
 * MSR_KVM_* in <asm/kvm_para.h>).
 */
export const MSR = {
  TSC: 0x10,
  KVM_WALL_CLOCK: 0x11,
  KVM_SYSTEM_TIME: 0x12,
  APIC_BASE: 0x1b,
  FEATURE_CONTROL: 0x3a,
  SYSENTER_CS: 0x174,
  SYSENTER_ESP: 0x175,
  SYSENTER_EIP: 0x176,
  MISC_ENABLE: 0x1a0,
  PAT: 0x277,
  TSC_DEADLINE: 0x6e0,
  KVM_WALL_CLOCK_NEW: 0x4b564d00,
  KVM_SYSTEM_TIME_NEW: 0x4b564d01,
  KVM_ASYNC_PF_EN: 0x4b564d02,
  KVM_STEAL_TIME: 0x4b564d03,
  KVM_PV_EOI_EN: 0x4b564d04,
  KVM_POLL_CONTROL: 0x4b564d05,
  KVM_ASYNC_PF_INT: 0x4b564d06,
  KVM_ASYNC_PF_ACK: 0x4b564d07,
  KVM_MIGRATION_CONTROL: 0x4b564d08,
  EFER: 0xc0000080,
  STAR: 0xc0000081,
  LSTAR: 0xc0000082,
  CSTAR: 0xc0000083,
  SFMASK: 0xc0000084,
  FS_BASE: 0xc0000100,
  GS_BASE: 0xc0000101,
  KERNEL_GS_BASE: 0xc0000102,
  TSC_AUX: 0xc0000103,
  VM_CR: 0xc0010114,
  VM_HSAVE_PA: 0xc0010117,
} as const;
export type MsrName = keyof typeof MSR;

export const MSR_NAMES: ReadonlyMap<number, MsrName> = new Map(Object.entries(MSR).map(([name, index]) => [index, name as MsrName]));

/** The MSR's name, or its index as hex ('0xc0010015') when the table does not know it. */
export function msrName(index: number): MsrName | string {
  return MSR_NAMES.get(index) ?? `0x${index.toString(16)}`;
}
