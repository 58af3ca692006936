/**
 * vCPU state sections <-> VcpuState (protos/vcpud/v1/state.proto).
 *
 * Naming rule (common.proto): section `vcpu_events` is enum value STATE_SECTION_VCPU_EVENTS and VcpuState field
 * vcpu_events (proto-loader key vcpuEvents); the enum number is the section's position in SECTION_NAMES + 1.
 *
 * stateFromProto validates every field of every present section and throws one invalid_argument listing all
 * violations (field paths like "state.sregs.cs.dpl"). The proto does not carry every byte of the ffi values:
 *   - bool fields are u8 in KVM (0/1 in practice); `true` keeps a non-zero base byte, otherwise becomes 1;
 *   - xcrs entries beyond the listed ones (kvm_xcrs has 16 slots, nr_xcrs of them meaningful);
 *   - a sub-message left unset (e.g. sregs.cs null) is taken whole;
 * those come from `base` (the section's current value read from the vCPU) when given, else are zero. XSAVE
 * raw bytes shorter than the base are zero-padded to its length (the host's xsave_size), longer ones rejected.
 * With the values of a real vCPU as base, stateFromProto(stateToProto(v), v) deep-equals v.
 */
import {
  inspectLapic,
  inspectXsave,
  isSectionName,
  KVM_MAX_XCRS,
  KVM_MP_STATE,
  MSR_NAMES,
  SECTION_NAMES,
  SECTIONS,
  type CpuidEntry2,
  type Debugregs,
  type Dtable,
  type Fpu,
  type LapicInfo,
  type MpStateName,
  type MsrEntry,
  type Regs,
  type SectionName,
  type SectionValues,
  type Segment,
  type Sregs,
  type Sregs2,
  type VcpuEvents,
  type Xcr,
  type Xcrs,
  type XsaveInfo,
} from '../../ffi/sections';
import type { CpuidEntry__Output } from '../../api/generated/vcpud/v1/CpuidEntry';
import type { DebugRegs__Output } from '../../api/generated/vcpud/v1/DebugRegs';
import type { DescriptorTable__Output } from '../../api/generated/vcpud/v1/DescriptorTable';
import type { Fpu__Output } from '../../api/generated/vcpud/v1/Fpu';
import type { Lapic__Output } from '../../api/generated/vcpud/v1/Lapic';
import type { MsrEntry__Output } from '../../api/generated/vcpud/v1/MsrEntry';
import type { Regs__Output } from '../../api/generated/vcpud/v1/Regs';
import type { Segment__Output } from '../../api/generated/vcpud/v1/Segment';
import type { Sregs__Output } from '../../api/generated/vcpud/v1/Sregs';
import type { Sregs2__Output } from '../../api/generated/vcpud/v1/Sregs2';
import type { StateSection__Output } from '../../api/generated/vcpud/v1/StateSection';
import type {
  VcpuEvents__Output,
  _vcpud_v1_VcpuEvents_Exception__Output as Exception__Output,
  _vcpud_v1_VcpuEvents_Interrupt__Output as Interrupt__Output,
  _vcpud_v1_VcpuEvents_Nmi__Output as Nmi__Output,
  _vcpud_v1_VcpuEvents_Smi__Output as Smi__Output,
} from '../../api/generated/vcpud/v1/VcpuEvents';
import type { VcpuState, VcpuState__Output } from '../../api/generated/vcpud/v1/VcpuState';
import type { Xcr__Output } from '../../api/generated/vcpud/v1/Xcr';
import type { Xcrs__Output } from '../../api/generated/vcpud/v1/Xcrs';
import type { Xsave__Output } from '../../api/generated/vcpud/v1/Xsave';
import { array, BOOL, bytes, fields, fill, fromProto, struct, toProto, U64, uint, uniform, type Fields } from './schema';
import { camelCase } from '../../case';
import { checked, type Checker, RULES } from './scalars';

