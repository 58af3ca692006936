/**
 * A pool of 2 MiB pages with a hugetlbfs mount on it, for vcpuds whose --state-dir should hold guest
 * memory in huge pages (what an operator gives a pod with `medium: HugePages-2Mi`). Reserving raises
 * /proc/sys/vm/nr_hugepages by `pages` (root only) and release() puts back the value it found and
 * unmounts, so nothing outlives the suite or bench that asked.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describeKvmWith } from './kvm';

const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';

export interface HugepagePool {
  /** A hugetlbfs mount (2 MiB pages) over the pool: make one state directory per vcpud under it. */
  mount: string;
  pages: number;
  release(): void;
}

const meminfo = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(fs.readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);

/** Reserves `pages` more 2 MiB pages and mounts hugetlbfs over them, or says why it cannot (not root, no memory, no hugetlbfs). */
export function reserveHugepagePool(pages: number): HugepagePool | { unavailable: string } {
  if (!fs.existsSync(NR_HUGEPAGES)) return { unavailable: `${NR_HUGEPAGES} is missing: the kernel has no hugetlb support` };
  if (meminfo('Hugepagesize') !== 2048) return { unavailable: `the default huge page size is ${meminfo('Hugepagesize')} kB, not 2048` };
  const before = Number(fs.readFileSync(NR_HUGEPAGES, 'utf8'));
  const freeBefore = meminfo('HugePages_Free');
  try {
    fs.writeFileSync(NR_HUGEPAGES, String(before + pages));
  } catch (e) {
    return { unavailable: `cannot raise ${NR_HUGEPAGES} (${(e as NodeJS.ErrnoException).code}): the pool needs root` };
  }
  const restore = () => fs.writeFileSync(NR_HUGEPAGES, String(before));
  if (meminfo('HugePages_Free') - freeBefore < pages) {
    const got = meminfo('HugePages_Free') - freeBefore;
    restore();
    return { unavailable: `the kernel found ${got} of ${pages} free 2 MiB pages (memory too fragmented or short)` };
  }
  const mount = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-hugetlbfs-'));
  try {
    execFileSync('mount', ['-t', 'hugetlbfs', '-o', 'pagesize=2M', 'none', mount], { stdio: 'pipe' });
  } catch (e) {
    restore();
    fs.rmdirSync(mount);
    return { unavailable: `mount -t hugetlbfs failed: ${String((e as { stderr?: Buffer }).stderr ?? e).trim()}` };
  }
  return {
    mount,
    pages,
    release() {
      execFileSync('umount', [mount]);
      fs.rmdirSync(mount);
      restore();
    },
  };
}

/** describeKvmWith() a pool of `pages` 2 MiB pages with hugetlbfs over it, released after the suite. */
export function describeKvmWithHugepages(name: string, pages: number, fn: (pool: () => HugepagePool) => void): void {
  describeKvmWith(
    name,
    `a pool of ${pages} 2 MiB pages`,
    () => reserveHugepagePool(pages),
    (p) => p.release(),
    fn,
  );
}
