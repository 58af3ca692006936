/**
 * The vCPU's TSC frequency in kHz. KVM_GET/SET_TSC_KHZ pass it by value, not in a struct; the
 * 4-byte little-endian u32 form gives it the same bytes-in/bytes-out shape as every other section.
 */
import { field, struct, u32, unwrap } from './struct';

export const TSC_KHZ_LAYOUT = struct('tsc_khz', 4, [field('khz', 0, u32)]);
export const TSC_KHZ = unwrap(TSC_KHZ_LAYOUT, 'khz');
export const TSC_KHZ_SIZE = TSC_KHZ.size;
export const decodeTscKhz = TSC_KHZ.decode;
export const encodeTscKhz = TSC_KHZ.encode;