/** What GetState knows beyond the section values. */
export interface StateExtras {
  /** Requested MSR indices KVM_GET_MSRS refused (Msrs.unreadable_indices). */
  msrsUnreadable?: number[];
}

/** KVM_MAX_CPUID_ENTRIES. */
export const MAX_CPUID_ENTRIES = 256;

// ---- sections <-> StateSection ----

const SECTION_PREFIX = 'STATE_SECTION_';
export type StateSectionName = Exclude<StateSection__Output, 'STATE_SECTION_UNSPECIFIED'>;

export function sectionToProto(name: SectionName): StateSectionName {
  return `${SECTION_PREFIX}${name.toUpperCase()}` as StateSectionName;
}

/** The section a StateSection value (its name, or its number as proto-loader passes unknown values) names. */
function sectionOf(s: string | number): SectionName | undefined {
  if (typeof s === 'number') return Number.isInteger(s) && s >= 1 ? SECTION_NAMES[s - 1] : undefined;
  const name = s.startsWith(SECTION_PREFIX) ? s.slice(SECTION_PREFIX.length).toLowerCase() : '';
  return isSectionName(name) && sectionToProto(name) === s ? name : undefined;
}

function checkSection(c: Checker, s: string | number, field: string): SectionName {
  const name = sectionOf(s);
  if (name) return name;
  c.add(RULES.enum, field, `${JSON.stringify(s)} is not a state section: expected one of ${SECTION_NAMES.map(sectionToProto).join(', ')}`);
  return SECTION_NAMES[0];
}

/** 'STATE_SECTION_VCPU_EVENTS' -> 'vcpu_events'; UNSPECIFIED or unknown -> invalid_argument naming `field`. */
export function sectionFromProto(s: string | number, field = 'sections'): SectionName {
  return checked((c) => checkSection(c, s, field));
}

/** A repeated StateSection field: every bad entry is reported (as field[i]) in one invalid_argument. */
export function sectionsFromProto(list: readonly (string | number)[], field = 'sections'): SectionName[] {
  return checked((c) => list.map((s, i) => checkSection(c, s, `${field}[${i}]`)));
}

// ---- field tables ----

type Obj = Record<string, unknown>;

const REGS = uniform<Regs, Regs__Output>(
  ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'],
  U64,
);

const SEGMENT = struct([
  ...fields<Segment, Segment__Output>(['base', U64], ['limit', uint(32)], ['selector', uint(16)], ['type', uint(4)], ['dpl', uint(2)]),
  ...uniform<Segment, Segment__Output>(['present', 'db', 's', 'l', 'g', 'avl', 'unusable'], BOOL),
]);
const DTABLE = struct(fields<Dtable, DescriptorTable__Output>(['base', U64], ['limit', uint(16)]));

/** kvm_sregs and kvm_sregs2 share everything up to apic_base. */
const SREGS_COMMON: Fields = [
  ...uniform<Sregs & Sregs2, Sregs__Output & Sregs2__Output>(['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'], SEGMENT),
  ...uniform<Sregs & Sregs2, Sregs__Output & Sregs2__Output>(['gdt', 'idt'], DTABLE),
  ...uniform<Sregs & Sregs2, Sregs__Output & Sregs2__Output>(['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'], U64),
];
const SREGS: Fields = [...SREGS_COMMON, ...fields<Sregs, Sregs__Output>(['interruptBitmap', array(U64, 4)])];
const SREGS2: Fields = [...SREGS_COMMON, ...fields<Sregs2, Sregs2__Output>(['flags', U64], ['pdptrs', array(U64, 4)])];

const FPU = fields<Fpu, Fpu__Output>(
  ['fpr', array(bytes(16), 8)],
  ['fcw', uint(16)],
  ['fsw', uint(16)],
  ['ftwx', uint(8)],
  ['lastOpcode', uint(16)],
  ['lastIp', U64],
  ['lastDp', U64],
  ['xmm', array(bytes(16), 16)],
  ['mxcsr', uint(32)],
);

