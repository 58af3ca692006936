/**
 * The rollback model's data (ALSO_WRITES in src/vm/vcpu-state.ts) against the kernel: each piece of
 * state it declares shared really is one copy written by both sections, and a SetState that writes it
 * through sregs and then fails at msrs leaves every section as it was, whichever shared field it is.
 */
import { probeCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import type { Vcpu } from '../../src/ffi/vcpu';
import type { Vm } from '../../src/ffi/vm';
import { ALSO_WRITES, writeState, type StateContext } from '../../src/vm/vcpu-state';
import { describeKvm, KVM_PATH, stateTestVcpu } from '../support/kvm';

const MSR_IA32_SYSENTER_CS = 0x174;
const UNKNOWN_MSR = 0xdeadbeef; // KVM_SET_MSRS refuses it (no ignore_msrs)

/** A new value for each shared field that SET_SREGS accepts on a fresh vCPU. */
const NEW_VALUE: Record<string, (old: bigint) => bigint> = {
  efer: (old) => old ^ 0x1n, // EFER.SCE
  apic_base: (old) => old ^ 0x100n, // the BSP flag
  'fs.base': () => 0x12345000n,
  'gs.base': () => 0x23456000n,
};

describeKvm('rollback model: sections that write the same state', () => {
  let kvm: Kvm;
  let vm: Vm;
  let vcpu: Vcpu;
  let ctx: StateContext;
  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
    ctx = { caps: probeCapabilities(kvm), irqchip: true };
  });
  afterAll(() => kvm.close());
  beforeEach(() => {
    ({ vm, vcpu } = stateTestVcpu(kvm, { bare: true }));
  });
  afterEach(() => vm.close());

  it('declares EFER, APIC base and FS/GS base for sregs and sregs2, and nothing else', () => {
    expect(Object.keys(ALSO_WRITES).sort()).toEqual(['sregs', 'sregs2']);
    expect(ALSO_WRITES.sregs!.map((f) => [f.field, f.msr])).toEqual([
      ['efer', 0xc0000080],
      ['apic_base', 0x1b],
      ['fs.base', 0xc0000100],
      ['gs.base', 0xc0000101],
    ]);
    expect(ALSO_WRITES.sregs2).toBe(ALSO_WRITES.sregs);
  });

  it.each(Object.keys(NEW_VALUE))('%s: written through sregs, read back as its MSR (one copy in the kernel)', (field) => {
    const shared = ALSO_WRITES.sregs!.find((f) => f.field === field)!;
    const sregs = vcpu.getSregs();
    const value = NEW_VALUE[field](shared.get(sregs));
    shared.set(sregs, value);
    vcpu.setSregs(sregs);
    expect(vcpu.getMsrs([shared.msr]).entries).toEqual([{ index: shared.msr, data: value }]);
  });

  it.each(Object.keys(NEW_VALUE))('%s: set through sregs (and repeated in msrs), msrs then refused: all of it as before', (field) => {
    const shared = ALSO_WRITES.sregs!.find((f) => f.field === field)!;
    const sregsBefore = vcpu.getSregs();
    const msrsBefore = vcpu.getMsrs([shared.msr, MSR_IA32_SYSENTER_CS]).entries;
    const sregs = vcpu.getSregs();
    const value = NEW_VALUE[field](shared.get(sregs));
    shared.set(sregs, value);
    const msrs = [
      { index: shared.msr, data: value },
      { index: MSR_IA32_SYSENTER_CS, data: 5n },
      { index: UNKNOWN_MSR, data: 0n },
    ];
    expect(() => writeState(vcpu, ctx, { sregs, msrs })).toThrow(/SetState failed at section msrs.*every section already applied was restored/);
    expect(vcpu.getSregs()).toEqual(sregsBefore);
    expect(vcpu.getMsrs([shared.msr, MSR_IA32_SYSENTER_CS]).entries).toEqual(msrsBefore);
  });
});
