/**
 * The load part of a chain restore alone, in this process (no VM, no gRPC): loadSnapshot by file
 * (lazy) of the full snapshot and of the chains of depth 2 and 8 of bench/snapshot-chain-restore.ts,
 * until every checksum matched, optionally alternating with another build's modules
 * (VCPUD_BEFORE_ROOT: its package root, built). Prints per build and snapshot the median wall and
 * process CPU ms (pool threads included), the bytes mapped and copied, and the VMAs afterwards.
 *
 *   VCPUD_BEFORE_ROOT=DIR node dist/bench/snapshot-chain-load.js
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startVcpud } from '../test/support/vcpud-process';
import { fatal, knob, median, MiB, ROOT, table } from './floors';
import { DEPTH, ROUNDS, SIZE, writeChain } from './snapshot-chain-restore';

const BEFORE_ROOT = knob('VCPUD_BEFORE_ROOT', '', 'snapshot-chain-load: package root of a build to compare this one with (optional)');
const NAMES = ['full', 'c2', `c${DEPTH}`];

type Reader = typeof import('../src/vm/snapshot-reader');
type Chain = typeof import('../src/vm/snapshot-chain');
type Store = typeof import('../src/vm/snapshot-store');

function modules(root: string) {
  const vm = path.join(root, 'dist', 'src', 'vm');
  return {
    reader: require(path.join(vm, 'snapshot-reader')) as Reader,
    chain: require(path.join(vm, 'snapshot-chain')) as Chain,
    store: require(path.join(vm, 'snapshot-store')) as Store,
  };
}

async function loadOnce(m: ReturnType<typeof modules>, dir: string, name: string) {
  const store = new m.store.SnapshotStore(dir);
  const { fd } = await store.openForRead(name);
  const [t0, c0] = [performance.now(), process.cpuUsage()];
  const loaded = await m.reader.loadSnapshot(new m.reader.FileSource(fd), { check: () => {}, loadParent: m.chain.chainLoader(store, name) }, fd);
  const [ms, cpu] = [performance.now() - t0, process.cpuUsage(c0)];
  const vmas = fs.readFileSync('/proc/self/maps', 'utf8').split('\n').length - 1;
  loaded.memory.release();
  fs.closeSync(fd);
  return { ms, cpuMs: (cpu.user + cpu.system) / 1000, mapped: loaded.mappedBytes / MiB, copied: loaded.copiedBytes / MiB, vmas };
}

async function makeChain(snapDir: string): Promise<void> {
  const d = await startVcpud(['--snapshot-dir', snapDir, '--max-memory-per-vm', '2Gi']);
  try {
    await writeChain(d);
  } finally {
    await d.stop();
  }
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-chain-load-'));
  try {
    await makeChain(dir);
    const builds = [{ name: 'this', m: modules(ROOT) }, ...(BEFORE_ROOT ? [{ name: 'before', m: modules(BEFORE_ROOT) }] : [])];
    const runs = builds.map(() => Object.fromEntries(NAMES.map((n) => [n, [] as Awaited<ReturnType<typeof loadOnce>>[]])));
    const load = os.loadavg()[0].toFixed(2);
    for (let round = 0; round < ROUNDS; round++)
      for (let b = 0; b < builds.length; b++) {
        const i = (b + round) % builds.length;
        for (const name of NAMES) runs[i][name].push(await loadOnce(builds[i].m, dir, name));
      }
    const rows = builds.flatMap((b, i) =>
      NAMES.map((name) => {
        const r = runs[i][name];
        return [
          b.name,
          name,
          median(r.map((x) => x.ms)).toFixed(1),
          median(r.map((x) => x.cpuMs)).toFixed(1),
          r[0].mapped.toFixed(0),
          r[0].copied.toFixed(2),
          r[0].vmas,
        ];
      }),
    );
    console.log(
      `loadSnapshot (lazy, by file, to every checksum matched), ${SIZE / MiB} MiB, ${ROUNDS} rounds, medians; load average ${load} -> ${os.loadavg()[0].toFixed(2)}`,
    );
    console.log(table(['build', 'snapshot', 'wall ms', 'CPU ms', 'mapped MiB', 'copied MiB', 'VMAs after'], rows));
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module) main().catch(fatal);