const DEBUGREGS = fields<Debugregs, DebugRegs__Output>(['db', array(U64, 4)], ['dr6', U64], ['dr7', U64], ['flags', U64]);

type Exception = VcpuEvents['exception'];
const EXCEPTION = fields<Exception, Exception__Output>(['injected', BOOL], ['nr', uint(8)], ['hasErrorCode', BOOL], ['pending', BOOL], ['errorCode', uint(32)]);
/** kvm_vcpu_events keeps the payload beside the exception struct; the proto puts it inside Exception. */
const EXCEPTION_PAYLOAD = fields<VcpuEvents, Exception__Output>(['exceptionHasPayload', BOOL, 'hasPayload'], ['exceptionPayload', U64, 'payload']);
/** kvm_vcpu_events.triple_fault.pending is VcpuEvents.triple_fault_pending. */
const TRIPLE_FAULT = fields<VcpuEvents['tripleFault'], VcpuEvents__Output>(['pending', BOOL, 'tripleFaultPending']);
const EVENTS = fields<VcpuEvents, VcpuEvents__Output>(
  ['interrupt', struct(fields<VcpuEvents['interrupt'], Interrupt__Output>(['injected', BOOL], ['nr', uint(8)], ['soft', BOOL], ['shadow', uint(8)]))],
  ['nmi', struct(uniform<VcpuEvents['nmi'], Nmi__Output>(['injected', 'pending', 'masked'], BOOL))],
  ['sipiVector', uint(32)],
  ['flags', uint(32)],
  ['smi', struct(uniform<VcpuEvents['smi'], Smi__Output>(['smm', 'pending', 'smmInsideNmi', 'latchedInit'], BOOL))],
);

const XCR = fields<Xcr, Xcr__Output>(['xcr', uint(32)], ['value', U64]);
const XCRS = fields<Xcrs, Xcrs__Output>(['flags', uint(32)]);
const MSR_ENTRY = fields<MsrEntry, MsrEntry__Output>(['index', uint(32)], ['data', U64]);
const CPUID_ENTRY = uniform<CpuidEntry2, CpuidEntry__Output>(['function', 'index', 'flags', 'eax', 'ebx', 'ecx', 'edx'], uint(32));

const XSAVE_INFO = fields<XsaveInfo, Xsave__Output>(['xstateBv', U64], ['xcompBv', U64], ['mxcsr', uint(32)], ['fcw', uint(16)]);
const LAPIC_INFO = [
  ...uniform<LapicInfo, Lapic__Output>(['apicId', 'version', 'tpr', 'svr', 'ldr', 'lvtTimer'], uint(32)),
  ...fields<LapicInfo, Lapic__Output>(['tmict', uint(32), 'timerInitialCount'], ['tmcct', uint(32), 'timerCurrentCount'], ['tdcr', uint(32), 'timerDivide']),
];

/** The field tables GetState's byte-level encoder (raw-state.ts) joins with the ffi layouts. */
export const FIELD_TABLES = {
  REGS,
  SREGS,
  SREGS2,
  FPU,
  DEBUGREGS,
  EVENTS,
  EXCEPTION,
  EXCEPTION_PAYLOAD,
  TRIPLE_FAULT,
  XCR,
  XCRS,
  CPUID_ENTRY,
  XSAVE_INFO,
  LAPIC_INFO,
} as const;

// ---- per-section converters ----

interface Converter<V> {
  toProto(v: V, extras: StateExtras): Obj;
  fromProto(p: Obj, base: V | undefined, c: Checker, path: string): V;
}

/** A section that is one message of `table`. */
const table = <V>(table: Fields): Converter<V> => ({
  toProto: (v) => toProto(table, v as Obj),
  fromProto: (p, base, c, path) => fromProto(table, p, base as Obj | undefined, c, path) as V,
});

const listToProto = (table: Fields, list: readonly unknown[]): Obj[] => list.map((e) => toProto(table, e as Obj));

