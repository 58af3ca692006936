/**
 * Live migration over mTLS (TCP loopback) on two vcpud builds side by side: an idle guest with
 * random memory moved from a source to a destination vcpud of the same build, the builds
 * alternating round by round, beside Node's TLS floor measured in each round (bench/migration.ts's
 * floorRate). Per build: pass 1's MiB/s, its ratio to the round's floor, and the CPU each side
 * spent per GiB (the figure a shared 2-core host moves least).
 *
 *   VCPUD_BEFORE=DIR/dist/src/server/main.js node dist/bench/migration-mtls.js
 * (without VCPUD_BEFORE only this build runs). BENCH_MIGRATION_NODE_ARGS passes Node flags to the
 * vcpuds (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof"), BENCH_MIGRATION_LOGS=DIR keeps their output.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { issueClients, localhostTarget, MIGRATOR, migrationDialArgs, mtlsServeArgs, ORCHESTRATOR } from '../test/support/mtls';
import { makePki } from '../test/support/pki';
import { call, startVcpud, VCPUD_MAIN, type VcpudProcess } from '../test/support/vcpud-process';
import { fatal, knob, median, MiB, table } from './floors';
import { floorRate, migrateMeasured, randomVm } from './migration';

const BEFORE = knob('VCPUD_BEFORE', '', 'migration-mtls: main.js of the build to compare this one with (optional)');
const SIZE = Number(knob('BENCH_MIGRATION_MIB', '1024', 'migration-mtls: guest size in MiB')) * MiB;
const ROUNDS = Number(knob('BENCH_ROUNDS', '3', 'migration-mtls: rounds, builds alternating'));
const PREALLOCATE =
  knob('BENCH_MIGRATION_PREALLOCATE', '0', 'migration-mtls: 1 has the destination commit the guest memory before pass 1 (preallocateDestinationMemory)') ===
  '1';
const NODE_ARGS = (process.env.BENCH_MIGRATION_NODE_ARGS ?? '').split(' ').filter(Boolean);

interface Figures {
  mibs: number;
  ratio: number;
  sourceMs: number;
  destinationMs: number;
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-bench-mtls-'));
  const pki = makePki(path.join(dir, 'pki'));
  issueClients(pki, MIGRATOR, ORCHESTRATOR);
  const builds = [{ name: 'after', main: VCPUD_MAIN }, ...(BEFORE ? [{ name: 'before', main: BEFORE }] : [])];
  const daemons: VcpudProcess[] = [];
  const figures = new Map<string, Figures[]>(builds.map((b) => [b.name, []]));
  const rows: string[][] = [];
  try {
    const pairs = new Map<string, { src: VcpudProcess; dst: VcpudProcess }>();
    for (const b of builds) {
      const dst = await startVcpud(mtlsServeArgs(pki, [MIGRATOR, ORCHESTRATOR]), {}, NODE_ARGS, { main: b.main });
      daemons.push(dst);
      const src = await startVcpud(migrationDialArgs(pki, MIGRATOR), {}, NODE_ARGS, { main: b.main });
      daemons.push(src);
      pairs.set(b.name, { src, dst });
    }
    for (let round = 1; round <= ROUNDS; round++) {
      const order = round % 2 ? builds : [...builds].reverse();
      const floor = await floorRate(SIZE, dir, pki);
      rows.push([String(round), 'TLS floor', floor.rate.toFixed(0), '1.00', floor.cpu.sendMs.toFixed(0), floor.cpu.receiveMs.toFixed(0)]);
      for (const b of order) {
        const { src, dst } = pairs.get(b.name)!;
        const id = await randomVm(src.client('VmService'), SIZE);
        const moved = await migrateMeasured(src, dst, { vmId: id, destination: localhostTarget(dst), preallocateDestinationMemory: PREALLOCATE }, SIZE);
        await call(dst.client('VmService', pki.clientCreds(ORCHESTRATOR), localhostTarget(dst)), 'DeleteVm', { vmId: moved.id });
        const f = { mibs: moved.pass1MiBs, ratio: moved.pass1MiBs / floor.rate, sourceMs: moved.cpu.sendMs, destinationMs: moved.cpu.receiveMs };
        figures.get(b.name)!.push(f);
        rows.push([String(round), b.name, f.mibs.toFixed(0), f.ratio.toFixed(2), f.sourceMs.toFixed(0), f.destinationMs.toFixed(0)]);
      }
    }
  } finally {
    // BENCH_MIGRATION_LOGS=DIR keeps each vcpud's output (e.g. with --trace-gc among the Node flags).
    const logs = process.env.BENCH_MIGRATION_LOGS;
    if (logs) for (const [i, d] of daemons.entries()) fs.writeFileSync(path.join(logs, `vcpud-${i}-${d.proc.pid}.log`), d.logs());
    await Promise.all(daemons.map((d) => d.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  }
  console.log(
    `Idle ${SIZE / MiB} MiB guest, pre-copy over mTLS (TCP loopback)${PREALLOCATE ? ', destination memory preallocated' : ''}, ${ROUNDS} rounds; load: ${os
      .loadavg()
      .map((l) => l.toFixed(2))
      .join(' ')}\n`,
  );
  console.log(table(['round', 'build', 'pass 1 MiB/s', 'x TLS floor', 'source (sender) CPU ms/GiB', 'destination (receiver) CPU ms/GiB'], rows));
  for (const [name, fs_] of figures)
    console.log(
      `${name}: median pass 1 ${median(fs_.map((f) => f.mibs)).toFixed(0)} MiB/s = ${median(fs_.map((f) => f.ratio)).toFixed(2)} x the TLS floor; ` +
        `CPU per GiB source ${median(fs_.map((f) => f.sourceMs)).toFixed(0)} ms + destination ${median(fs_.map((f) => f.destinationMs)).toFixed(0)} ms`,
    );
}

if (require.main === module) main().catch(fatal);
