/**
 * Exit round trips per second (guest OUT -> userspace -> back into the guest) through the vcpud
 * runtime against a C loop doing the same (bench/c/exit_loop), in the same run, as a ratio.
 */
import fs from 'node:fs';
import { Kvm } from '../src/ffi/kvm';
import { VmRegistry } from '../src/vm/registry';
import { cFloor, guestBin, table } from './floors';

const SECONDS = Number(process.env.BENCH_SECONDS ?? 2);
const KVM_EXIT_IO = '2';

async function main(): Promise<void> {
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
  console.log(`exit round trips per second over ${SECONDS} s (counter64: one OUT per console byte and value)\n`);
  console.log(
    table(
      ['path', 'exits/s', 'ratio to C'],
      [
        ['raw C loop (bench/c/exit_loop)', floor.exits_per_second, 1],
        ['vcpud runtime (native run thread)', rate, rate / floor.exits_per_second],
      ],
    ),
  );
  console.log(`\n(${exits} exits, ${consoleBytes} console bytes delivered to JS)`);
  registry.destroyAll();
  kvm.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
