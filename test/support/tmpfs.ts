/**
 * A small tmpfs for tests that need a full disk. Mounting needs root (CAP_SYS_ADMIN): where it is
 * not permitted the suite skips with a loud reason, or fails when CI demands KVM tests
 * (VCPUD_REQUIRE_KVM=1), since those run as root there.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describeKvmWith } from './kvm';

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

/** describeKvmWith() a tmpfs of `size`: `fn` gets it, unmounted after the suite. */
export function describeKvmWithTmpfs(name: string, size: string, fn: (tmpfs: () => Tmpfs) => void): void {
  describeKvmWith(
    name,
    `a ${size} tmpfs`,
    () => {
      const r = mountTmpfs(size);
      return typeof r === 'string' ? { unavailable: r } : r;
    },
    (t) => t.unmount(),
    fn,
  );
}
