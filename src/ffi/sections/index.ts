/**
 * The vCPU state sections by name. Each section turns the bytes its ioctl exchanges into a value
 * and back: 'decoded' sections into named fields, 'raw' ones (layout versioned by CPU/host) keep
 * the bytes as the value and offer an inspect() summary for humans.
 */
import { CPUID2, type CpuidEntry2 } from './cpuid';
import { DEBUGREGS_LAYOUT, type Debugregs } from './debugregs';
import { VCPU_EVENTS_LAYOUT, type VcpuEvents } from './events';
import { FPU_LAYOUT, type Fpu } from './fpu';
import { LAPIC, inspectLapic } from './lapic';
import { MP_STATE_LAYOUT, type MpState } from './mpstate';
import { MSRS, type MsrEntry } from './msrs';
import { REGS_LAYOUT, type Regs } from './regs';
import { SREGS2_LAYOUT, SREGS_LAYOUT, type Sregs, type Sregs2 } from './sregs';
import type { Codec } from './struct';
import { TSC_KHZ } from './tsc';
import { XCRS_LAYOUT, type Xcrs } from './xcrs';
import { XSAVE, inspectXsave } from './xsave';

export * from './cpuid';
export * from './debugregs';
export * from './events';
export * from './fpu';
export * from './lapic';
export * from './mpstate';
export * from './msr-names';
export * from './msrs';
export * from './regs';
export * from './sregs';
export * from './struct';
export * from './tsc';
export * from './xcrs';
export * from './xsave';

export const SECTION_NAMES = [
  'regs',
  'sregs',
  'sregs2',
  'fpu',
  'xsave',
  'xcrs',
  'msrs',
  'lapic',
  'vcpu_events',
  'debugregs',
  'mp_state',
  'cpuid2',
  'tsc_khz',
] as const;
export type SectionName = (typeof SECTION_NAMES)[number];

/** The value type of each section. */
export interface SectionValues {
  regs: Regs;
  sregs: Sregs;
  sregs2: Sregs2;
  fpu: Fpu;
  xsave: Buffer;
  xcrs: Xcrs;
  msrs: MsrEntry[];
  lapic: Buffer;
  vcpu_events: VcpuEvents;
  debugregs: Debugregs;
  mp_state: MpState;
  cpuid2: CpuidEntry2[];
  tsc_khz: number;
}

export type SectionKind = 'decoded' | 'raw';

export interface Section<V> extends Codec<V> {
  readonly section: SectionName;
  readonly kind: SectionKind;
  /** Raw sections only: the human-readable summary of the bytes. */
  readonly inspect?: (buf: Buffer) => object;
}

function section<N extends SectionName>(
  name: N,
  kind: SectionKind,
  codec: Codec<SectionValues[N]>,
  inspect?: (buf: Buffer) => object,
): Section<SectionValues[N]> {
  const { name: struct, size, fixedSize, decode, encode } = codec;
  return { section: name, kind, name: struct, size, fixedSize, decode, encode, ...(inspect && { inspect }) };
}

export const SECTIONS: { readonly [N in SectionName]: Section<SectionValues[N]> } = {
  regs: section('regs', 'decoded', REGS_LAYOUT),
  sregs: section('sregs', 'decoded', SREGS_LAYOUT),
  sregs2: section('sregs2', 'decoded', SREGS2_LAYOUT),
  fpu: section('fpu', 'decoded', FPU_LAYOUT),
  xsave: section('xsave', 'raw', XSAVE, inspectXsave),
  xcrs: section('xcrs', 'decoded', XCRS_LAYOUT),
  msrs: section('msrs', 'decoded', MSRS),
  lapic: section('lapic', 'raw', LAPIC, inspectLapic),
  vcpu_events: section('vcpu_events', 'decoded', VCPU_EVENTS_LAYOUT),
  debugregs: section('debugregs', 'decoded', DEBUGREGS_LAYOUT),
  mp_state: section('mp_state', 'decoded', MP_STATE_LAYOUT),
  cpuid2: section('cpuid2', 'decoded', CPUID2),
  tsc_khz: section('tsc_khz', 'decoded', TSC_KHZ),
};

export function isSectionName(name: string): name is SectionName {
  return (SECTION_NAMES as readonly string[]).includes(name);
}

/** A section looked up by a name from outside (a request): undefined when unknown. */
export function sectionByName(name: string): Section<unknown> | undefined {
  return isSectionName(name) ? (SECTIONS[name] as Section<unknown>) : undefined;
}
