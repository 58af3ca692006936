/**
 * VcpuRunner.state() is status().state without the object: state accesses (GetState) check it on
 * every call. It must say the same in every run state a vCPU goes through.
 */
import type { NativeVcpuRunner } from '../../src/ffi/native';
import { describeKvm } from '../support/kvm';
import { DEFAULT_LIMITS } from '../../src/vm/limits';
import { loadGuest, useRegistry, waitForConsole } from '../support/runtime';

describeKvm('VcpuRunner.state()', () => {
  const registry = useRegistry(DEFAULT_LIMITS);
  it('equals status().state when created, running and paused', async () => {
    const vm = registry().create({ memoryBytes: 2 * 1024 * 1024, vcpuCount: 1 });
    // The ManagedVcpu's own run thread (private: nothing outside src/vm drives it).
    const runner = Reflect.get(vm.vcpu(0), 'runner') as NativeVcpuRunner;
    const seen: string[] = [];
    const check = () => {
      const s = runner.status().state;
      expect(runner.state()).toBe(s);
      seen.push(s);
    };
    check();
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitForConsole(vm, '\n3\n');
    check();
    await vm.vcpu(0).pause();
    check();
    expect(seen).toEqual(['created', 'running', 'paused']);
  });
});
