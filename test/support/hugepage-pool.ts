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

/** /proc/meminfo's values of `keys`, from one reading of it (0 for a key it lacks). */
function meminfo<K extends string>(...keys: K[]): Record<K, number> {
  const text = fs.readFileSync('/proc/meminfo', 'utf8');
  return Object.fromEntries(keys.map((k) => [k, Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0)])) as Record<K, number>;
}

/** Huge pages of the host's pool taken: faulted in, or reserved by a mapping for its later faults. */
export function hugepagesTaken(): number {
  const m = meminfo('HugePages_Total', 'HugePages_Free', 'HugePages_Rsvd');
  return m.HugePages_Total - m.HugePages_Free + m.HugePages_Rsvd;
}

/** Reserves `pages` more 2 MiB pages and mounts hugetlbfs over them, or says why it cannot (not root, no memory, no hugetlbfs). */
export function reserveHugepagePool(pages: number): HugepagePool | { unavailable: string } {
  if (!fs.existsSync(NR_HUGEPAGES)) return { unavailable: `${NR_HUGEPAGES} is missing: the kernel has no hugetlb support` };
  const { Hugepagesize, HugePages_Free: freeBefore } = meminfo('Hugepagesize', 'HugePages_Free');
  if (Hugepagesize !== 2048) return { unavailable: `the default huge page size is ${Hugepagesize} kB, not 2048` };
  const before = Number(fs.readFileSync(NR_HUGEPAGES, 'utf8'));
  try {
    fs.writeFileSync(NR_HUGEPAGES, String(before + pages));
  } catch (e) {
    return { unavailable: `cannot raise ${NR_HUGEPAGES} (${(e as NodeJS.ErrnoException).code}): the pool needs root` };
  }
  const restore = () => fs.writeFileSync(NR_HUGEPAGES, String(before));
  const got = meminfo('HugePages_Free').HugePages_Free - freeBefore;
  if (got < pages) {
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
