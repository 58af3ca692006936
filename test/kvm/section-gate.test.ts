/**
 * One gate for state sections (ffi/caps.ts sectionGate): the ffi call, GetState/SetState's up-front
 * check and the host report refuse a section for the same reason, in the same words, with the same
 * gRPC answer (FAILED_PRECONDITION, CAPABILITY_MISSING naming the capability). Each capability fact
 * (xsave size, nested-state maximum) is derived once and agrees wherever it is asked.
 */
import * as grpc from '@grpc/grpc-js';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { SECTION_CAPS, sectionGate } from '../../src/ffi/caps';
import { Kvm } from '../../src/ffi/kvm';
import { SECTION_NAMES } from '../../src/ffi/sections';
import type { Vm } from '../../src/ffi/vm';
import { decodeStatusDetails } from '../../src/api/status-details';
import { toServiceError } from '../../src/server/errors';
import { readState, writeState } from '../../src/vm/vcpu-state';
import { describeKvm, KVM_PATH } from '../support/kvm';

function failure(run: () => unknown) {
  try {
    run();
  } catch (e) {
    const s = toServiceError(e);
    return { message: (e as Error).message, code: s.code, details: decodeStatusDetails(s.metadata as grpc.Metadata) };
  }
  throw new Error('expected the call to fail');
}

describeKvm('one section gate on every path', () => {
  let kvm: Kvm;
  let caps: HostCapabilities;
  let vm: Vm;
  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
    caps = probeCapabilities(kvm);
  });
  afterAll(() => kvm.close());
  beforeEach(() => (vm = kvm.createVm()));
  afterEach(() => vm.close());

  it('lapic on a VM without the in-kernel irqchip: the ffi, GetState and SetState refuse it the same way', () => {
    const vcpu = vm.createVcpu(0);
    const ctx = { caps, irqchip: vm.hasIrqchip };
    const paths = {
      ffiGet: failure(() => vcpu.getLapic()),
      ffiSet: failure(() => vcpu.setLapic(Buffer.alloc(1024))),
      getState: failure(() => readState(vcpu, ctx, ['lapic'])),
      setState: failure(() => writeState(vcpu, ctx, { lapic: Buffer.alloc(1024) })),
    };
    for (const [path, f] of Object.entries(paths)) {
      expect({ path, code: f.code, reason: f.details?.errorInfo?.reason }).toEqual({
        path,
        code: grpc.status.FAILED_PRECONDITION,
        reason: 'CAPABILITY_MISSING',
      });
      expect({ path, message: f.message }).toEqual({ path, message: paths.ffiGet.message });
    }
    expect(paths.ffiGet.message).toMatch(/KVM_CAP_IRQCHIP.*in-kernel irqchip/);
  });

  it("writing tsc_khz without KVM_CAP_TSC_CONTROL: the ffi and SetState give the host report's reason", () => {
    const vcpu = vm.createVcpu(0);
    if (kvm.checkExtension('TSC_CONTROL') > 0) {
      console.warn('this host has KVM_CAP_TSC_CONTROL: the refusal is not exercised here (the lapic case covers the gate)');
      return;
    }
    const khz = vcpu.getTscKhz() + 1; // a different value: an unchanged one is accepted as a no-op
    const ffi = failure(() => vcpu.setTscKhz(khz));
    const setState = failure(() => writeState(vcpu, { caps, irqchip: vm.hasIrqchip }, { tsc_khz: khz }));
    expect(setState).toEqual(ffi);
    expect(ffi.details?.errorInfo).toMatchObject({ reason: 'CAPABILITY_MISSING', metadata: expect.objectContaining({ capability: 'KVM_CAP_TSC_CONTROL' }) });
    expect(ffi.message).toContain(caps.sections.tsc_khz.reason);
  });

  it('the host report is the gate asked of /dev/kvm', () => {
    for (const s of SECTION_NAMES) {
      expect({ s, readable: caps.sections[s].readable, writable: caps.sections[s].writable }).toEqual({
        s,
        readable: sectionGate(s, 'read', kvm) === undefined,
        writable: sectionGate(s, 'write', kvm) === undefined,
      });
      if (SECTION_CAPS[s].read) expect(caps.sections[s].capability).toMatch(/^KVM_CAP_/);
    }
  });

  it('xsave size and nested-state maximum: one derivation, the same on /dev/kvm and on the VM', () => {
    const vcpu = vm.createVcpu(0);
    expect(vcpu.xsaveSize()).toBe(caps.xsaveSize);
    expect(vcpu.getXsave().length).toBe(caps.xsaveSize);
    expect(vcpu.nestedStateMaxSize()).toBe(caps.nested.maxSize);
  });
});
