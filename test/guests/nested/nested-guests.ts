/**
 * Metadata for the nested SVM guests (nested/*.asm, assembled by scripts/build-guests.sh into
 * test/guests/build/nested/). The addresses are the ones nested/nested.inc defines and
 * ../README.md ("Nested SVM guests") documents; tests use these instead of repeating numbers.
 */
import fs from 'node:fs';
import path from 'node:path';
import { GUEST_ABI, GUEST_BUILD_DIR } from '../guests';

export const NESTED_ABI = {
  /** VM_HSAVE_PA page L1 hands to the CPU. */
  hsavePa: 0x20000,
  /** The VMCB L1 builds and VMRUNs (vmcb12; KVM_GET_NESTED_STATE's hdr.svm.vmcb_pa in guest mode). */
  vmcbPa: 0x21000,
  /** I/O permission map (12 KiB, all zero: no port intercepted). */
  iopmPa: 0x22000,
  /** MSR permission map (8 KiB, all zero: no MSR intercepted). */
  msrpmPa: 0x26000,
  /** L1 gives L2 this ASID. */
  asid: 1,
  /** L2's data page as L2 sees it (L2-physical): counter, limit, delay. */
  l2DataPage: 0xa000,
  /** Offsets in L2's data page. */
  l2CounterOffset: 0x0,
  l2LimitOffset: 0x8,
  l2DelayOffset: 0x10,
  /** L1's reports and controls (guest-physical, L1's view). */
  l1ResumeRip: 0xa018,
  l1ExitCode: 0xa020,
  l1Vmruns: 0xa028,
  l1Hold: 0xa030,
  /** The NPT variant backs L2-physical 0xa000 with this page (so L2's counter is at GPA 0xb000). */
  nptDataPage: 0xb000,
  /** The NPT variant's nested_cr3. */
  nptPml4: 0x30000,
  /** L2 runs on L1's page tables (CR3) and GDT, 64-bit code selector. */
  l2Cr3: GUEST_ABI.pml4Address,
  l2CodeSelector: 0x18,
  /** EFER of L1 and of L2: LME | LMA | SVME. */
  efer: 0x1500n,
  /** #VMEXIT code of VMMCALL (L2 reached its limit). */
  exitVmmcall: 0x81,
  /** Smallest VM these guests fit in. */
  minMemoryBytes: 2 * 1024 * 1024,
} as const;

export type NestedGuestName = 'svm_counter' | 'svm_counter_npt';

export interface NestedGuestInfo {
  name: NestedGuestName;
  file: string;
  npt: boolean;
  /** Guest-physical address of L2's data page in the VM's memory (after the NPT remap, if any). */
  l2DataGpa: number;
  description: string;
}

export const NESTED_GUEST_DIR = path.join(GUEST_BUILD_DIR, 'nested');

export const NESTED_GUESTS: Readonly<Record<NestedGuestName, NestedGuestInfo>> = {
  svm_counter: {
    name: 'svm_counter',
    file: path.join(NESTED_GUEST_DIR, 'svm_counter.bin'),
    npt: false,
    l2DataGpa: NESTED_ABI.l2DataPage,
    description: 'L1 (long mode) VMRUNs L2 (long mode, shadow paging) that counts in RBX and [0xa000] and OUTs each count to 0x500.',
  },
  svm_counter_npt: {
    name: 'svm_counter_npt',
    file: path.join(NESTED_GUEST_DIR, 'svm_counter_npt.bin'),
    npt: true,
    l2DataGpa: NESTED_ABI.nptDataPage,
    description: 'svm_counter with nested paging for L2 (nested_cr3 0x30000): L2-physical 0xa000 is backed by GPA 0xb000.',
  },
};

export function nestedGuestsBuilt(): boolean {
  return Object.values(NESTED_GUESTS).every((g) => fs.existsSync(g.file));
}
