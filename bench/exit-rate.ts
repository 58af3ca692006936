/**
 * Exit round trips per second (guest OUT -> userspace -> back into the guest) through the vcpud
 * runtime against a C loop doing the same (bench/c/exit_loop), in the same run, as a ratio.
 */
import fs from 'node:fs';
import { Kvm } from '../src/ffi/kvm';
import { VmRegistry } from '../src/vm/registry';
import { cFloor, fatal, guestBin, knob, ratioRow, table, type BenchResult } from './floors';

const SECONDS = Number(knob('BENCH_SECONDS', '2', 'exit-rate: seconds the guest runs (C loop and vcpud each)'));
const KVM_EXIT_IO = '2';

/** One row, no target (the issue sets none): vcpud's exit rate beside the C loop's. */
export async function measureExitRate(): Promise<BenchResult> {
  const floor = cFloor('exit_loop', [guestBin('counter64'), String(SECONDS)]) as { exits_per_second: number };
  const kvm = Kvm.open();
  const registry = new VmRegistry(kvm);
  const vm = registry.create({ memoryBytes: 2 << 20, vcpuCount: 1 });
  await vm.loadProgram(fs.readFileSync(guestBin('counter64')), 0x1000);
  let consoleBytes = 0;
  vm.on('console', (c) => (consoleBytes += c.length));
  const t0 = process.hrtime.bigint();
  await vm.resumeAll();
  await new Promise((r) => setTimeout(r, SECONDS * 1000));
  await vm.vcpu(0).pause();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const exits = vm.vcpu(0).exitCounts()[KVM_EXIT_IO] ?? 0;
  const rate = exits / seconds;
  registry.destroyAll();
  kvm.close();
  const detail = [
    `exit round trips per second over ${SECONDS} s (counter64: one OUT per console byte and value)\n`,
    table(
      ['path', 'exits/s', 'ratio to C'],
      [
        ['raw C loop (bench/c/exit_loop)', floor.exits_per_second, 1],
        ['vcpud runtime (native run thread)', rate, rate / floor.exits_per_second],
      ],
    ),
    `\n(${exits} exits, ${consoleBytes} console bytes delivered to JS)`,
  ].join('\n');
  return { rows: [ratioRow('exit round trips (guest OUT to userspace and back)', rate, floor.exits_per_second, 'exits/s', 'C KVM_RUN loop')], detail };
}

async function main(): Promise<void> {
  console.log((await measureExitRate()).detail);
}

if (require.main === module) main().catch(fatal);
