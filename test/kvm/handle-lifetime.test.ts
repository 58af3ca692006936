/**
 * Handles that cannot reach another VM: a closed Vm or Vcpu refuses every call (NOT_FOUND,
 * VM_NOT_FOUND) instead of passing its old fd number, which the kernel gives to the next VM; a
 * descriptor held by an ioctl on the libuv pool is closed only when that ioctl is done; a vCPU's run
 * thread is stopped before its fd goes; a vCPU deleted while it pauses is not touched after the pause.
 */
import fs from 'node:fs';
import { VcpudError } from '../../src/errors';
import { Kvm } from '../../src/ffi/kvm';
import { native } from '../../src/ffi/native';
import { VmRegistry } from '../../src/vm/registry';
import { describeKvm, KVM_PATH } from '../support/kvm';
import { loadGuest, waitForConsole } from '../support/runtime';

const MiB = 1024 * 1024;

function expectVmNotFound(fn: () => unknown): void {
  let thrown: unknown;
  try {
    fn();
  } catch (e) {
    thrown = e;
  }
  expect(thrown).toBeInstanceOf(VcpudError);
  expect({ kind: (thrown as VcpudError).kind, reason: (thrown as VcpudError).details.reason }).toEqual({ kind: 'not_found', reason: 'VM_NOT_FOUND' });
}

const fdIsOpen = (fd: number) => fs.existsSync(`/proc/self/fd/${fd}`);

describeKvm('handle lifetime: no call reaches a closed VM or another VM', () => {
  let kvm: Kvm;
  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
  });
  afterAll(() => kvm.close());

  it('a closed Vm and Vcpu refuse every call, even when their fd numbers belong to a new VM', () => {
    const old = kvm.createVm();
    old.addMemory(0, 2 * MiB);
    const oldVcpu = old.createVcpu(0);
    const [vmFd, vcpuFd] = [old.fd, oldVcpu.fd];
    old.close();
    // The kernel reuses the lowest free numbers: the next VM gets the old ones.
    const next = kvm.createVm();
    next.addMemory(0, 2 * MiB);
    const nextVcpu = next.createVcpu(0);
    expect(new Set([vmFd, vcpuFd])).toEqual(new Set([next.fd, nextVcpu.fd]));
    const regs = nextVcpu.getRegs();
    expectVmNotFound(() => oldVcpu.getRegs());
    expectVmNotFound(() => oldVcpu.setRegs({ ...regs, r15: 0x5eedn }));
    expectVmNotFound(() => oldVcpu.getMsrs([0x174]));
    expectVmNotFound(() => oldVcpu.fd);
    expectVmNotFound(() => old.getClock());
    expectVmNotFound(() => old.readMemory(0, 8));
    expectVmNotFound(() => old.writeMemory(0, Buffer.alloc(8, 1)));
    expect(nextVcpu.getRegs().r15).toBe(regs.r15);
    expect(next.readMemory(0, 8)).toEqual(Buffer.alloc(8));
    next.close();
  });

  it('a VM closed while an ioctl on the libuv pool holds its fd closes the fd when the ioctl is done', async () => {
    const vm = kvm.createVm();
    const fd = vm.fd;
    const memory = new native.GuestMemory(64 * MiB);
    const adding = vm.addMemoryAsync(0, memory); // KVM_SET_USER_MEMORY_REGION on the pool
    vm.close();
    expect(fdIsOpen(fd)).toBe(true); // still held by the pool's ioctl
    await adding;
    expect(fdIsOpen(fd)).toBe(false);
  });

  it('closing a vCPU stops its run thread first (the thread never runs on a reused fd)', () => {
    const vm = kvm.createVm();
    const vcpu = vm.createVcpu(0);
    const runner = vcpu.createRunner(() => {});
    vm.close();
    expect(() => runner.resume()).toThrow(/runner destroyed/);
  });

  it('a running vCPU whose VM is deleted while withState pauses it: NOT_FOUND, and the new VM untouched', async () => {
    const registry = new VmRegistry(kvm);
    const a = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(a, 'counter64');
    await a.resumeAll();
    await waitForConsole(a, '\n5\n');
    let touched = false;
    const access = a.vcpu(0).withState(() => {
      touched = true;
      return a.vcpu(0).vcpu.getRegs();
    });
    registry.destroy(a.id); // while the pause is on its way
    const b = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    const before = b.vcpu(0).vcpu.getRegs();
    await expect(access).rejects.toMatchObject({ kind: 'not_found', details: { reason: 'VM_NOT_FOUND' } });
    expect(touched).toBe(false);
    expect(b.vcpu(0).vcpu.getRegs()).toEqual(before);
    registry.destroyAll();
  });
});
