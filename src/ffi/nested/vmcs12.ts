/**
 * vmcs12 is KVM's private in-memory VMCS layout (arch/x86/kvm/vmx/vmcs12.h): only its architectural header is
 * decoded, the rest is carried as bytes.
 */

export interface Vmcs12 {
  /** The first u32 as stored: revision_id in bits 30:0, shadow_vmcs in bit 31. */
  header: number;
  /** What KVM compares with VMCS12_REVISION (struct vmcs_hdr.revision_id:31). */
  revisionId: number;
  /** struct vmcs_hdr.shadow_vmcs: set in a shadow vmcs12. */
  shadowVmcs: boolean;
  raw: Buffer;
}

export function decodeVmcs12(buf: Buffer): Vmcs12 {
  const header = buf.readUInt32LE(0);
  return { header, revisionId: header & 0x7fff_ffff, shadowVmcs: header >>> 31 === 1, raw: buf };
}
