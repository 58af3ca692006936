/**
 * Can a snapshot be restored on this host? Every incompatibility is listed (never just the first),
 * before anything is allocated or created: vendor, KVM API version, nested-state size, xsave size,
 * the CPUID features the guest was given against what this host supports, the MSRs saved against
 * this host's index list, the sections this host cannot write, the irqchip, MAXPHYADDR and the
 * memory layout.
 */
import { VcpudError, type Violation } from '../errors';
import type { HostCapabilities } from '../ffi/capabilities';
import { maxPhysAddrBits } from '../ffi/cpuid-facts';
import { msrName, type CpuidEntry2, type SectionName } from '../ffi/sections';
import { hex, type SnapshotHeader } from './snapshot-format';

type Reg = 'eax' | 'ebx' | 'ecx' | 'edx';

/**
 * CPUID registers that are feature bitmaps: a bit the guest was given must be one this host's KVM
 * supports. Other registers (family/model, cache geometry, APIC ids, sizes) describe rather than
 * promise and are not compared bit by bit.
 */
export const FEATURE_REGISTERS: { function: number; index: number; registers: Reg[]; what: string }[] = [
  { function: 0x1, index: 0, registers: ['ecx', 'edx'], what: 'basic features' },
  { function: 0x7, index: 0, registers: ['ebx', 'ecx', 'edx'], what: 'structured extended features' },
  { function: 0x7, index: 1, registers: ['eax', 'edx'], what: 'structured extended features, subleaf 1' },
  { function: 0xd, index: 0, registers: ['eax', 'edx'], what: 'XSAVE components (XCR0)' },
  { function: 0xd, index: 1, registers: ['eax'], what: 'XSAVE extensions' },
  { function: 0x80000001, index: 0, registers: ['ecx', 'edx'], what: 'extended features' },
  { function: 0x80000007, index: 0, registers: ['edx'], what: 'power management / invariant TSC' },
  { function: 0x80000008, index: 0, registers: ['ebx'], what: 'extended features (leaf 0x80000008)' },
  { function: 0x40000001, index: 0, registers: ['eax'], what: 'KVM paravirtual features' },
];

/** Bits that KVM sets in a vCPU's CPUID from its runtime state, never from the supported list. */
const DYNAMIC_BITS: { function: number; index: number; register: Reg; mask: number }[] = [
  { function: 0x1, index: 0, register: 'ecx', mask: 1 << 27 }, // OSXSAVE mirrors CR4.OSXSAVE
  { function: 0x7, index: 0, register: 'ecx', mask: 1 << 4 }, // OSPKE mirrors CR4.PKE
];

const exact = (entries: CpuidEntry2[], fn: number, index: number) => entries.find((e) => e.function === fn && e.index === index);

function bitList(mask: number): string {
  const bits: number[] = [];
  for (let b = 0; b < 32; b++) if ((mask >>> b) & 1) bits.push(b);
  return bits.join(', ');
}

/** CPUID feature bits the guest was given that `supported` (KVM_GET_SUPPORTED_CPUID here) lacks. */
export function cpuidViolations(guest: CpuidEntry2[], supported: CpuidEntry2[]): Violation[] {
  const out: Violation[] = [];
  for (const leaf of FEATURE_REGISTERS) {
    const g = exact(guest, leaf.function, leaf.index);
    if (!g) continue;
    const h = exact(supported, leaf.function, leaf.index);
    for (const r of leaf.registers) {
      let given = g[r] >>> 0;
      for (const d of DYNAMIC_BITS) if (d.function === leaf.function && d.index === leaf.index && d.register === r) given &= ~d.mask >>> 0;
      const missing = (given & ~((h?.[r] ?? 0) >>> 0)) >>> 0;
      if (!missing) continue;
      out.push({
        rule: 'snapshot.cpuid',
        field: `vm.cpuid[${hex(leaf.function)}.${leaf.index}].${r}`,
        message: `CPUID.(EAX=${hex(leaf.function)},ECX=${leaf.index}):${r.toUpperCase()} (${leaf.what}) bits ${bitList(missing)} (mask ${hex(missing)}) were given to the guest but this host ${h ? 'does not support them' : 'does not have the leaf'}`,
      });
    }
  }
  return out;
}

