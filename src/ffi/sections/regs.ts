/** struct kvm_regs: KVM_GET_REGS / KVM_SET_REGS. */
import { field, struct, u64, type LayoutValue } from './struct';

export const REGS_LAYOUT = struct('kvm_regs', 144, [
  field('rax', 0, u64),
  field('rbx', 8, u64),
  field('rcx', 16, u64),
  field('rdx', 24, u64),
  field('rsi', 32, u64),
  field('rdi', 40, u64),
  field('rsp', 48, u64),
  field('rbp', 56, u64),
  field('r8', 64, u64),
  field('r9', 72, u64),
  field('r10', 80, u64),
  field('r11', 88, u64),
  field('r12', 96, u64),
  field('r13', 104, u64),
  field('r14', 112, u64),
  field('r15', 120, u64),
  field('rip', 128, u64),
  field('rflags', 136, u64),
]);
export type Regs = LayoutValue<typeof REGS_LAYOUT>;
export const REGS_SIZE = REGS_LAYOUT.size;
export const decodeRegs = REGS_LAYOUT.decode;
export const encodeRegs = REGS_LAYOUT.encode;
