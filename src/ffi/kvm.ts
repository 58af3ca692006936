/**
 * System scope: /dev/kvm. One method per system ioctl; list calls negotiate their size on E2BIG.
 */
import { KvmError, VcpudError } from '../errors';
import { checkExtensionCached, type CapName, type CapSource } from './caps';
import { FdHandle } from './fd-handle';
import { kvmCall, kvmCallAsync, native, negotiate } from './native';
import { decodeCpuid2, type CpuidEntry2 } from './sections';
import { Vm } from './vm';

/** KVM_API_VERSION has been 12 since 2.6.22; anything else is not a KVM we know. */
export const EXPECTED_API_VERSION = 12;
/** KVM_MAX_CPUID_ENTRIES in the kernel: the ceiling for CPUID negotiation. */
const MAX_CPUID_ENTRIES = 256;
const MAX_MSR_LIST = 16384;

/** What to do about a /dev/kvm that cannot be opened, by errno. */
function openHint(path: string, code: string): string {
  if (code === 'EACCES' || code === 'EPERM') {
    const uid = process.getuid?.() ?? '?';
    return `. vcpud (uid ${uid}) may not open ${path}: add its user to the group that owns the device (usually kvm: \`usermod -aG kvm USER\`, then log in again or restart the service), or give the device mode 0660 and group kvm (udev rule KERNEL=="kvm", GROUP="kvm", MODE="0660"); in a container, pass the device (--device ${path}) and that group`;
  }
  if (code === 'ENOENT' || code === 'ENXIO' || code === 'ENODEV')
    return `. This host has no KVM device at ${path}: load kvm_intel or kvm_amd (modprobe), check that virtualization is enabled in the firmware, or point --kvm-path at the device`;
  return '';
}

export class Kvm implements CapSource {
  private readonly extensions = new Map<number, number>();
  private readonly handle: FdHandle;

  private constructor(
    readonly path: string,
    fd: number,
  ) {
    this.handle = new FdHandle(fd, () => new VcpudError('unavailable', `${path} is closed: vcpud is shutting down`));
  }

  /** The /dev/kvm fd; throws once closed. */
  get fd(): number {
    return this.handle.get();
  }

  /** Opens the device and insists on API version 12. */
  static open(path = process.env.VCPUD_KVM_PATH ?? '/dev/kvm'): Kvm {
    let fd: number;
    try {
      fd = kvmCall('open', () => native.openKvm(path));
    } catch (e) {
      if (!(e instanceof KvmError)) throw e;
      throw new KvmError('open', e.errno, e.code, `cannot open ${path}: ${e.message.replace(/^open failed: /, '')}${openHint(path, e.code)}`);
    }
    const kvm = new Kvm(path, fd);
    const version = kvm.apiVersion();
    if (version !== EXPECTED_API_VERSION) {
      kvm.close();
      throw new VcpudError('failed_precondition', `${path}: KVM_GET_API_VERSION returned ${version}, vcpud requires ${EXPECTED_API_VERSION}`);
    }
    return kvm;
  }

  apiVersion(): number {
    return kvmCall('KVM_GET_API_VERSION', () => native.getApiVersion(this.fd));
  }

  /** KVM_CHECK_EXTENSION on /dev/kvm: 0 for absent, otherwise a cap-specific value (often a size). */
  checkExtension(cap: CapName | number): number {
    return checkExtensionCached(this.extensions, this.handle, cap);
  }

  vcpuMmapSize(): number {
    return kvmCall('KVM_GET_VCPU_MMAP_SIZE', () => native.getVcpuMmapSize(this.fd));
  }

  /** MSRs KVM_GET/SET_MSRS can save and restore. The kernel writes the needed count back on E2BIG. */
  msrIndexList(initialCapacity = 64): number[] {
    return this.indexList('KVM_GET_MSR_INDEX_LIST', native.getMsrIndexList, initialCapacity);
  }

  /** Feature MSRs (read on /dev/kvm): what the host can offer guests, e.g. VMX capability MSRs. */
  msrFeatureIndexList(initialCapacity = 16): number[] {
    return this.indexList('KVM_GET_MSR_FEATURE_INDEX_LIST', native.getMsrFeatureIndexList, initialCapacity);
  }

  /** KVM_GET_SUPPORTED_CPUID. The kernel does not report the needed count, so capacity doubles. */
  supportedCpuid(initialCapacity = 32): CpuidEntry2[] {
    return negotiate('KVM_GET_SUPPORTED_CPUID', initialCapacity, MAX_CPUID_ENTRIES, (cap) => {
      const buf = Buffer.alloc(8 + cap * native.sizes.kvm_cpuid_entry2);
      kvmCall('KVM_GET_SUPPORTED_CPUID', () => native.getSupportedCpuid(this.fd, buf));
      return decodeCpuid2(buf);
    });
  }

  createVm(type = 0): Vm {
    const fd = kvmCall('KVM_CREATE_VM', () => native.createVm(this.fd, type));
    return new Vm(this, fd);
  }

  /** KVM_CREATE_VM off the JS thread: it can take milliseconds on a loaded host. */
  async createVmAsync(type = 0): Promise<Vm> {
    const fd = await this.handle.useAsync((kvmFd) => kvmCallAsync('KVM_CREATE_VM', () => native.createVmAsync(kvmFd, type)));
    return new Vm(this, fd);
  }

  close(): void {
    this.handle.close();
  }

  private indexList(ioctl: string, fn: (fd: number, buf: Buffer) => void, initial: number): number[] {
    return negotiate(ioctl, initial, MAX_MSR_LIST, (cap) => {
      const buf = Buffer.alloc(4 + cap * 4);
      kvmCall(ioctl, () => fn(this.fd, buf));
      const n = buf.readUInt32LE(0);
      return Array.from({ length: n }, (_, i) => buf.readUInt32LE(4 + i * 4));
    });
  }
}
