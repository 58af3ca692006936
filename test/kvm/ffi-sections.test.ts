/**
 * Every vCPU state section round-trips on a real vCPU of the real /dev/kvm: get, change a field,
 * set, get again, compare. No mock of KVM anywhere.
 */
import { KvmError, UnsupportedError } from '../../src/errors';
import { probeCapabilities, probedCaps } from '../../src/ffi/capabilities';
import { requireNestedState } from '../../src/ffi/caps';
import { Kvm } from '../../src/ffi/kvm';
import { native } from '../../src/ffi/native';
import { setIoctlObserver } from '../../src/ffi/observe';
import type { Vcpu } from '../../src/ffi/vcpu';
import type { Vm } from '../../src/ffi/vm';
import { describeKvm, KVM_PATH, stateTestVcpu } from '../support/kvm';

const MSR_IA32_SYSENTER_CS = 0x174;
const MSR_IA32_SYSENTER_ESP = 0x175;
const APIC_TPR = 0x80;

describeKvm('ffi: vCPU state sections on real KVM', () => {
  let kvm: Kvm;
  let vm: Vm;
  let vcpu: Vcpu;

  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
  });
  afterAll(() => kvm.close());

  beforeEach(() => {
    ({ vm, vcpu } = stateTestVcpu(kvm));
  });
  afterEach(() => vm.close());

  it('opens API version 12', () => {
    expect(kvm.apiVersion()).toBe(12);
  });

  it('regs', () => {
    const r = vcpu.getRegs();
    r.rax = 0x1122334455667788n;
    r.r15 = 0xfedcba9876543210n;
    r.rip = 0x1234n;
    vcpu.setRegs(r);
    expect(vcpu.getRegs()).toEqual(r);
  });

  it('sregs', () => {
    const s = vcpu.getSregs();
    s.gdt.base = 0x5000n;
    s.gdt.limit = 0x27;
    s.ds.base = 0x10000n;
    s.ds.selector = 0x1000;
    vcpu.setSregs(s);
    expect(vcpu.getSregs()).toEqual(s);
  });

  it('sregs2', () => {
    const s = vcpu.getSregs2();
    s.idt.base = 0x6000n;
    s.idt.limit = 0xfff;
    vcpu.setSregs2(s);
    expect(vcpu.getSregs2()).toEqual(s);
  });

  it('fpu', () => {
    // (MXCSR is not checked: KVM_GET_FPU reports it as 0 on kvm_pvm; xsave carries it.)
    const f = vcpu.getFpu();
    f.fcw = 0x27f;
    f.xmm[0] = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    vcpu.setFpu(f);
    const back = vcpu.getFpu();
    expect(back.fcw).toBe(0x27f);
    expect(Buffer.from(back.xmm[0]).toString('hex')).toBe('00112233445566778899aabbccddeeff');
  });

  it('xsave (raw bytes round-trip exactly)', () => {
    const x = vcpu.getXsave();
    expect(x.length).toBe(vcpu.xsaveSize());
    x.writeBigUInt64LE(x.readBigUInt64LE(512) | 0x3n, 512); // XSTATE_BV: x87 and SSE not in init state
    x.writeUInt32LE(0x1fa0, 24); // MXCSR in the legacy region
    vcpu.setXsave(x);
    const back = vcpu.getXsave();
    expect(back.readUInt32LE(24)).toBe(0x1fa0);
    expect(back.equals(x)).toBe(true);
  });

  it('xcrs', () => {
    const x = vcpu.getXcrs();
    expect(x.nrXcrs).toBeGreaterThanOrEqual(1);
    x.xcrs[0].value = 0x7n; // x87 | SSE | AVX (the host offers AVX)
    vcpu.setXcrs(x);
    expect(vcpu.getXcrs().xcrs[0].value).toBe(0x7n);
  });

  it('msrs, including a partial set reported with the first refused index', () => {
    const set = vcpu.setMsrs([
      { index: MSR_IA32_SYSENTER_CS, data: 0x10n },
      { index: MSR_IA32_SYSENTER_ESP, data: 0xffff8000n },
    ]);
    expect(set).toEqual(expect.objectContaining({ processed: 2 }));
    const got = vcpu.getMsrs([MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP]);
    expect(got.entries.map((e) => e.data)).toEqual([0x10n, 0xffff8000n]);

    const bogus = 0xdead0000;
    const partial = vcpu.setMsrs([
      { index: MSR_IA32_SYSENTER_CS, data: 0x20n },
      { index: bogus, data: 1n },
      { index: MSR_IA32_SYSENTER_ESP, data: 0n },
    ]);
    expect(partial.processed).toBe(1);
    expect(partial.firstRefused).toBe(bogus);
    expect(vcpu.getMsrs([MSR_IA32_SYSENTER_CS]).entries[0].data).toBe(0x20n);
  });

  it('every MSR of the host index list reads', () => {
    const list = kvm.msrIndexList();
    const r = vcpu.getMsrs(list);
    expect(r.processed).toBe(list.length);
    expect(vcpu.getMsrs(list).entries.map((e) => e.index)).toEqual(list); // the cached request, again
  });

  it('a reused index list changed in place is asked for as it is now (the request is cached per list)', () => {
    const list = [MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP];
    vcpu.setMsrs([
      { index: MSR_IA32_SYSENTER_CS, data: 0x33n },
      { index: MSR_IA32_SYSENTER_ESP, data: 0x44n },
    ]);
    expect(vcpu.getMsrs(list).entries.map((e) => [e.index, e.data])).toEqual([
      [MSR_IA32_SYSENTER_CS, 0x33n],
      [MSR_IA32_SYSENTER_ESP, 0x44n],
    ]);
    list.reverse();
    expect(vcpu.getMsrs(list).entries.map((e) => [e.index, e.data])).toEqual([
      [MSR_IA32_SYSENTER_ESP, 0x44n],
      [MSR_IA32_SYSENTER_CS, 0x33n],
    ]);
    list.pop();
    expect(vcpu.getMsrs(list).entries.map((e) => e.index)).toEqual([MSR_IA32_SYSENTER_ESP]);
  });

  it('lapic (raw)', () => {
    const l = vcpu.getLapic();
    l.writeUInt32LE(0x20, APIC_TPR);
    vcpu.setLapic(l);
    expect(vcpu.getLapic().readUInt32LE(APIC_TPR)).toBe(0x20);
  });

  it('vcpu_events', () => {
    const e = vcpu.getVcpuEvents();
    e.nmi.masked = 1;
    e.flags = 0;
    vcpu.setVcpuEvents(e);
    expect(vcpu.getVcpuEvents().nmi.masked).toBe(1);
  });

  it('debugregs', () => {
    const d = vcpu.getDebugregs();
    d.db[0] = 0x1000n;
    d.db[3] = 0x4000n;
    d.dr7 = 0x401n;
    vcpu.setDebugregs(d);
    const back = vcpu.getDebugregs();
    expect(back.db[0]).toBe(0x1000n);
    expect(back.db[3]).toBe(0x4000n);
    expect(back.dr7).toBe(0x401n);
  });

  it('mp_state', () => {
    const HALTED = 3;
    vcpu.setMpState(HALTED);
    expect(vcpu.getMpState()).toBe(HALTED);
  });

  it('cpuid2', () => {
    // What the kernel keeps of a table is its own business (6.18 drops leaves 0x1d, 0x1e and 0x24
    // of KVM_GET_SUPPORTED_CPUID on SET): compare with what it kept of the full table.
    const key = (e: { function: number; index: number }) => `${e.function.toString(16)}/${e.index}`;
    const kept = vcpu.getCpuid2().map(key);
    const trimmed = kvm.supportedCpuid().filter((e) => e.function !== 0x80000008);
    vcpu.setCpuid2(trimmed);
    const got = vcpu.getCpuid2().map(key);
    expect(kept).toContain('80000008/0');
    expect(got).toEqual(kept.filter((k) => k !== '80000008/0'));
  });

  it('tsc_khz reads; writing names KVM_CAP_TSC_CONTROL when the host lacks it', () => {
    const khz = vcpu.getTscKhz();
    expect(khz).toBeGreaterThan(0);
    if (kvm.checkExtension('TSC_CONTROL') > 0) {
      vcpu.setTscKhz(khz);
      expect(vcpu.getTscKhz()).toBe(khz);
    } else {
      expect(() => vcpu.setTscKhz(khz)).toThrow(UnsupportedError);
      expect(() => vcpu.setTscKhz(khz)).toThrow(/KVM_CAP_TSC_CONTROL/);
    }
  });

  it('a failed ioctl carries the ioctl name, errno and its symbolic code', () => {
    let err: unknown;
    try {
      vm.createVcpu(1_000_000);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(KvmError);
    expect(err).toMatchObject({
      ioctl: 'KVM_CREATE_VCPU',
      code: 'EINVAL',
      errno: 22,
      kind: 'invalid_argument',
      details: expect.objectContaining({ reason: 'KERNEL_REJECTED' }),
    });
  });

  it('the native layer rejects buffers of the wrong length before any ioctl', () => {
    expect(() => native.getRegs(vcpu.fd, Buffer.alloc(10))).toThrow(/KVM_GET_REGS: buffer is 10 bytes, the struct is 144/);
    const msrs = Buffer.alloc(8 + 16);
    msrs.writeUInt32LE(5, 0); // declares 5 entries, holds 1
    expect(() => native.setMsrs(vcpu.fd, msrs)).toThrow(/declares 5 entries, the buffer holds 1/);
  });

  it('every ioctl has a Promise twin that runs off the JS thread', async () => {
    const buf = Buffer.alloc(native.sizes.kvm_regs);
    await expect(native.getRegsAsync(vcpu.fd, buf)).resolves.toBeUndefined();
    expect(buf.equals(Buffer.alloc(buf.length))).toBe(false);
    await expect(native.getTscKhzAsync(vcpu.fd)).resolves.toBeGreaterThan(0);
  });
});

