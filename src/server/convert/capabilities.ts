/** HostCapabilities -> GetCapabilitiesResponse (protos/vcpud/v1/capabilities.proto). */
import type { HostCapabilities } from '../../ffi/capabilities';
import type { Vendor as HostVendor } from '../../ffi/cpuid-facts';
import { SECTION_NAMES, type SectionName } from '../../ffi/sections';
import type { GetCapabilitiesResponse } from '../../api/generated/vcpud/v1/GetCapabilitiesResponse';
import type { NestedSupport } from '../../api/generated/vcpud/v1/NestedSupport';
import type { SectionSupport } from '../../api/generated/vcpud/v1/SectionSupport';
import type { Vendor } from '../../api/generated/vcpud/v1/Vendor';
import { sectionToProto } from './state';

const VENDORS: Readonly<Record<HostVendor, Vendor>> = {
  intel: 'VENDOR_INTEL',
  amd: 'VENDOR_AMD',
  unknown: 'VENDOR_UNSPECIFIED',
};

function sectionSupport(c: HostCapabilities, name: SectionName): SectionSupport {
  const { readable, writable, reason, capability = '' } = c.sections[name];
  return { section: sectionToProto(name), readable, writable, capability, reason: reason ?? '' };
}

function nestedSupport(c: HostCapabilities): NestedSupport {
  const n = c.nested;
  const exposed = c.vendor === 'intel' ? n.cpuidVmx : c.vendor === 'amd' ? n.cpuidSvm : false;
  return {
    maxStateSize: n.maxSize,
    moduleParameter: n.moduleParameter ?? '',
    guestCpuidExposesVirtualization: exposed,
    supported: n.supported,
    reason: n.supported ? '' : (n.reason ?? ''),
  };
}

export function capabilitiesToProto(c: HostCapabilities): GetCapabilitiesResponse {
  return {
    kvmApiVersion: c.apiVersion,
    kernelRelease: c.kernelRelease,
    kvmModule: c.kvmModule,
    vendor: VENDORS[c.vendor],
    nested: nestedSupport(c),
    capabilities: Object.entries(c.caps).map(([name, value]) => ({ name, value: String(value) })),
    xsaveSize: c.xsaveSize,
    vcpuMmapSize: c.vcpuMmapSize,
    msrIndices: [...c.msrIndexList],
    sections: SECTION_NAMES.map((name) => sectionSupport(c, name)),
  };
}
