/** struct kvm_xcrs (array of struct kvm_xcr): KVM_GET_XCRS / KVM_SET_XCRS. */
import { array, field, nested, reserved, struct, u32, u64, type LayoutValue } from './struct';

export const KVM_MAX_XCRS = 16;

export const XCR_LAYOUT = struct('kvm_xcr', 16, [field('xcr', 0, u32), field('reserved', 4, reserved(4)), field('value', 8, u64)]);
export type Xcr = LayoutValue<typeof XCR_LAYOUT>;

// The whole fixed array is decoded: only the first nrXcrs entries are meaningful, but the rest
// must survive a round trip all the same.
export const XCRS_LAYOUT = struct('kvm_xcrs', 392, [
  field('nrXcrs', 0, u32),
  field('flags', 4, u32),
  field('xcrs', 8, array(nested(XCR_LAYOUT), KVM_MAX_XCRS)),
  field('padding', 264, reserved(128)),
]);
export type Xcrs = LayoutValue<typeof XCRS_LAYOUT>;
export const XCRS_SIZE = XCRS_LAYOUT.size;
export const decodeXcrs = XCRS_LAYOUT.decode;
export const encodeXcrs = XCRS_LAYOUT.encode;
