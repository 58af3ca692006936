/**
 * ManagedVcpu.withStateNow: GetState's state access. A paused vCPU with a free lock is read in the
 * caller's turn (the value itself, no promise); a held lock or a running vCPU goes through withState
 * (a promise, the running vCPU paused for the access and resumed after); an error thrown by the access
 * comes back the same way and leaves the lock free.
 */
import { describeKvm } from '../support/kvm';
import { DEFAULT_LIMITS } from '../../src/vm/limits';
import { loadGuest, useRegistry, waitForConsole } from '../support/runtime';

describeKvm('ManagedVcpu.withStateNow (real KVM)', () => {
  const registry = useRegistry(DEFAULT_LIMITS);
  it('answers in the same turn when it can, and through withState when it cannot', async () => {
    const vm = registry().create({ memoryBytes: 2 * 1024 * 1024, vcpuCount: 1 });
    const v = vm.vcpu(0);
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitForConsole(vm, '\n3\n');
    // Running: a promise, the vCPU paused for the access and running again after it.
    const whileRunning = v.withStateNow((a) => a.implicitlyPaused);
    expect(whileRunning).toBeInstanceOf(Promise);
    expect(await whileRunning).toBe(true);
    expect(v.status().state).toBe('running');
    await v.pause();
    // Paused, lock free: the value itself.
    expect(v.withStateNow((a) => ({ implicitlyPaused: a.implicitlyPaused, rip: v.vcpu.getRegs().rip > 0n }))).toEqual({ implicitlyPaused: false, rip: true });
    expect(() =>
      v.withStateNow(() => {
        throw new Error('in the access');
      }),
    ).toThrow('in the access');
    // Lock held by another access: a promise that runs after it.
    let release!: () => void;
    const order: string[] = [];
    const holder = v.withState(() => new Promise<void>((r) => (release = r)).then(() => void order.push('holder')));
    const queued = v.withStateNow(() => order.push('queued'));
    expect(queued).toBeInstanceOf(Promise);
    release();
    await Promise.all([holder, queued]);
    expect(order).toEqual(['holder', 'queued']);
    // Free again: the next access is answered in the same turn.
    expect(v.withStateNow(() => 'now')).toBe('now');
  });
});
