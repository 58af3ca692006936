/** Creating and releasing VMs leaks nothing (open fds return to where they were), and an idle vcpud stays asleep. */
import { Kvm } from '../../src/ffi/kvm';
import { describeKvm, KVM_PATH } from '../support/kvm';
import { fdCount, mainThreadWakeups } from '../support/proc-resources';
import { startVcpud } from '../support/vcpud-process';

const openFds = () => fdCount(process.pid);

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

describeKvm('vcpud: idle', () => {
  it('an idle vcpud wakes its main thread at most 30 times a second (the event-loop lag sampler at 100 ms, not 10)', async () => {
    const d = await startVcpud();
    try {
      await new Promise((r) => setTimeout(r, 1000)); // start-up's own work settles
      const before = mainThreadWakeups(d.proc.pid!);
      await new Promise((r) => setTimeout(r, 3000));
      const perSecond = (mainThreadWakeups(d.proc.pid!) - before) / 3;
      // prom-client's default 10 ms sampler alone woke it ~100 times a second.
      expect(perSecond).toBeLessThan(30);
    } finally {
      await d.stop();
    }
  });
});
