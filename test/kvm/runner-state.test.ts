/**
 * VcpuRunner.state() is status().state without the object: state accesses (GetState) check it on
 * every call. It must say the same in every run state a vCPU goes through.
 */
import { Kvm } from '../../src/ffi/kvm';
import type { NativeVcpuRunner } from '../../src/ffi/native';
import { VmRegistry } from '../../src/vm/registry';
import { describeKvm, KVM_PATH } from '../support/kvm';
import { loadGuest, waitForConsole } from '../support/runtime';

describeKvm('VcpuRunner.state()', () => {
  it('equals status().state when created, running and paused', async () => {
    const kvm = Kvm.open(KVM_PATH);
    const registry = new VmRegistry(kvm);
    try {
      const vm = registry.create({ memoryBytes: 2 * 1024 * 1024, vcpuCount: 1 });
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
    } finally {
      registry.destroyAll();
      kvm.close();
    }
  });
});
