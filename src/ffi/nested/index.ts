/** KVM nested-state blobs: layout constants, byte-exact codec, VMCB/vmcs12 inspection and SET pre-validation. */
export * from './layout';
export {
  decodeNestedState,
  encodeNestedState,
  formatNumber,
  NestedStateTooShortError,
  type NestedData,
  type NestedFormat,
  type NestedState,
  type SvmNestedHeader,
  type VmxNestedHeader,
} from './codec';
export * from './vmcb12';
export { decodeVmcs12, type Vmcs12 } from './vmcs12';
export {
  NESTED_RULE_IDS,
  NESTED_RULES,
  validateNestedState,
  validateNestedStructure,
  type NestedRuleId,
  type NestedTarget,
  type NestedViolation,
} from './validate';
export { bitNames, type BitTable, type FieldSpec, type FieldsOf, type Width } from './fields';
