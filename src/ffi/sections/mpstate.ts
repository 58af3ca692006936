/** struct kvm_mp_state: KVM_GET_MP_STATE / KVM_SET_MP_STATE. */
import { field, struct, u32, type LayoutValue } from './struct';

/** KVM_MP_STATE_* from <linux/kvm.h>, without the prefix. */
export const KVM_MP_STATE = {
  RUNNABLE: 0,
  UNINITIALIZED: 1,
  INIT_RECEIVED: 2,
  HALTED: 3,
  SIPI_RECEIVED: 4,
  STOPPED: 5,
  CHECK_STOP: 6,
  OPERATING: 7,
  LOAD: 8,
  AP_RESET_HOLD: 9,
  SUSPENDED: 10,
} as const;
export type MpStateName = keyof typeof KVM_MP_STATE;

const NAMES = new Map<number, MpStateName>(Object.entries(KVM_MP_STATE).map(([name, value]) => [value, name as MpStateName]));

/** 'RUNNABLE', 'HALTED', ... or the number in hex for a state this table does not know. */
export function mpStateName(value: number): MpStateName | string {
  return NAMES.get(value) ?? `0x${value.toString(16)}`;
}

export const MP_STATE_LAYOUT = struct('kvm_mp_state', 4, [field('mpState', 0, u32)]);
export type MpState = LayoutValue<typeof MP_STATE_LAYOUT>;
export const MP_STATE_SIZE = MP_STATE_LAYOUT.size;
export const decodeMpState = MP_STATE_LAYOUT.decode;
export const encodeMpState = MP_STATE_LAYOUT.encode;
