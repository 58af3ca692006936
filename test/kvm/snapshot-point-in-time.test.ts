/**
 * A snapshot is one point in time: counter64 held and captured over and over (holdAndPause +
 * captureState, as CreateSnapshot does) while its console and debug values stream, and each time
 * the captured RBX agrees with what the console printed before the pause and with the counter
 * mirror in guest memory, and the vCPU prints nothing more until it is resumed; and a copy restored
 * from each of many such snapshots continues the count with nothing repeated or skipped. (CI saw a
 * two-process snapshot-e2e run where the destination repeated 70 values once; these loops look for
 * that in-process, bounded in count and time.)
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { SECTIONS } from '../../src/ffi/sections';
import { FileSource, loadSnapshot } from '../../src/vm/snapshot-reader';
import { restoreIntoNewVm } from '../../src/vm/snapshot-restore';
import { captureSnapshot, captureState, holdAndPause } from '../../src/vm/snapshot-writer';
import { fileSink } from '../support/file-sink';
import { describeKvm } from '../support/kvm';
import { consoleText, counterInMemory, counterValues, expectConsecutive, loadGuest, useRegistry, waitUntil } from '../support/runtime';
import { firstBreak } from '../support/snapshot';

const MiB = 1024 * 1024;
const CYCLES = 300;
const BUDGET_MS = 30_000;
const RESTORE_CYCLES = 100;

describeKvm('a captured state is one point in time (real KVM)', () => {
  const registry = useRegistry({ maxVms: 2, maxVcpusPerVm: 1, maxMemoryPerVmBytes: 4 * MiB, maxMemoryTotalBytes: 8 * MiB });
  let caps: HostCapabilities;
  beforeAll(() => {
    const kvm = Kvm.open();
    caps = probeCapabilities(kvm);
    kvm.close();
  });

  it(`counter64 held and captured ${CYCLES} times mid-run: RBX matches the console and memory, nothing runs after`, async () => {
    const vm = registry().create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    let debugValues = 0;
    vm.on('debug', () => debugValues++);
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    const end = Date.now() + BUDGET_MS;
    let cycles = 0;
    for (; cycles < CYCLES && Date.now() < end; cycles++) {
      const printed = consoleText(vm).length;
      await waitUntil(() => consoleText(vm).length > printed + (cycles % 7) * 5, 'counter output');
      const held = await holdAndPause(vm, 'point-in-time test');
      try {
        const { vcpus } = await captureState(vm, caps, held.before);
        const regs = vcpus[0].records.find(([name]) => name === 'regs')![1];
        const rbx = BigInt((SECTIONS.regs.decode(regs) as { rbx: bigint }).rbx);
        const text = consoleText(vm);
        // Held before its first line ended (the first cycle waits for one character only): nothing
        // complete is printed yet, and counter64 counts from 1.
        const values = counterValues(text);
        const last = values.length ? BigInt(expectConsecutive(values)) : 0n;
        const partial = text.split('\n').pop()!;
        const where = `cycle ${cycles}: captured RBX ${rbx}, memory ${counterInMemory(vm)}, console ends ${JSON.stringify(text.slice(-40))}`;
        // inc rbx; mov [mirror], rbx; print: RBX is the last printed value or the one being printed.
        expect({ where, ok: partial === '' ? rbx === last || rbx === last + 1n : rbx === last + 1n && String(rbx).startsWith(partial) }).toEqual({
          where,
          ok: true,
        });
        expect({ where, ok: counterInMemory(vm) === rbx || counterInMemory(vm) === rbx - 1n }).toEqual({ where, ok: true });
        await new Promise((r) => setTimeout(r, cycles % 3));
        vm.statuses(); // delivers anything the vCPU printed since
        expect({ where, after: consoleText(vm).length }).toEqual({ where, after: text.length });
        await held.resume();
      } finally {
        held.release();
      }
    }
    expect(debugValues).toBeGreaterThan(0);
    console.log(`point-in-time: ${cycles} holds and captures in ${BUDGET_MS - (end - Date.now())} ms`);
  });

  it('counter64 snapshotted to a file and restored, over and over: the copy continues the count exactly', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-point-in-time-'));
    const file = path.join(dir, 'mid-run.snap');
    const vm = registry().create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    const end = Date.now() + BUDGET_MS;
    let cycles = 0;
    try {
      for (; cycles < RESTORE_CYCLES && Date.now() < end; cycles++) {
        const printed = consoleText(vm).length;
        await waitUntil(() => consoleText(vm).length > printed + (cycles % 7) * 5, 'counter output');
        const held = await holdAndPause(vm, 'point-in-time test');
        try {
          await captureSnapshot(vm, await fileSink(file), { caps, runStates: held.before });
          const source = consoleText(vm);
          const fd = fs.openSync(file, 'r');
          const loaded = await loadSnapshot(new FileSource(fd), { check: () => {}, lazy: true }, fd).finally(() => fs.closeSync(fd));
          const { vm: copy } = await restoreIntoNewVm(registry(), caps, loaded);
          try {
            await copy.resumeAll();
            await waitUntil(() => counterValues(consoleText(copy)).length >= 3, 'the copy counting');
            await copy.pauseAll();
            const at = `cycle ${cycles}: source ends ${JSON.stringify(source.slice(-30))}, copy starts ${JSON.stringify(consoleText(copy).slice(0, 30))}`;
            expect({ at, break: firstBreak(counterValues(source + consoleText(copy))) }).toEqual({ at });
          } finally {
            registry().destroy(copy.id);
          }
          await held.resume();
        } finally {
          held.release();
        }
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    console.log(`point-in-time: ${cycles} snapshots restored in ${BUDGET_MS - (end - Date.now())} ms`);
  });

  it('a hold that begins while a state read has the vCPU implicitly paused records it as running and resumes it', async () => {
    const vm = registry().create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    let holdStarted!: () => void;
    const inRead = new Promise<void>((r) => (holdStarted = r));
    // A GetState-like read: paused for it, resumed after it (unless the hold's pause, queued behind it, comes first).
    const read = vm.vcpu(0).withState(async ({ implicitlyPaused }) => {
      holdStarted();
      await new Promise((r) => setTimeout(r, 20));
      return implicitlyPaused;
    });
    await inRead;
    const held = await holdAndPause(vm, 'point-in-time test');
    try {
      expect(await read).toBe(true);
      expect(held.before).toEqual([expect.objectContaining({ id: 0, state: 'running' })]);
      expect(held.wasRunning).toEqual([0]);
      await held.resume();
      expect(vm.vcpu(0).status().state).toBe('running');
    } finally {
      held.release();
    }
  });
});
