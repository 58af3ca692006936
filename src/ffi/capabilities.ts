/**
 * The one capability model: what this host's KVM can do, probed once, and the answer to "can
 * section X be read / written here, and if not, why".
 */
import fs from 'node:fs';
import os from 'node:os';
import { hasBit, maxPhysAddrBits, SVM_BIT, vendorOf, VMX_BIT, type Vendor } from './cpuid-facts';
import { nestedStateMaxSize, SECTION_CAPS, sectionGate, xsaveSize, type CapName, type CapSource } from './caps';
import type { Kvm } from './kvm';
import { native } from './native';
import { SECTION_NAMES, type SectionName } from './sections';

export interface SectionSupport {
  readable: boolean;
  writable: boolean;
  /** The KVM_CAP_* the section depends on: the missing one when a direction is unavailable. */
  capability?: string;
  /** Why a direction is unavailable (names the capability). */
  reason?: string;
}

export interface NestedSupport {
  /** KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE): the largest nested-state blob, 0 = none. */
  maxSize: number;
  /** /sys/module/kvm_{intel,amd}/parameters/nested, when that module is loaded. */
  moduleParameter?: string;
  /** Whether KVM_GET_SUPPORTED_CPUID offers VMX / SVM to guests. */
  cpuidVmx: boolean;
  cpuidSvm: boolean;
  supported: boolean;
  reason?: string;
}

export interface HostCapabilities {
  kvmPath: string;
  apiVersion: number;
  kernelRelease: string;
  /** The vendor KVM module loaded (kvm_intel, kvm_amd, kvm_pvm...), or "unknown". */
  kvmModule: string;
  vendor: Vendor;
  caps: Record<string, number>;
  vcpuMmapSize: number;
  xsaveSize: number;
  maxPhysAddrBits: number;
  msrIndexList: number[];
  nested: NestedSupport;
  sections: Record<SectionName, SectionSupport>;
}

const VENDOR_MODULES = ['kvm_intel', 'kvm_amd', 'kvm_pvm'];

function readParam(module: string, param: string): string | undefined {
  try {
    return fs.readFileSync(`/sys/module/${module}/parameters/${param}`, 'utf8').trim();
  } catch {
    return undefined;
  }
}

function loadedKvmModule(): string {
  return VENDOR_MODULES.find((m) => fs.existsSync(`/sys/module/${m}`)) ?? 'unknown';
}

export function probeCapabilities(kvm: Kvm): HostCapabilities {
  const caps: Record<string, number> = {};
  for (const name of Object.keys(native.caps)) caps[`KVM_CAP_${name}`] = kvm.checkExtension(name as CapName);
  const cpuid = kvm.supportedCpuid();
  const vendor = vendorOf(cpuid);
  const kvmModule = loadedKvmModule();
  const sections = {} as Record<SectionName, SectionSupport>;
  for (const s of SECTION_NAMES) sections[s] = sectionSupport(s, kvm);
  return {
    kvmPath: kvm.path,
    apiVersion: kvm.apiVersion(),
    kernelRelease: os.release(),
    kvmModule,
    vendor,
    caps,
    vcpuMmapSize: kvm.vcpuMmapSize(),
    xsaveSize: xsaveSize(kvm),
    maxPhysAddrBits: maxPhysAddrBits(cpuid),
    msrIndexList: kvm.msrIndexList(),
    nested: nestedSupport(nestedStateMaxSize(kvm), vendor, kvmModule, hasBit(cpuid, VMX_BIT), hasBit(cpuid, SVM_BIT)),
    sections,
  };
}

/** The host report of a section, from the same gate every state path asks (ffi/caps.ts sectionGate). */
function sectionSupport(section: SectionName, src: CapSource): SectionSupport {
  const need = SECTION_CAPS[section];
  const r = sectionGate(section, 'read', src);
  const w = sectionGate(section, 'write', src);
  const out: SectionSupport = { readable: !r, writable: !w };
  const dependsOn = w && !r ? w.capability : (r?.capability ?? (need.read ? `KVM_CAP_${need.read}` : need.write && `KVM_CAP_${need.write}`));
  if (dependsOn) out.capability = dependsOn;
  const reasons = [r?.reason, w && w.capability !== r?.capability && w.reason, !r && need.irqchip && 'needs a VM with the in-kernel irqchip'].filter(Boolean);
  if (reasons.length) out.reason = reasons.join('; ');
  return out;
}

function nestedSupport(maxSize: number, vendor: Vendor, kvmModule: string, vmx: boolean, svm: boolean): NestedSupport {
  const vendorModule = vendor === 'intel' ? 'kvm_intel' : vendor === 'amd' ? 'kvm_amd' : undefined;
  const moduleParameter = vendorModule ? readParam(vendorModule, 'nested') : undefined;
  const n: NestedSupport = { maxSize, moduleParameter, cpuidVmx: vmx, cpuidSvm: svm, supported: false };
  if (maxSize <= 0) {
    n.reason = `KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) returned ${maxSize}: the loaded KVM module (${kvmModule}) has no nested virtualization support`;
  } else if (moduleParameter !== undefined && !['Y', '1'].includes(moduleParameter)) {
    n.reason = `${vendorModule} is loaded with nested=${moduleParameter}`;
  } else if (!(vendor === 'intel' ? vmx : svm)) {
    n.reason = `KVM_GET_SUPPORTED_CPUID does not offer ${vendor === 'intel' ? 'VMX' : 'SVM'} to guests`;
  } else {
    n.supported = true;
  }
  return n;
}

/** The probed KVM_CHECK_EXTENSION answers as a CapSource: the gate asked without another ioctl. */
export function probedCaps(caps: HostCapabilities): CapSource {
  return { checkExtension: (cap) => caps.caps[`KVM_CAP_${cap}`] ?? 0 };
}