describeKvm('ffi: size negotiation (E2BIG) on real KVM', () => {
  let kvm: Kvm;
  const retries: string[] = [];
  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
    setIoctlObserver({ onIoctl: () => {}, onNegotiationRetry: (ioctl) => retries.push(ioctl) });
  });
  afterAll(() => {
    setIoctlObserver(undefined);
    kvm.close();
  });

  it('MSR index list: a one-entry buffer grows to what the kernel asked for', () => {
    retries.length = 0;
    const small = kvm.msrIndexList(1);
    expect(retries).toEqual(['KVM_GET_MSR_INDEX_LIST']);
    expect(small.length).toBeGreaterThan(1);
    expect(small).toEqual(kvm.msrIndexList(4096));
  });

  it('supported CPUID: capacity doubles until the kernel accepts it', () => {
    retries.length = 0;
    const small = kvm.supportedCpuid(1);
    expect(retries.length).toBeGreaterThan(0);
    expect(retries.every((r) => r === 'KVM_GET_SUPPORTED_CPUID')).toBe(true);
    // The kernel fills in the APIC id of the host CPU the call ran on (leaf 1 EBX[31:24], leaves
    // 0xB and 0x1F EDX): two calls on different CPUs differ there and nowhere else.
    const thisCpuFieldsCleared = (entries: ReturnType<Kvm['supportedCpuid']>) =>
      entries.map((e) => (e.function === 1 ? { ...e, ebx: e.ebx & 0x00ffffff } : e.function === 0xb || e.function === 0x1f ? { ...e, edx: 0 } : e));
    expect(thisCpuFieldsCleared(small)).toEqual(thisCpuFieldsCleared(kvm.supportedCpuid(256)));
  });

  it('MSR feature index list negotiates too', () => {
    expect(kvm.msrFeatureIndexList(1)).toEqual(kvm.msrFeatureIndexList(1024));
  });
});

