/**
 * Pure conversions between the vcpud.v1 proto messages (proto-loader objects: keepCase false, longs String,
 * enums String, defaults, oneofs) and vcpud's internal types. No I/O; bad input is invalid_argument with one
 * Violation per bad field, named by its proto path.
 */
export { capabilitiesToProto } from './capabilities';
export { nestedToProto } from './nested';
export { Checker, checked, RULES, safeNumber, u64, U64_MAX, type LongLike, type U64Input } from './scalars';
export {
  MAX_CPUID_ENTRIES,
  sectionFromProto,
  sectionsFromProto,
  sectionToProto,
  stateFromProto,
  stateToProto,
  type StateExtras,
  type StateSectionName,
} from './state';
export { exitReasonName, timestampToProto, vcpuToProto, vmToProto } from './vm';
