/** struct kvm_debugregs: KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS. */
import { array, field, reserved, struct, u64, type LayoutValue } from './struct';

export const DEBUGREGS_LAYOUT = struct('kvm_debugregs', 128, [
  field('db', 0, array(u64, 4)),
  field('dr6', 32, u64),
  field('dr7', 40, u64),
  field('flags', 48, u64),
  field('reserved', 56, reserved(72)),
]);
export type Debugregs = LayoutValue<typeof DEBUGREGS_LAYOUT>;
export const DEBUGREGS_SIZE = DEBUGREGS_LAYOUT.size;
export const decodeDebugregs = DEBUGREGS_LAYOUT.decode;
export const encodeDebugregs = DEBUGREGS_LAYOUT.encode;
