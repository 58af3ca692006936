/** Random section values, as a real vCPU could report them (for conversion and serialization tests). */
import { randomBytes, randomInt } from 'node:crypto';
import * as S from '../../src/ffi/sections';

/** A list section (kvm_msrs, kvm_cpuid2) of `count` random entries. */
function randomList(codec: S.ListCodec<unknown>, count: number): Buffer {
  const buf = randomBytes(codec.sizeFor(count));
  buf.writeUInt32LE(count, 0);
  return buf;
}

/**
 * decode(random bytes), with the few invariants KVM keeps and the proto relies on restored: segment type is
 * 4 bits and DPL 2 bits, nr_xcrs at most 16. Flag bytes stay random (KVM writes 0/1; the base keeps the rest).
 */
export function randomValue<N extends S.SectionName>(name: N): S.SectionValues[N] {
  const section = S.SECTIONS[name] as S.Section<unknown>;
  const list = ({ msrs: S.MSRS, cpuid2: S.CPUID2 } as Partial<Record<S.SectionName, S.ListCodec<unknown>>>)[name];
  const bytes = list ? randomList(list, randomInt(0, 40)) : randomBytes(section.fixedSize ? section.size : section.size + 64 * randomInt(0, 120));
  const v = section.decode(bytes) as S.SectionValues[N];
  if (name === 'sregs' || name === 'sregs2') {
    for (const seg of ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const) {
      const s = (v as S.Sregs)[seg];
      s.type &= 0xf;
      s.dpl &= 0x3;
    }
  }
  if (name === 'xcrs') (v as S.Xcrs).nrXcrs %= S.KVM_MAX_XCRS + 1;
  return v;
}

export const allRandom = (): Partial<S.SectionValues> => Object.fromEntries(S.SECTION_NAMES.map((n) => [n, randomValue(n)])) as Partial<S.SectionValues>;
