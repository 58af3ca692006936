/**
 * vCPU throttle (live migration's auto-converge) on the real kernel: a guest that never exits
 * (dirty64, unpaced) and one that exits on every count (counter64) both slow down when the run
 * thread sleeps a share of each slice. Only "throttled < unthrottled" is asserted; the ratios are
 * printed.
 */
import type { ManagedVm } from '../../src/vm/managed-vm';
import { DIRTY64, dirty64Control } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { counterInMemory, loadGuest, useRegistry, waitUntil } from '../support/runtime';

const MiB = 1 << 20;
const WINDOW_MS = 400;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Counts per second of `read` over one window. */
async function rate(read: () => bigint): Promise<number> {
  const t0 = process.hrtime.bigint();
  const c0 = read();
  await sleep(WINDOW_MS);
  const c1 = read();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  return Number(c1 - c0) / s;
}

describeKvm('vCPU throttle (real KVM)', () => {
  const registry = useRegistry({ maxVms: 2, maxVcpusPerVm: 1, maxMemoryPerVmBytes: 64 * MiB, maxMemoryTotalBytes: 128 * MiB });

  async function measure(vm: ManagedVm, read: () => bigint, label: string) {
    await vm.resumeAll();
    await waitUntil(() => read() > 0n, `${label} to start`);
    const free = await rate(read);
    const rates: Record<number, number> = {};
    for (const p of [50, 90]) {
      vm.vcpu(0).setThrottle(p);
      await sleep(30); // the new share starts with the next slice
      expect(vm.vcpu(0).status()).toMatchObject({ state: 'running', throttle: p });
      rates[p] = await rate(read);
    }
    vm.vcpu(0).setThrottle(0);
    expect(vm.vcpu(0).status().throttle).toBeUndefined();
    const after = await rate(read);
    console.log(
      `${label}: unthrottled ${free.toFixed(0)}/s; 50%: ${(rates[50] / free).toFixed(2)}x; 90%: ${(rates[90] / free).toFixed(2)}x; off again: ${(after / free).toFixed(2)}x`,
    );
    expect(rates[90]).toBeLessThan(free);
    expect(rates[90]).toBeLessThan(after);
  }

  it('slows a guest that never exits (dirty64, unpaced)', async () => {
    const vm = registry().create({ memoryBytes: 64 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'dirty64');
    vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: 8 * MiB, rangePages: 4096 }));
    await measure(vm, () => vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0), 'dirty64 pages');
  });

  it('slows a guest that exits on every count (counter64)', async () => {
    const vm = registry().create({ memoryBytes: 64 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await measure(vm, () => counterInMemory(vm), 'counter64 counts');
  });

  it('a pause cuts the sleep short; the throttle survives pause and resume; bad values are refused', async () => {
    const vm = registry().create({ memoryBytes: 64 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'dirty64');
    vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: 8 * MiB, rangePages: 16 }));
    vm.vcpu(0).setThrottle(99);
    await vm.resumeAll();
    await sleep(50);
    const t0 = process.hrtime.bigint();
    await vm.pauseAll();
    console.log(`pause at 99% throttle took ${(Number(process.hrtime.bigint() - t0) / 1e6).toFixed(1)} ms`);
    const v = vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0);
    await sleep(30);
    expect(vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0)).toBe(v); // really paused
    expect(vm.vcpu(0).status()).toMatchObject({ state: 'paused', throttle: 99 });
    await vm.resumeAll();
    await waitUntil(() => vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0) > v, 'progress at 99%');
    expect(() => vm.vcpu(0).setThrottle(100)).toThrow(/0\.\.99/);
    expect(() => vm.vcpu(0).setThrottle(-1)).toThrow();
  });
});