/** Every reason `header` cannot be restored on the host `caps` describes (empty: compatible). */
export function compatibilityViolations(header: SnapshotHeader, caps: HostCapabilities, supportedCpuid: CpuidEntry2[]): Violation[] {
  const v: Violation[] = [];
  const src = header.source;
  if (src.vendor !== caps.vendor)
    v.push({ rule: 'snapshot.vendor', field: 'source.vendor', message: `the snapshot was taken on a ${src.vendor} host, this host is ${caps.vendor}` });
  if (src.kvmApiVersion !== caps.apiVersion)
    v.push({
      rule: 'snapshot.kvm_api_version',
      field: 'source.kvm_api_version',
      message: `KVM API version ${src.kvmApiVersion} at the source, ${caps.apiVersion} here`,
    });

  const mem = header.vm.memory;
  if (mem.length !== 1 || mem[0].guestPhysAddr !== 0 || mem[0].size !== header.vm.memoryBytes)
    v.push({
      rule: 'snapshot.memory_layout',
      field: 'vm.memory',
      message: `vcpud restores one memory slot at guest-physical 0; the snapshot has ${JSON.stringify(mem)}`,
    });

  if (header.vm.irqchip && !(caps.caps.KVM_CAP_IRQCHIP > 0))
    v.push({ rule: 'snapshot.irqchip', field: 'vm.irqchip', message: 'the VM had the in-kernel irqchip; KVM_CAP_IRQCHIP is 0 here' });

  // xsave: the source's area must fit this host's (a smaller one is zero-extended at restore).
  const xsave = Math.max(0, ...header.vcpus.flatMap((c) => c.sections.filter((s) => s.name === 'xsave').map((s) => s.size)));
  if (xsave > caps.xsaveSize)
    v.push({
      rule: 'snapshot.xsave_size',
      field: 'source.xsave_size',
      message: `the saved xsave area is ${xsave} bytes; this host's KVM_CAP_XSAVE2 size is ${caps.xsaveSize}`,
    });

  // Nested state: this host must take blobs of the saved size.
  const nested = header.vcpus.filter((c) => c.nestedSize > 0);
  if (nested.length && caps.nested.maxSize <= 0)
    v.push({
      rule: 'snapshot.nested_state',
      field: 'vcpus.nested',
      message: `vCPU(s) ${nested.map((c) => c.id).join(', ')} have nested state; this host has no KVM_CAP_NESTED_STATE (${caps.nested.reason ?? 'unsupported'})`,
    });
  else
    for (const c of nested.filter((c) => c.nestedSize > caps.nested.maxSize))
      v.push({
        rule: 'snapshot.nested_state_size',
        field: `vcpus[${c.id}].nested`,
        message: `vCPU ${c.id}'s nested state is ${c.nestedSize} bytes; this host's KVM_CAP_NESTED_STATE size is ${caps.nested.maxSize}`,
      });

  // Sections this host cannot write. tsc_khz is checked at restore: without KVM_CAP_TSC_CONTROL it
  // is accepted when it equals the frequency the new vCPU already has.
  const unwritable = new Map<SectionName, number[]>();
  for (const c of header.vcpus)
    for (const s of c.sections) {
      if (s.name === 'tsc_khz') continue;
      const support = caps.sections[s.name];
      if (!support) {
        v.push({ rule: 'snapshot.section', field: `vcpus[${c.id}].sections.${s.name}`, message: `unknown section ${s.name}` });
        continue;
      }
      if (!support.writable) unwritable.set(s.name, [...(unwritable.get(s.name) ?? []), c.id]);
    }
  for (const [s, ids] of unwritable)
    v.push({
      rule: 'snapshot.section',
      field: `vcpus.sections.${s}`,
      message: `section ${s} of vCPU(s) ${ids.join(', ')} cannot be written here: ${caps.sections[s].reason ?? 'not writable'}`,
    });

  // MSRs saved that this host's KVM_GET_MSR_INDEX_LIST does not have.
  const here = new Set(caps.msrIndexList);
  const unreadable = new Set(header.vcpus.flatMap((c) => c.msrsUnreadable));
  const savesMsrs = header.vcpus.some((c) => c.sections.some((s) => s.name === 'msrs'));
  const missing = savesMsrs ? src.msrIndexList.filter((i) => !unreadable.has(i) && !here.has(i)) : [];
  if (missing.length)
    v.push({
      rule: 'snapshot.msrs',
      field: 'source.msr_index_list',
      message: `MSR(s) ${missing.map((i) => `${hex(i)} (${msrName(i)})`).join(', ')} were saved but are not in this host's KVM_GET_MSR_INDEX_LIST`,
    });

  // CPUID: what the guest was promised, and the physical address width its page tables may use.
  v.push(...cpuidViolations(header.vm.cpuid, supportedCpuid));
  const guestPa = maxPhysAddrBits(header.vm.cpuid);
  if (guestPa > caps.maxPhysAddrBits)
    v.push({
      rule: 'snapshot.max_phys_addr',
      field: `vm.cpuid[${hex(0x80000008)}.0].eax`,
      message: `the guest was given MAXPHYADDR ${guestPa}; this host has ${caps.maxPhysAddrBits}`,
    });
  return v;
}

/** FAILED_PRECONDITION (SNAPSHOT_INCOMPATIBLE) listing every violation, or nothing. */
export function assertCompatible(header: SnapshotHeader, caps: HostCapabilities, supportedCpuid: CpuidEntry2[]): void {
  const violations = compatibilityViolations(header, caps, supportedCpuid);
  if (!violations.length) return;
  throw new VcpudError(
    'failed_precondition',
    `the snapshot cannot be restored on this host (${violations.length} incompatibilit${violations.length === 1 ? 'y' : 'ies'}): ${violations.map((x) => x.message).join('; ')}`,
    { reason: 'SNAPSHOT_INCOMPATIBLE', violations },
  );
}
