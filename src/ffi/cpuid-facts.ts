/** Facts read from CPUID entries: vendor, nested-virtualization bits, physical address width. */
import type { CpuidEntry2 } from './sections';

export type Vendor = 'intel' | 'amd' | 'unknown';

/** CPUID.1:ECX.VMX[bit 5] and CPUID.80000001h:ECX.SVM[bit 2]. */
export const VMX_BIT = { function: 0x1, register: 'ecx', bit: 5 } as const;
export const SVM_BIT = { function: 0x80000001, register: 'ecx', bit: 2 } as const;

export function findLeaf(entries: CpuidEntry2[], fn: number, index = 0): CpuidEntry2 | undefined {
  return entries.find((e) => e.function === fn && e.index === index) ?? entries.find((e) => e.function === fn);
}

export function vendorOf(entries: CpuidEntry2[]): Vendor {
  const leaf0 = findLeaf(entries, 0);
  if (!leaf0) return 'unknown';
  const s = Buffer.alloc(12);
  s.writeUInt32LE(leaf0.ebx >>> 0, 0);
  s.writeUInt32LE(leaf0.edx >>> 0, 4);
  s.writeUInt32LE(leaf0.ecx >>> 0, 8);
  const id = s.toString('latin1');
  if (id === 'GenuineIntel') return 'intel';
  if (id === 'AuthenticAMD' || id === 'HygonGenuine') return 'amd';
  return 'unknown';
}

export function hasBit(entries: CpuidEntry2[], b: typeof VMX_BIT | typeof SVM_BIT): boolean {
  const leaf = findLeaf(entries, b.function);
  return leaf !== undefined && ((leaf[b.register] >>> b.bit) & 1) === 1;
}

/** CPUID.80000008h:EAX[7:0]; 36 is the architectural default when the leaf is absent. */
export function maxPhysAddrBits(entries: CpuidEntry2[]): number {
  const leaf = findLeaf(entries, 0x80000008);
  return leaf ? leaf.eax & 0xff : 36;
}