function listFromProto<E>(table: Fields, p: unknown, base: readonly E[] | undefined, c: Checker, path: string, max: number): E[] {
  return c.list(p as Obj[] | undefined, path, max).map((e, i) => fromProto(table, e, base?.[i] as Obj | undefined, c, `${path}[${i}]`) as E);
}

/**
 * A section kept as raw bytes plus an output-only inspection: at least the codec's size, exactly when it is
 * fixed; with a base, at most the base's length and zero-padded to it.
 */
function rawSection(name: 'xsave' | 'lapic', info: Fields, inspect: (buf: Buffer) => object): Converter<Buffer> {
  const { size, fixedSize } = SECTIONS[name];
  return {
    toProto: (v) => ({ raw: fill(bytes(v.length), v), ...toProto(info, inspect(v) as Obj) }),
    fromProto(p, base, c, path) {
      const max = fixedSize ? size : Math.max(size, base?.length ?? Infinity);
      const raw = c.bytes(p.raw, `${path}.raw`, size, max);
      if (!base || raw.length >= base.length) return raw;
      const padded = Buffer.alloc(base.length);
      padded.set(raw);
      return padded;
    },
  };
}

/** MpState's names are KVM_MP_STATE_*'s with this prefix; NAMES: the name of each KVM value. */
export const MP_STATE_PREFIX = 'MP_STATE_';
export const MP_STATE_NAMES = new Map(Object.entries(KVM_MP_STATE).map(([name, value]) => [value as number, name]));

/** The KVM value of a named MpState; undefined for MP_STATE_UNSPECIFIED. Enum number n is KVM value n - 1. */
function mpStateValue(value: unknown, c: Checker, field: string): number | undefined {
  if (typeof value === 'number' && Number.isInteger(value) && value >= 0) return value === 0 ? undefined : value - 1;
  const name = typeof value === 'string' && value.startsWith(MP_STATE_PREFIX) ? value.slice(MP_STATE_PREFIX.length) : '';
  if (name === 'UNSPECIFIED') return undefined;
  if (name in KVM_MP_STATE) return KVM_MP_STATE[name as MpStateName];
  c.add(RULES.enum, field, `${JSON.stringify(value)} is not an MpState`);
  return 0;
}

const CONVERTERS: { readonly [N in SectionName]: Converter<SectionValues[N]> } = {
  regs: table(REGS),
  sregs: table(SREGS),
  sregs2: table(SREGS2),
  fpu: table(FPU),
  xsave: rawSection('xsave', XSAVE_INFO, inspectXsave),
  xcrs: {
    toProto: (v) => ({ ...toProto(XCRS, v), xcrs: listToProto(XCR, v.xcrs.slice(0, Math.min(v.nrXcrs, KVM_MAX_XCRS))) }),
    fromProto(p, base, c, path) {
      const listed = listFromProto<Xcr>(XCR, p.xcrs, base?.xcrs, c, `${path}.xcrs`, KVM_MAX_XCRS);
      const rest = fill(array(struct(XCR), KVM_MAX_XCRS), base?.xcrs) as Xcr[];
      const xcrs = rest.map((e, i) => listed[i] ?? e);
      return { ...(fromProto(XCRS, p, base, c, path) as Pick<Xcrs, 'flags'>), nrXcrs: listed.length, xcrs };
    },
  },
  msrs: {
    toProto: (v, extras) => ({
      entries: v.map((e) => Object.assign(toProto(MSR_ENTRY, e), { name: MSR_NAMES.get(e.index) ?? '' })),
      unreadableIndices: [...(extras.msrsUnreadable ?? [])],
    }),
    fromProto: (p, _base, c, path) => listFromProto<MsrEntry>(MSR_ENTRY, p.entries, undefined, c, `${path}.entries`, Infinity),
  },
  lapic: rawSection('lapic', LAPIC_INFO, inspectLapic),
  vcpu_events: {
    toProto: (v) => ({
      ...toProto(EVENTS, v),
      ...toProto(TRIPLE_FAULT, v.tripleFault),
      exception: { ...toProto(EXCEPTION, v.exception), ...toProto(EXCEPTION_PAYLOAD, v) },
    }),
    fromProto(p, base, c, path) {
      const exception = p.exception as Obj | null;
      return {
        ...(fromProto(EVENTS, p, base, c, path) as Omit<VcpuEvents, 'exception' | 'tripleFault' | 'exceptionHasPayload' | 'exceptionPayload'>),
        ...(fromProto(EXCEPTION_PAYLOAD, exception, base, c, `${path}.exception`) as Pick<VcpuEvents, 'exceptionHasPayload' | 'exceptionPayload'>),
        exception: fromProto(EXCEPTION, exception, base?.exception, c, `${path}.exception`) as Exception,
        tripleFault: fromProto(TRIPLE_FAULT, p, base?.tripleFault, c, path) as VcpuEvents['tripleFault'],
      };
    },
  },
  debugregs: table(DEBUGREGS),
  mp_state: {
    toProto: (v) => ({
      value: MP_STATE_PREFIX + (MP_STATE_NAMES.get(v.mpState) ?? 'UNSPECIFIED'),
      kvmValue: v.mpState,
    }),
    fromProto: (p, _base, c, path) => ({
      mpState: mpStateValue(p.value, c, `${path}.value`) ?? c.uint(p.kvmValue, 32, `${path}.kvm_value`),
    }),
  },
  cpuid2: {
    toProto: (v) => ({ entries: listToProto(CPUID_ENTRY, v) }),
    fromProto: (p, base, c, path) => listFromProto<CpuidEntry2>(CPUID_ENTRY, p.entries, base, c, `${path}.entries`, MAX_CPUID_ENTRIES),
  },
  tsc_khz: {
    toProto: (v) => ({ khz: v }),
    fromProto: (p, _base, c, path) => c.uint(p.khz, 32, `${path}.khz`),
  },
};

