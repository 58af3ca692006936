/**
 * Byte-exact codec for KVM_GET/SET_NESTED_STATE blobs.
 *
 * Edits: decode, change the typed fields (or `header`/`data` bytes) of the returned object, encode. Encoding starts
 * from `raw`, lays `header` over it, then writes every typed header field and data area back. Untouched fields
 * rewrite their own bytes, so unknown header bytes (40..127, SVM padding) and anything past the data survive.
 * `*FlagNames` are derived views: encode reads the numeric flags only.
 */
import { cloneBytes, extentOf, readFields, writeFields, type FieldsOf } from './fields';
import {
  NESTED_FORMAT,
  NESTED_HEADER_FIELDS,
  NESTED_HEADER_SIZE,
  NESTED_MIN_DECODE_SIZE,
  SHADOW_VMCS12_OFFSET,
  SHADOW_VMCS12_SIZE,
  SVM_HEADER_FIELDS,
  VMCB12_OFFSET,
  VMCB12_SIZE,
  VMCS12_OFFSET,
  VMCS12_SIZE,
  VMX_HEADER_FIELDS,
  nestedFlagNames,
  vmxHdrFlagNames,
  vmxSmmFlagNames,
} from './layout';

export type NestedFormat = 'vmx' | 'svm' | number;

export type VmxNestedHeader = FieldsOf<typeof VMX_HEADER_FIELDS> & {
  smmFlagNames: string[];
  hdrFlagNames: string[];
};
export type SvmNestedHeader = FieldsOf<typeof SVM_HEADER_FIELDS>;

export interface NestedData {
  vmcs12?: Buffer;
  shadowVmcs12?: Buffer;
  vmcb12?: Buffer;
}

export interface NestedState {
  flags: number;
  flagNames: string[];
  /** 'vmx' / 'svm', or the raw number of an unknown format. */
  format: NestedFormat;
  /** The header's size field: the payload length KVM declares, not necessarily raw.length. */
  size: number;
  /** The first 128 bytes as given (fewer if the input was shorter); a copy. */
  header: Buffer;
  /** Present for format VMX when the input holds the VMX header fields. */
  vmx?: VmxNestedHeader;
  /** Present for format SVM when the input holds vmcb_pa. */
  svm?: SvmNestedHeader;
  /** Areas present only when both `size` and the input cover them completely; copies. */
  data: NestedData;
  /** The input buffer itself. */
  raw: Buffer;
}

export class NestedStateTooShortError extends Error {
  readonly code = 'NESTED_STATE_TOO_SHORT';
  constructor(readonly length: number) {
    super(`nested state blob is ${length} bytes: at least ${NESTED_MIN_DECODE_SIZE} (flags, format, size) are needed`);
    this.name = 'NestedStateTooShortError';
  }
}

interface DataArea {
  key: keyof NestedData;
  format: number;
  offset: number;
  size: number;
}

const DATA_AREAS: readonly DataArea[] = [
  { key: 'vmcs12', format: NESTED_FORMAT.VMX, offset: VMCS12_OFFSET, size: VMCS12_SIZE },
  { key: 'shadowVmcs12', format: NESTED_FORMAT.VMX, offset: SHADOW_VMCS12_OFFSET, size: SHADOW_VMCS12_SIZE },
  { key: 'vmcb12', format: NESTED_FORMAT.SVM, offset: VMCB12_OFFSET, size: VMCB12_SIZE },
];

const FORMAT_NAMES: Readonly<Record<number, 'vmx' | 'svm'>> = {
  [NESTED_FORMAT.VMX]: 'vmx',
  [NESTED_FORMAT.SVM]: 'svm',
};

export function formatNumber(format: NestedFormat): number {
  if (typeof format === 'number') return format;
  return format === 'vmx' ? NESTED_FORMAT.VMX : NESTED_FORMAT.SVM;
}

export function decodeNestedState(buf: Buffer): NestedState {
  if (buf.length < NESTED_MIN_DECODE_SIZE) throw new NestedStateTooShortError(buf.length);
  const { flags, format: formatNum, size } = readFields(buf, 0, NESTED_HEADER_FIELDS);
  const state: NestedState = {
    flags,
    flagNames: nestedFlagNames(flags),
    format: FORMAT_NAMES[formatNum] ?? formatNum,
    size,
    header: cloneBytes(buf, 0, NESTED_HEADER_SIZE),
    data: {},
    raw: buf,
  };
  if (formatNum === NESTED_FORMAT.VMX && buf.length >= extentOf(VMX_HEADER_FIELDS)) {
    const vmx = readFields(buf, 0, VMX_HEADER_FIELDS);
    state.vmx = { ...vmx, smmFlagNames: vmxSmmFlagNames(vmx.smmFlags), hdrFlagNames: vmxHdrFlagNames(vmx.hdrFlags) };
  } else if (formatNum === NESTED_FORMAT.SVM && buf.length >= extentOf(SVM_HEADER_FIELDS)) {
    state.svm = readFields(buf, 0, SVM_HEADER_FIELDS);
  }
  const end = Math.min(size, buf.length);
  for (const area of DATA_AREAS) {
    if (area.format === formatNum && end >= area.offset + area.size) {
      state.data[area.key] = cloneBytes(buf, area.offset, area.offset + area.size);
    }
  }
  return state;
}

export function encodeNestedState(s: NestedState): Buffer {
  const areas = DATA_AREAS.filter((a) => s.data[a.key] !== undefined);
  const needed = [
    s.raw.length,
    s.header.length,
    NESTED_MIN_DECODE_SIZE,
    s.vmx ? extentOf(VMX_HEADER_FIELDS) : 0,
    s.svm ? extentOf(SVM_HEADER_FIELDS) : 0,
    ...areas.map((a) => a.offset + a.size),
  ];
  const out = Buffer.alloc(Math.max(...needed));
  out.set(s.raw);
  out.set(s.header);
  writeFields(out, 0, NESTED_HEADER_FIELDS, { flags: s.flags, format: formatNumber(s.format), size: s.size });
  if (s.vmx) writeFields(out, 0, VMX_HEADER_FIELDS, s.vmx);
  if (s.svm) writeFields(out, 0, SVM_HEADER_FIELDS, s.svm);
  for (const area of areas) {
    const bytes = s.data[area.key] as Buffer;
    if (bytes.length !== area.size) {
      throw new RangeError(`data.${area.key} must be ${area.size} bytes, got ${bytes.length}`);
    }
    out.set(bytes, area.offset);
  }
  return out;
}