describeKvm('ffi: capability model and nested state on this host', () => {
  let kvm: Kvm;
  beforeAll(() => (kvm = Kvm.open(KVM_PATH)));
  afterAll(() => kvm.close());

  it('reports every section and the nested-state verdict with its reason', () => {
    const caps = probeCapabilities(kvm);
    expect(caps.apiVersion).toBe(12);
    expect(caps.vendor).toMatch(/intel|amd/);
    expect(caps.msrIndexList.length).toBeGreaterThan(0);
    expect(caps.sections.regs).toEqual({ readable: true, writable: true });
    expect(caps.caps.KVM_CAP_NESTED_STATE).toBe(caps.nested.maxSize);
    if (!caps.nested.supported) expect(caps.nested.reason).toMatch(/KVM_CAP_NESTED_STATE|nested/);
    if (caps.nested.maxSize <= 0) expect(() => requireNestedState(probedCaps(caps), 'KVM_GET_NESTED_STATE')).toThrow(UnsupportedError);
  });

  it('Get/SetNestedState fail with a typed unsupported error naming KVM_CAP_NESTED_STATE, not a raw EINVAL', () => {
    if (kvm.checkExtension('NESTED_STATE') > 0) return; // a nested host: covered by the nested lab
    const vm = kvm.createVm();
    try {
      const vcpu = vm.createVcpu(0);
      for (const call of [() => vcpu.getNestedState(), () => vcpu.setNestedState(Buffer.alloc(128))]) {
        let err: unknown;
        try {
          call();
        } catch (e) {
          err = e;
        }
        expect(err).toBeInstanceOf(UnsupportedError);
        expect(err).toMatchObject({ capability: 'KVM_CAP_NESTED_STATE', kind: 'unsupported' });
      }
    } finally {
      vm.close();
    }
  });
});

describeKvm('ffi: capability model names the capability each section depends on', () => {
  it('every section that needs a capability names it', () => {
    const kvm = Kvm.open(KVM_PATH);
    try {
      const caps = probeCapabilities(kvm);
      expect(caps.sections.regs.capability).toBeUndefined();
      expect(caps.sections.lapic.capability).toBe('KVM_CAP_IRQCHIP');
      expect(caps.sections.tsc_khz.capability).toBe(caps.sections.tsc_khz.writable ? 'KVM_CAP_GET_TSC_KHZ' : 'KVM_CAP_TSC_CONTROL');
    } finally {
      kvm.close();
    }
  });
});
