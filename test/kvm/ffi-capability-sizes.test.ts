/**
 * The sizes native/ checks buffers against (KVM_CAP_XSAVE2, KVM_CAP_NESTED_STATE) are facts of the
 * caller's VM, passed in: native/ used to ask a process-wide "last /dev/kvm opened", so closing that
 * one turned the checks off for every other Kvm still open.
 */
import { Kvm } from '../../src/ffi/kvm';
import { native } from '../../src/ffi/native';
import { describeKvm, KVM_PATH } from '../support/kvm';

describeKvm('ffi: capability sizes come from the caller, not from the last /dev/kvm opened', () => {
  let first: Kvm;
  beforeEach(() => {
    first = Kvm.open(KVM_PATH);
    Kvm.open(KVM_PATH).close(); // the last /dev/kvm opened, and closed: the first stays open
  });
  afterEach(() => first.close());

  it('the xsave buffer must hold the size the caller states, on a Kvm opened before another was closed', () => {
    const vm = first.createVm();
    try {
      const vcpu = vm.createVcpu(0);
      const size = vcpu.xsaveSize();
      expect(vcpu.getXsave().length).toBe(size);
      // A buffer one cache line short of what the caller says the kernel will write is refused before any ioctl.
      expect(() => native.getXsave2(vcpu.fd, Buffer.alloc(size), size + 64)).toThrow(`KVM_GET_XSAVE2: buffer is ${size} bytes, needs ${size + 64}`);
      expect(() => native.setXsave(vcpu.fd, Buffer.alloc(size), size + 64)).toThrow(`KVM_SET_XSAVE: buffer is ${size} bytes, needs ${size + 64}`);
      expect(() => native.getXsave2(vcpu.fd, Buffer.alloc(size), undefined as never)).toThrow('KVM_GET_XSAVE2: xsaveSize must be a non-negative integer');
    } finally {
      vm.close();
    }
  });

  it('the nested-state buffer must hold the maximum the caller states', () => {
    const vm = first.createVm();
    try {
      const vcpu = vm.createVcpu(0);
      expect(() => native.getNestedState(vcpu.fd, Buffer.alloc(128), 8320)).toThrow('KVM_GET_NESTED_STATE: buffer is 128 bytes, needs 8320');
    } finally {
      vm.close();
    }
  });
});
