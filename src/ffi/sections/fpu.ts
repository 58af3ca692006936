/** struct kvm_fpu: KVM_GET_FPU / KVM_SET_FPU (the fxsave-format x87/SSE state). */
import { array, bytes, field, reserved, struct, u16, u32, u64, u8, type LayoutValue } from './struct';

export const FPU_LAYOUT = struct('kvm_fpu', 416, [
  field('fpr', 0, array(bytes(16), 8)),
  field('fcw', 128, u16),
  field('fsw', 130, u16),
  field('ftwx', 132, u8),
  field('pad1', 133, reserved(1)),
  field('lastOpcode', 134, u16),
  field('lastIp', 136, u64),
  field('lastDp', 144, u64),
  field('xmm', 152, array(bytes(16), 16)),
  field('mxcsr', 408, u32),
  field('pad2', 412, reserved(4)),
]);
export type Fpu = LayoutValue<typeof FPU_LAYOUT>;
export const FPU_SIZE = FPU_LAYOUT.size;
export const decodeFpu = FPU_LAYOUT.decode;
export const encodeFpu = FPU_LAYOUT.encode;
