/**
 * KVM capabilities by name, KVM_CHECK_EXTENSION asked once per fd, the facts derived from the answers
 * (xsave size, nested-state maximum) and the one gate for state sections: a leaf module (like
 * rust-vmm's cap.rs) that kvm.ts, vm.ts, vcpu.ts and capabilities.ts all import, so the ffi stays a
 * chain Kvm -> Vm -> Vcpu with no module importing back up.
 */
import { UnsupportedError, VcpudError } from '../errors';
import type { FdHandle } from './fd-handle';
import { kvmCall, native } from './native';
import type { SectionName } from './sections';

export type CapName = keyof typeof native.caps & string;

/** Whatever answers KVM_CHECK_EXTENSION: /dev/kvm (Kvm) or a VM fd (Vm). */
export interface CapSource {
  checkExtension(cap: CapName): number;
}

export function capNumber(name: CapName): number {
  const n = native.caps[name];
  if (n === undefined) throw new VcpudError('internal', `unknown KVM capability ${name}`);
  return n;
}

/**
 * KVM_CHECK_EXTENSION, asked once per fd and capability: the answer cannot change while the fd
 * lives, and the state paths ask on every call (capability checks, the XSAVE2 size).
 */
export function checkExtensionCached(cache: Map<number, number>, handle: FdHandle, cap: CapName | number): number {
  const n = typeof cap === 'number' ? cap : capNumber(cap);
  let v = cache.get(n);
  if (v === undefined) {
    const fd = handle.get();
    v = kvmCall('KVM_CHECK_EXTENSION', () => native.checkExtension(fd, n));
    cache.set(n, v);
  }
  return v;
}

// ---- capability facts: each derived here once, from whichever fd the caller holds ----

/** KVM_GET/SET_XSAVE's struct kvm_xsave: the legacy 4 KiB area. */
export const LEGACY_XSAVE_SIZE = 4096;

/** The xsave area KVM_GET_XSAVE2 writes and KVM_SET_XSAVE reads: KVM_CAP_XSAVE2's size, at least 4 KiB. */
export function xsaveSize(src: CapSource): number {
  return Math.max(LEGACY_XSAVE_SIZE, src.checkExtension('XSAVE2'));
}

/** KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE): the largest nested-state blob, 0 when there is no nested support. */
export function nestedStateMaxSize(src: CapSource): number {
  return src.checkExtension('NESTED_STATE');
}

// ---- the section gate ----

export type Direction = 'read' | 'write';

/** Which capability each section needs, per direction (none: always available), and whether it needs the in-kernel irqchip. */
export const SECTION_CAPS: Readonly<Record<SectionName, { read?: CapName; write?: CapName; irqchip?: boolean }>> = {
  regs: {},
  sregs: {},
  sregs2: { read: 'SREGS2', write: 'SREGS2' },
  fpu: {},
  xsave: { read: 'XSAVE', write: 'XSAVE' },
  xcrs: { read: 'XCRS', write: 'XCRS' },
  msrs: {},
  lapic: { read: 'IRQCHIP', write: 'IRQCHIP', irqchip: true },
  vcpu_events: { read: 'VCPU_EVENTS', write: 'VCPU_EVENTS' },
  debugregs: { read: 'DEBUGREGS', write: 'DEBUGREGS' },
  mp_state: { read: 'MP_STATE', write: 'MP_STATE' },
  cpuid2: { read: 'EXT_CPUID', write: 'EXT_CPUID' },
  tsc_khz: { read: 'GET_TSC_KHZ', write: 'TSC_CONTROL' },
};

/**
 * The one gate: why `section` cannot be used in `direction` (an UnsupportedError naming the missing
 * capability), or undefined when it can. `irqchip` is whether the VM has the in-kernel irqchip
 * (undefined: no VM in question, as for the host report).
 */
export function sectionGate(section: SectionName, direction: Direction, src: CapSource, irqchip?: boolean): UnsupportedError | undefined {
  const need = SECTION_CAPS[section];
  const cap = need[direction];
  if (cap && !(src.checkExtension(cap) > 0))
    return new UnsupportedError(
      `KVM_CAP_${cap}`,
      `${direction === 'read' ? 'reading' : 'writing'} section ${section} needs KVM_CAP_${cap}, which KVM_CHECK_EXTENSION reports as 0`,
    );
  if (need.irqchip && irqchip === false)
    return new UnsupportedError('KVM_CAP_IRQCHIP', `section ${section} needs a VM with the in-kernel irqchip, and this VM was created without (no_irqchip)`);
  return undefined;
}

/** The nested-state gate: the VM's maximum size, or an UnsupportedError when it is 0. */
export function requireNestedState(src: CapSource, ioctl: string): number {
  const max = nestedStateMaxSize(src);
  if (max <= 0)
    throw new UnsupportedError(
      'KVM_CAP_NESTED_STATE',
      `KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) returned ${max} (the KVM module has no nested virtualization), so ${ioctl} cannot be used`,
    );
  return max;
}
