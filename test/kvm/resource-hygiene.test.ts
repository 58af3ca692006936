/** Creating and releasing VMs leaks nothing: the process's open fds return to where they were. */
import fs from 'node:fs';
import { Kvm } from '../../src/ffi/kvm';
import { describeKvm, KVM_PATH } from '../support/kvm';

const openFds = () => fs.readdirSync('/proc/self/fd').length;

describeKvm('ffi: resource hygiene', () => {
  it('1000 VMs with memory, irqchip and two vCPUs each are created and released without a leaked fd', () => {
    const kvm = Kvm.open(KVM_PATH);
    try {
      const before = openFds();
      for (let i = 0; i < 1000; i++) {
        const vm = kvm.createVm();
        vm.createIrqchip();
        vm.addMemory(0, 2 * 1024 * 1024);
        vm.createVcpu(0);
        vm.createVcpu(1);
        vm.close();
      }
      expect(openFds()).toBe(before);
    } finally {
      kvm.close();
    }
  });
});
