/**
 * KVM_GET_NESTED_STATE bytes -> NestedState (protos/vcpud/v1/nested.proto): `raw` exactly as given plus the
 * read-only decoded view from src/ffi/nested (header, VMX/SVM header, vmcs12 / shadow vmcs12 or vmcb12).
 */
import { invalidArgument } from '../../errors';
import {
  decodeNestedState,
  decodeVmcb12,
  decodeVmcs12,
  formatNumber,
  NESTED_FORMAT,
  NestedStateTooShortError,
  VMCB_SEGMENT_NAMES,
  VMCB_NESTED_CTL,
  type NestedState as Decoded,
  type Vmcb12 as DecodedVmcb12,
  type VmcbControl as DecodedControl,
  type VmcbSave as DecodedSave,
  type VmcbSegment as DecodedSegment,
} from '../../ffi/nested';
import type { NestedFormat } from '../../api/generated/vcpud/v1/NestedFormat';
import type { NestedState } from '../../api/generated/vcpud/v1/NestedState';
import type { Vmcb12 } from '../../api/generated/vcpud/v1/Vmcb12';
import type { VmcbControl } from '../../api/generated/vcpud/v1/VmcbControl';
import type { VmcbSave } from '../../api/generated/vcpud/v1/VmcbSave';
import type { VmcbSegment } from '../../api/generated/vcpud/v1/VmcbSegment';
import type { Vmcs12 } from '../../api/generated/vcpud/v1/Vmcs12';
import { camelCase } from '../../case';
import { RULES } from './scalars';

/** Decoder field names (snake_case) the proto carries under their camelCase key; u64 become decimal strings. */
const CONTROL_FIELDS = [
  'intercept_cr_read',
  'intercept_cr_write',
  'intercept_dr_read',
  'intercept_dr_write',
  'intercept_exceptions',
  'pause_filter_thresh',
  'pause_filter_count',
  'iopm_base_pa',
  'msrpm_base_pa',
  'tsc_offset',
  'asid',
  'tlb_ctl',
  'int_ctl',
  'int_vector',
  'int_state',
  'exit_code',
  'exit_info_1',
  'exit_info_2',
  'exit_int_info',
  'exit_int_info_err',
  'nested_ctl',
  'event_inj',
  'event_inj_err',
  'nested_cr3',
  'virt_ext',
  'clean',
  'next_rip',
  'insn_len',
] as const satisfies readonly (keyof DecodedControl)[];

/** Intercept vectors 3, 4, 5: VmcbControl.intercept_words, named in VmcbControl.intercepts. */
const INTERCEPT_WORDS = ['intercept_word3', 'intercept_word4', 'intercept_word5'] as const satisfies readonly (keyof DecodedControl)[];

const SAVE_FIELDS = [
  'cpl',
  'efer',
  'cr0',
  'cr2',
  'cr3',
  'cr4',
  'dr6',
  'dr7',
  'rflags',
  'rip',
  'rsp',
  'rax',
  'star',
  'lstar',
  'cstar',
  'sfmask',
  'kernel_gs_base',
  'sysenter_cs',
  'sysenter_esp',
  'sysenter_eip',
  'g_pat',
] as const satisfies readonly (keyof DecodedSave)[];

const SEGMENT_FIELDS = ['selector', 'attrib', 'limit', 'base'] as const satisfies readonly (keyof DecodedSegment)[];

const FORMATS: Readonly<Record<number, NestedFormat>> = {
  [NESTED_FORMAT.VMX]: 'NESTED_FORMAT_VMX',
  [NESTED_FORMAT.SVM]: 'NESTED_FORMAT_SVM',
};

const wire = (v: number | bigint): number | string => (typeof v === 'bigint' ? v.toString() : v);

/** `names` of a decoded table, keyed as proto-loader spells the proto fields. */
function pick<T extends object>(decoded: T, names: readonly (keyof T & string)[]): Record<string, number | string> {
  return Object.fromEntries(names.map((n) => [camelCase(n), wire(decoded[n] as number | bigint)]));
}

function vmcbControl(v: DecodedVmcb12): VmcbControl {
  return {
    ...pick(v.control, CONTROL_FIELDS),
    intercepts: INTERCEPT_WORDS.flatMap((w) => v.controlBits[w]),
    interceptWords: INTERCEPT_WORDS.map((w) => v.control[w]),
    npEnabled: (v.control.nested_ctl & BigInt(VMCB_NESTED_CTL.NP_ENABLE)) !== 0n,
  };
}

function vmcbSave(save: DecodedSave): VmcbSave {
  const segments = Object.fromEntries(VMCB_SEGMENT_NAMES.map((s) => [s, pick(save[s], SEGMENT_FIELDS) as VmcbSegment]));
  return { ...pick(save, SAVE_FIELDS), ...segments };
}

function vmcb12(bytes: Buffer): Vmcb12 {
  const v = decodeVmcb12(bytes);
  return { control: vmcbControl(v), save: vmcbSave(v.save) };
}

function vmcs12(bytes: Buffer | undefined): Vmcs12 | null {
  if (!bytes) return null;
  const v = decodeVmcs12(bytes);
  return { revisionId: v.revisionId, raw: v.raw };
}

function decode(raw: Buffer): Decoded {
  try {
    return decodeNestedState(raw);
  } catch (e) {
    if (!(e instanceof NestedStateTooShortError)) throw e;
    throw invalidArgument(`raw: ${e.message}`, [{ rule: RULES.length, field: 'raw', message: e.message }]);
  }
}

function headerView(s: Decoded): Partial<NestedState> {
  if (s.vmx) {
    const v = s.vmx;
    return {
      headerView: 'vmx',
      vmx: {
        vmxonPa: wire(v.vmxonPa),
        vmcs12Pa: wire(v.vmcs12Pa),
        smmFlags: v.smmFlags,
        smmFlagNames: v.smmFlagNames,
        flags: v.hdrFlags,
        flagNames: v.hdrFlagNames,
        preemptionTimerDeadline: wire(v.preemptionTimerDeadline),
      },
    };
  }
  return s.svm ? { headerView: 'svm', svm: { vmcbPa: wire(s.svm.vmcbPa) } } : {};
}

function dataView(s: Decoded): Partial<NestedState> {
  if (s.data.vmcb12) return { dataView: 'vmcb12', vmcb12: vmcb12(s.data.vmcb12) };
  if (s.data.vmcs12) return { dataView: 'vmcs12', vmcs12: vmcs12(s.data.vmcs12) };
  return {};
}

/**
 * The NestedState message of a kvm_nested_state blob. Vmcs12.revision_id is what KVM compares with
 * VMCS12_REVISION: the first u32 without bit 31 (set in a shadow vmcs12); the full word is in its raw bytes.
 * invalid_argument (field "raw") when the blob is shorter than the 8 bytes of flags, format and size.
 */
export function nestedToProto(raw: Buffer): NestedState {
  const copy = Buffer.alloc(raw.length);
  copy.set(raw);
  const s = decode(copy);
  const formatValue = formatNumber(s.format);
  return {
    raw: copy,
    flags: s.flags,
    flagNames: s.flagNames,
    format: FORMATS[formatValue] ?? 'NESTED_FORMAT_UNSPECIFIED',
    formatValue,
    size: s.size,
    header: s.header,
    ...headerView(s),
    ...dataView(s),
    shadowVmcs12: vmcs12(s.data.shadowVmcs12),
  };
}