// ---- whole state ----

/** The VcpuState field (proto-loader key) of a section. */
const PROTO_KEYS = new Map(SECTION_NAMES.map((n) => [n, camelCase(n) as keyof VcpuState__Output]));
export const protoKey = (name: SectionName): keyof VcpuState__Output => PROTO_KEYS.get(name)!;

/** One section's VcpuState message, as a proto-loader object. */
export function sectionMessage<N extends SectionName>(name: N, v: SectionValues[N], extras: StateExtras): Obj {
  return CONVERTERS[name].toProto(v, extras);
}

/** Every section present in `values` as its VcpuState field: u64s as decimal strings, raw sections byte-exact. */
export function stateToProto(values: Partial<SectionValues>, extras: StateExtras = {}): VcpuState {
  const out: Obj = {};
  for (const name of SECTION_NAMES) {
    const v = values[name];
    if (v !== undefined) out[protoKey(name)] = sectionMessage(name, v, extras);
  }
  return out as VcpuState;
}

function parse<N extends SectionName>(name: N, p: Obj, base: Partial<SectionValues> | undefined, c: Checker): SectionValues[N] {
  return parseSection(name, p, base?.[name], c);
}

/** One section of a request's VcpuState, checked into `c`, its uncarried bytes from `base` (its current value). */
export function parseSection<N extends SectionName>(name: N, p: Obj, base: SectionValues[N] | undefined, c: Checker): SectionValues[N] {
  return CONVERTERS[name].fromProto(p, base, c, `state.${name}`);
}

/**
 * The sections present (non-null) in `p`, validated; one invalid_argument lists every violation. Fields the
 * proto does not carry come from `base` (the current values of the same sections), else are zero.
 */
export function stateFromProto(p: VcpuState__Output, base?: Partial<SectionValues>): Partial<SectionValues> {
  return checked((c) => {
    const out: Partial<Record<SectionName, unknown>> = {};
    for (const name of SECTION_NAMES) {
      const section = p[protoKey(name)] as unknown as Obj | null | undefined;
      if (section !== null && section !== undefined) out[name] = parse(name, section, base, c);
    }
    return out as Partial<SectionValues>;
  });
}
