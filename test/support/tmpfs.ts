/**
 * A small tmpfs for tests that need a full disk. Mounting needs root (CAP_SYS_ADMIN): where it is
 * not permitted the suite skips with a loud reason, or fails when CI demands KVM tests
 * (VCPUD_REQUIRE_KVM=1), since those run as root there.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describeKvm, kvmUnavailable } from './kvm';

export interface Tmpfs {
  dir: string;
  unmount(): void;
}

/**
 * Mounts a tmpfs of `size` (mount(8) syntax, e.g. "16m") on a fresh directory, with `options` added
 * (e.g. "huge=within_size"); a string says why not.
 */
export function mountTmpfs(size: string, options = ''): Tmpfs | string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-tmpfs-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size},mode=0700${options ? `,${options}` : ''}`, 'tmpfs', dir], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
  } catch (e) {
    fs.rmSync(dir, { recursive: true, force: true });
    const stderr = (e as { stderr?: Buffer }).stderr?.toString().trim();
    return `mount -t tmpfs is not permitted here: ${stderr || (e as Error).message}`;
  }
  return {
    dir,
    unmount() {
      execFileSync('umount', [dir]);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * describeKvm() for a suite that also needs a tmpfs of `size`: `fn` gets it, and it is unmounted
 * after the suite. Nothing is mounted when the KVM gate already skips the suite.
 */
export function describeKvmWithTmpfs(name: string, size: string, fn: (tmpfs: () => Tmpfs) => void): void {
  if (kvmUnavailable) return describeKvm(name, () => fn(() => ({ dir: '', unmount() {} })));
  let mounted: Tmpfs | undefined;
  const problem = (() => {
    const r = mountTmpfs(size);
    if (typeof r === 'string') return r;
    mounted = r;
    return undefined;
  })();
  if (!problem) {
    // Unmounted from an outer block: its afterAll runs after the suite's own (which stops vcpud and
    // with it any mapping of a file there that would make umount fail with EBUSY).
    return describe(name, () => {
      afterAll(() => mounted?.unmount());
      describe('on the tmpfs', () => fn(() => mounted as Tmpfs));
    });
  }
  if (process.env.VCPUD_REQUIRE_KVM === '1') {
    return describe(name, () => {
      it('needs a tmpfs mount (VCPUD_REQUIRE_KVM=1)', () => {
        throw new Error(`VCPUD_REQUIRE_KVM=1 but ${problem}`);
      });
    });
  }
  console.warn(`\n*** SKIPPING "${name}": ${problem} ***\n`);
  return describe.skip(name, () => fn(() => mounted as Tmpfs));
}
