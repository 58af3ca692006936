/**
 * Guest memory restored lazily maps the snapshot file (copy-on-write). When that file is truncated
 * or rewritten in place while the VM lives (`cp other.snap NAME` opens it O_TRUNC, same inode),
 * the mapped pages are gone: the kernel discards even the pages the guest has written since, and
 * reads the new file's bytes, or raises SIGBUS past its end. The VM's memory is then lost for good.
 *
 * vcpud's own accesses are guarded in native code (a fault fails that access with MEMORY_FAULT
 * instead of ending the process); this module turns that, and a change the file's size or mtime
 * shows (a rewrite that does not fault), into one error on that VM only: DATA_LOSS
 * MEMORY_BACKING_LOST naming the file and the guest-physical address. The guest touching such a
 * page stops with the reason "memory_backing_lost" instead of what KVM reports for it.
 */
import { VcpudError } from '../errors';
import type { BackingFileInfo } from '../ffi/native';
import type { MemoryRegion } from '../ffi/vm';
import type { VcpuStatus } from './managed-vcpu';
import { hex } from './snapshot-format';

export const MEMORY_BACKING_LOST = 'memory_backing_lost';

/** What happened to the file since it was mapped, or undefined when it looks as it did. */
export function backingChange(f: BackingFileInfo): string | undefined {
  if (f.size < f.mappedEnd) return `was truncated to ${f.size} bytes (the VM maps it up to byte ${f.mappedEnd})`;
  // A rewrite that restores the size and the mtime (cp -p of a same-sized file) is not seen here;
  // pages it dropped while the file was short still fault.
  if (f.size !== f.sizeAtMap || f.mtimeNs !== f.mtimeNsAtMap) return `was changed (now ${f.size} bytes, modified after the VM was restored from it)`;
  return undefined;
}

interface Lost {
  region: MemoryRegion;
  file: BackingFileInfo;
  change?: string;
}

/** The first file mapped under the regions that changed since, if any. */
function changedBacking(regions: readonly MemoryRegion[]): Lost | undefined {
  for (const region of regions) {
    for (const file of region.memory.backingFiles()) {
      const change = backingChange(file);
      if (change) return { region, file, change };
    }
  }
  return undefined;
}

function lostError(vmLabel: string, op: string, lost: Lost, gpa?: number): VcpudError {
  const at = gpa === undefined ? '' : ` (lost page at guest-physical ${hex(gpa)})`;
  const how = lost.change ?? 'was truncated or changed (the page cannot be read)';
  return new VcpudError(
    'data_loss',
    `${op} failed for VM ${vmLabel}${at}: the snapshot file ${lost.file.path} that its memory was restored from (lazily) ${how}; ` +
      'the memory mapped from it is lost: delete the VM and restore again from an intact snapshot',
    { reason: 'MEMORY_BACKING_LOST' },
  );
}

/** Throws MEMORY_BACKING_LOST when a file mapped under the regions changed since it was mapped. */
export function assertBackingIntact(regions: readonly MemoryRegion[], vmLabel: string, op: string): void {
  const lost = changedBacking(regions);
  if (lost) throw lostError(vmLabel, op, lost);
}

/** MEMORY_BACKING_LOST for a native MEMORY_FAULT error of `region`'s memory; other errors unchanged. */
export function backingFaultError(e: unknown, region: MemoryRegion, regions: readonly MemoryRegion[], vmLabel: string, op: string): unknown {
  const fault = e as { code?: unknown; offset?: unknown };
  if (fault?.code !== 'MEMORY_FAULT' || typeof fault.offset !== 'number') return e;
  const files = region.memory.backingFiles();
  const lost = changedBacking(regions) ?? (files.length ? { region, file: files[0] } : undefined);
  const gpa = region.guestPhysAddr + fault.offset;
  if (!lost)
    return new VcpudError('data_loss', `${op} failed for VM ${vmLabel}: guest memory at ${hex(gpa)} cannot be read (SIGBUS)`, {
      reason: 'MEMORY_BACKING_LOST',
    });
  return Object.assign(lostError(vmLabel, op, lost, gpa), { cause: e });
}

/**
 * A guarded access to the VM's memory: the files checked before (a same-size rewrite faults on
 * nothing) and after (one that raced the access), a fault inside turned into MEMORY_BACKING_LOST.
 */
export function withBackingChecked<T>(regions: readonly MemoryRegion[], region: MemoryRegion, vmLabel: string, op: string, fn: () => T): T {
  assertBackingIntact(regions, vmLabel, op);
  let r: T;
  try {
    r = fn();
  } catch (e) {
    throw backingFaultError(e, region, regions, vmLabel, op);
  }
  assertBackingIntact(regions, vmLabel, op);
  return r;
}

/** The stop reasons a lost page shows up as (the runner knows nothing of files). */
const MASKING_REASONS = new Set(['mmio', 'shutdown', 'internal_error', 'kvm_run_error']);

/**
 * What a vCPU stop means once the memory's files are considered. KVM (kvm_pvm, Linux 6.18, as
 * measured by test/kvm/snapshot-file-changed.test.ts) cannot reach a lost page either and says so
 * in three ways: a guest write to one exits as MMIO at a guest-physical address inside RAM; an
 * instruction fetch from one in real mode is an emulation failure ("internal_error", suberror 1);
 * in long mode a fetch or page-table walk through one ends in a triple fault ("shutdown"). An MMIO
 * exit inside file-backed RAM has no other cause; the others (and a KVM_RUN error) count as a lost
 * page only when a mapped file did change.
 */
export function classifyStop(regions: readonly MemoryRegion[], s: VcpuStatus): VcpuStatus {
  if (s.state !== 'stopped' || !s.reason || !MASKING_REASONS.has(s.reason)) return s;
  const fileBacked = regions.filter((r) => r.memory.backingFiles().length > 0);
  if (!fileBacked.length) return s;
  if (s.reason === 'mmio') {
    const gpa = s.details.physAddr;
    if (!fileBacked.some((r) => gpa >= r.guestPhysAddr && gpa < r.guestPhysAddr + r.size)) return s;
    return { ...s, reason: MEMORY_BACKING_LOST, details: { gpa, isWrite: s.details.isWrite, len: s.details.len } };
  }
  const lost = changedBacking(fileBacked);
  if (!lost) return s;
  return { ...s, reason: MEMORY_BACKING_LOST, details: { ...s.details, fileSize: lost.file.size, mappedEnd: lost.file.mappedEnd } };
}
