#!/usr/bin/env node
/**
 * Prints this host's KVM capability report straight from /dev/kvm (no server needed):
 * `npm run caps` for a table, `npm run caps -- --json` for JSON.
 */
import { probeCapabilities, type HostCapabilities } from '../ffi/capabilities';
import { Kvm } from '../ffi/kvm';

export function formatCapabilities(c: HostCapabilities): string {
  const lines = [
    `KVM device        ${c.kvmPath} (API version ${c.apiVersion})`,
    `kernel            ${c.kernelRelease}, module ${c.kvmModule}, vendor ${c.vendor}`,
    `vCPU mmap size    ${c.vcpuMmapSize} bytes; xsave ${c.xsaveSize} bytes; MAXPHYADDR ${c.maxPhysAddrBits} bits`,
    `MSR index list    ${c.msrIndexList.length} MSRs`,
    `nested state      ${c.nested.supported ? `supported, max ${c.nested.maxSize} bytes` : `unsupported: ${c.nested.reason}`}`,
    '',
    'section       read  write  note',
  ];
  for (const [name, s] of Object.entries(c.sections))
    lines.push(`${name.padEnd(13)} ${(s.readable ? 'yes' : 'no').padEnd(5)} ${(s.writable ? 'yes' : 'no').padEnd(6)} ${s.reason ?? ''}`.trimEnd());
  lines.push('', 'capability                       value');
  for (const [k, v] of Object.entries(c.caps)) lines.push(`${k.padEnd(32)} ${v}`);
  return lines.join('\n');
}

function main(): void {
  const json = process.argv.includes('--json');
  const kvm = Kvm.open(process.env.VCPUD_KVM_PATH);
  try {
    const caps = probeCapabilities(kvm);
    console.log(json ? JSON.stringify(caps, null, 2) : formatCapabilities(caps));
  } finally {
    kvm.close();
  }
}

if (require.main === module) {
  try {
    main();
  } catch (e) {
    console.error(`vcpud caps: ${(e as Error).message}`);
    process.exit(1);
  }
}
