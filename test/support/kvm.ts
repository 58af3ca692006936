/**
 * Gates for tests that need real hardware: they skip with a loud reason where the host lacks it,
 * and fail instead when CI demands it (VCPUD_REQUIRE_KVM=1).
 */
import fs from 'node:fs';
import type { Kvm } from '../../src/ffi/kvm';
import type { Vcpu } from '../../src/ffi/vcpu';
import type { Vm } from '../../src/ffi/vm';
import { anonymousMemory, StateDirMemory, type GuestMemorySource } from '../../src/vm/guest-memory';

export const KVM_PATH = process.env.VCPUD_KVM_PATH ?? '/dev/kvm';

function kvmUnavailableReason(): string | undefined {
  try {
    fs.accessSync(KVM_PATH, fs.constants.R_OK | fs.constants.W_OK);
    return undefined;
  } catch (e) {
    return `${KVM_PATH} is not usable: ${(e as Error).message}`;
  }
}

export const kvmUnavailable = kvmUnavailableReason();

/** describe() for suites that need /dev/kvm. */
export function describeKvm(name: string, fn: () => void): void {
  if (!kvmUnavailable) return describe(name, fn);
  if (process.env.VCPUD_REQUIRE_KVM === '1') {
    return describe(name, () => {
      it('requires /dev/kvm (VCPUD_REQUIRE_KVM=1)', () => {
        throw new Error(`VCPUD_REQUIRE_KVM=1 but ${kvmUnavailable}`);
      });
    });
  }
  console.warn(`\n*** SKIPPING "${name}": ${kvmUnavailable} ***\n`);
  return describe.skip(name, fn);
}

/**
 * describeKvm() for a suite that also needs a host resource (a mount, a page pool): `acquire` gets it
 * or says why not, `fn` gets it, and `release` runs after the suite, from an outer block whose afterAll
 * follows the suite's own (which stops the vcpuds using it: an unmount would fail with EBUSY before).
 * Nothing is acquired when the KVM gate already skips the suite. Without the resource the suite skips
 * with a loud reason, or fails when CI demands KVM tests (VCPUD_REQUIRE_KVM=1: they run as root there).
 */
export function describeKvmWith<T>(
  name: string,
  what: string,
  acquire: () => T | { unavailable: string },
  release: (t: T) => void,
  fn: (resource: () => T) => void,
): void {
  const none = (): T => {
    throw new Error(`${name}: no ${what}`);
  };
  if (kvmUnavailable) return describeKvm(name, () => fn(none));
  const got = acquire();
  const problem = typeof got === 'object' && got !== null && 'unavailable' in got ? (got as { unavailable: string }).unavailable : undefined;
  if (problem === undefined) {
    return describe(name, () => {
      afterAll(() => release(got as T));
      describe(`with ${what}`, () => fn(() => got as T));
    });
  }
  if (process.env.VCPUD_REQUIRE_KVM === '1') {
    return describe(name, () => {
      it(`needs ${what} (VCPUD_REQUIRE_KVM=1)`, () => {
        throw new Error(`VCPUD_REQUIRE_KVM=1 but ${problem}`);
      });
    });
  }
  console.warn(`\n*** SKIPPING "${name}": ${problem} ***\n`);
  return describe.skip(name, () => fn(none));
}

/**
 * The guest memory source in-process registries use: anonymous memory, or with
 * VCPUD_TEST_STATE_DIR=1 files in a state directory on /dev/shm (the --state-dir backing), so the
 * same suites run on both. Call it in a describe block: the directory goes after the block.
 */
export function testMemorySource(): GuestMemorySource {
  if (process.env.VCPUD_TEST_STATE_DIR !== '1') return anonymousMemory;
  const dir = fs.mkdtempSync('/dev/shm/vcpud-test-state-');
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));
  return new StateDirMemory(dir);
}

/**
 * A VM for tests of vCPU state: an in-kernel irqchip, 2 MiB of memory at 0 and vCPU 0 given the
 * host's supported CPUID (`bare`: neither, the vCPU as KVM creates it). The caller closes the VM.
 */
export function stateTestVcpu(kvm: Kvm, opts: { bare?: boolean } = {}): { vm: Vm; vcpu: Vcpu } {
  const vm = kvm.createVm();
  vm.createIrqchip();
  if (!opts.bare) vm.addMemory(0, 2 * 1024 * 1024);
  const vcpu = vm.createVcpu(0);
  if (!opts.bare) vcpu.setCpuid2(kvm.supportedCpuid());
  return { vm, vcpu };
}
