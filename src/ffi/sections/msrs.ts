/**
 * struct kvm_msrs (KVM_GET/SET_MSRS) and struct kvm_msr_list (KVM_GET_MSR_INDEX_LIST,
 * KVM_GET_MSR_FEATURE_INDEX_LIST): a u32 count header followed by the entries.
 * KVM_GET/SET_MSRS return how many entries they processed; decodeMsrs returns all `nmsrs`
 * entries, so the caller keeps only that many.
 */
import { field, list, nested, reserved, struct, u32, u64, type LayoutValue } from './struct';

export const MSR_ENTRY_LAYOUT = struct('kvm_msr_entry', 16, [field('index', 0, u32), field('reserved', 4, reserved(4)), field('data', 8, u64)]);
export type MsrEntry = LayoutValue<typeof MSR_ENTRY_LAYOUT>;
export const MSR_ENTRY_SIZE = MSR_ENTRY_LAYOUT.size;

export const MSRS_HEADER_LAYOUT = struct('kvm_msrs', 8, [field('nmsrs', 0, u32), field('pad', 4, reserved(4))]);
export const MSRS = list(MSRS_HEADER_LAYOUT, 'nmsrs', 'entries', nested(MSR_ENTRY_LAYOUT));
export const MSRS_HEADER_SIZE = MSRS.size;
export const msrsSize = MSRS.sizeFor;
export const decodeMsrs = MSRS.decode;
export const encodeMsrs = MSRS.encode;

export const MSR_LIST_HEADER_LAYOUT = struct('kvm_msr_list', 4, [field('nmsrs', 0, u32)]);
export const MSR_INDEX_LIST = list(MSR_LIST_HEADER_LAYOUT, 'nmsrs', 'indices', u32);
export const msrIndexListSize = MSR_INDEX_LIST.sizeFor;
export const decodeMsrIndexList = MSR_INDEX_LIST.decode;
export const encodeMsrIndexList = MSR_INDEX_LIST.encode;
