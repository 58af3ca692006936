/**
 * Gate for the nested lab tests (test/lab): they need QEMU, Debian's kernel and the lab initramfs,
 * all installed by scripts/provision-lab.sh (which the test command runs). Without them the
 * suites skip with a loud reason, or fail when CI demands the lab (VCPUD_REQUIRE_LAB=1).
 * The lab needs no /dev/kvm on the host: QEMU emulates the CPU (TCG).
 */
import { readLabInfo } from '../lab/lab-vm';

function labUnavailableReason(): string | undefined {
  if (process.env.VCPUD_SKIP_LAB === '1') return 'VCPUD_SKIP_LAB=1';
  return readLabInfo().problem;
}

export const labUnavailable = labUnavailableReason();

/** describe() for suites that need the nested lab VM. */
export function describeLab(name: string, fn: () => void): void {
  if (!labUnavailable) return describe(name, fn);
  if (process.env.VCPUD_REQUIRE_LAB === '1') {
    return describe(name, () => {
      it('requires the nested lab (VCPUD_REQUIRE_LAB=1)', () => {
        throw new Error(`VCPUD_REQUIRE_LAB=1 but the nested lab is unavailable: ${labUnavailable}`);
      });
    });
  }
  console.warn(`\n*** SKIPPING "${name}": the nested lab is unavailable: ${labUnavailable} ***\n`);
  return describe.skip(name, fn);
}
