/**
 * struct kvm_xsave: KVM_GET_XSAVE / KVM_GET_XSAVE2 / KVM_SET_XSAVE. Kept as raw bytes: component
 * offsets follow the host's CPUID leaf 0xD, and KVM_GET_XSAVE2 returns more than 4096 bytes when
 * KVM_CAP_XSAVE2 says so. inspectXsave reads the legacy region and the XSAVE header.
 */
import { field, raw, struct, u16, u32, u64, type LayoutValue } from './struct';

export const XSAVE = raw('kvm_xsave', 4096, false);
/** The minimum (struct kvm_xsave); a buffer may be larger. */
export const XSAVE_SIZE = XSAVE.size;
export const decodeXsave = XSAVE.decode;
export const encodeXsave = XSAVE.encode;

// Legacy FXSAVE region (512 bytes) followed by the 64-byte XSAVE header (Intel SDM vol. 1 13.4).
export const XSAVE_HEADER_LAYOUT = struct('xsave legacy region and header', 576, [
  field('fcw', 0, u16),
  field('fsw', 2, u16),
  field('mxcsr', 24, u32),
  field('xstateBv', 512, u64),
  field('xcompBv', 520, u64),
]);
export type XsaveInfo = LayoutValue<typeof XSAVE_HEADER_LAYOUT>;

export function inspectXsave(buf: Buffer): XsaveInfo {
  // Read in place: XSAVE.decode would copy the whole area (every GetState) only to check its length.
  if (buf.length < XSAVE.size) XSAVE.decode(buf); // throws the codec's length error
  return XSAVE_HEADER_LAYOUT.read(buf);
}
