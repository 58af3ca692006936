/**
 * A batch read that has sregs, sregs2 and vcpu_events does not issue KVM_GET_SREGS: it answers it from
 * KVM_GET_SREGS2's common prefix and KVM_GET_VCPU_EVENTS' injected interrupt (src/ffi/sregs-from-sregs2.ts
 * says why that is exact). On the real kernel, for several vCPU states, the answer must be the bytes a
 * real KVM_GET_SREGS made right after gives; without sregs2 or vcpu_events in the batch, the ioctl stays.
 */
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { setIoctlObserver } from '../../src/ffi/observe';
import { offsetOf, SREGS_LAYOUT, type SectionName } from '../../src/ffi/sections';
import type { Vcpu } from '../../src/ffi/vcpu';
import type { Vm } from '../../src/ffi/vm';
import { VmRegistry } from '../../src/vm/registry';
import { readStateBytes, readStateBytesReused, type StateContext } from '../../src/vm/vcpu-state';
import { describeKvm, stateTestVcpu, testMemorySource } from '../support/kvm';
import { loadGuest, waitUntil } from '../support/runtime';

const DERIVABLE: SectionName[] = ['sregs', 'sregs2', 'vcpu_events'];
const BITMAP_AT = offsetOf(SREGS_LAYOUT, 'interruptBitmap');

/** The ioctls `fn` makes, as the metrics observer hears them. */
function observedIoctls(fn: () => void): string[] {
  const seen: string[] = [];
  setIoctlObserver({ onIoctl: (ioctl) => void seen.push(ioctl), onNegotiationRetry: () => {} });
  try {
    fn();
  } finally {
    setIoctlObserver(undefined);
  }
  return seen;
}

/** The vectors set in a kvm_sregs' interrupt_bitmap. */
function bitmapVectors(sregs: Buffer): number[] {
  const vectors: number[] = [];
  for (let v = 0; v < 256; v++) if (sregs[BITMAP_AT + (v >> 3)] & (1 << (v & 7))) vectors.push(v);
  return vectors;
}

describeKvm('KVM_GET_SREGS answered from KVM_GET_SREGS2 and KVM_GET_VCPU_EVENTS in a batch (real KVM)', () => {
  let kvm: Kvm;
  let caps: HostCapabilities;

  beforeAll(() => {
    kvm = Kvm.open();
    caps = probeCapabilities(kvm);
    // The host must offer all three, or nothing here is tested.
    for (const s of DERIVABLE) expect({ s, readable: caps.sections[s].readable }).toEqual({ s, readable: true });
  });
  afterAll(() => kvm.close());

  /**
   * Reads sregs, sregs2 and vcpu_events in one batch (fresh and reused buffers), checks no KVM_GET_SREGS
   * was made, and returns the sregs bytes next to a real KVM_GET_SREGS made right after.
   */
  function derivedAndReal(vcpu: Vcpu, ctx: StateContext, sections: SectionName[]): { derived: Buffer[]; real: Buffer } {
    const derived: Buffer[] = [];
    const ioctls = observedIoctls(() => {
      derived.push(Buffer.from(readStateBytes(vcpu, ctx, sections).values.sregs as Buffer));
      derived.push(Buffer.from(readStateBytesReused(vcpu, ctx, sections).values.sregs as Buffer));
    });
    expect(ioctls).not.toContain('KVM_GET_SREGS');
    expect(ioctls).toContain('KVM_GET_SREGS2');
    return { derived, real: vcpu.getStructBytes('sregs') };
  }

  describe('a running-then-paused counter guest', () => {
    let registry: VmRegistry;
    beforeAll(() => {
      registry = new VmRegistry(kvm, { maxVms: 1, maxVcpusPerVm: 1, maxMemoryPerVmBytes: 16 << 20, maxMemoryTotalBytes: 16 << 20 }, testMemorySource());
    });
    afterAll(() => registry.destroyAll());

    it('gives the bytes KVM_GET_SREGS gives, for every section read and for the three alone', async () => {
      const vm = registry.create({ memoryBytes: 16 << 20, vcpuCount: 1 });
      await loadGuest(vm, 'counter64');
      await vm.resumeAll();
      await waitUntil(() => vm.console.bytesWritten > 2000, 'counter output');
      await vm.vcpu(0).pause();
      const ctx = { caps, irqchip: vm.vm.hasIrqchip };
      await vm.vcpu(0).withState(() => {
        const vcpu = vm.vcpu(0).vcpu;
        for (const sections of [[], DERIVABLE]) {
          const { derived, real } = derivedAndReal(vcpu, ctx, sections);
          // Long mode, paging on: a real state, not a fresh vCPU's.
          expect(real.readBigUInt64LE(offsetOf(SREGS_LAYOUT, 'efer')) & 0x400n).toBe(0x400n);
          for (const d of derived) expect(d.equals(real)).toBe(true);
        }
      });
    });
  });

  describe('a vCPU with an injected interrupt set by KVM_SET_VCPU_EVENTS', () => {
    let vm: Vm;
    let vcpu: Vcpu;
    const ctx = (): StateContext => ({ caps, irqchip: true });

    beforeEach(() => {
      ({ vm, vcpu } = stateTestVcpu(kvm));
    });
    afterEach(() => vm.close());

    function setInterrupt(interrupt: { injected: number; nr: number; soft: number }): void {
      const events = vcpu.getVcpuEvents();
      vcpu.setVcpuEvents({ ...events, interrupt: { ...events.interrupt, ...interrupt } });
    }

    // 0x41 lies in interrupt_bitmap's second u64 word, 200 in its fourth.
    for (const nr of [0x41, 200, 0]) {
      it(`vector ${nr}: the real KVM_GET_SREGS shows it in interrupt_bitmap, and the derived bytes are equal`, () => {
        setInterrupt({ injected: 1, nr, soft: 0 });
        const { derived, real } = derivedAndReal(vcpu, ctx(), DERIVABLE);
        expect(bitmapVectors(real)).toEqual([nr]);
        for (const d of derived) expect(d.equals(real)).toBe(true);
      });
    }

    it('a soft interrupt: neither KVM_GET_SREGS nor KVM_GET_VCPU_EVENTS reports it, and the derived bytes are equal', () => {
      setInterrupt({ injected: 1, nr: 0x41, soft: 1 });
      const { derived, real } = derivedAndReal(vcpu, ctx(), DERIVABLE);
      expect(bitmapVectors(real)).toEqual([]);
      expect(vcpu.getVcpuEvents().interrupt.injected).toBe(0);
      for (const d of derived) expect(d.equals(real)).toBe(true);
    });

    it('a read after the interrupt is gone clears the bit the reused buffers held', () => {
      setInterrupt({ injected: 1, nr: 200, soft: 0 });
      derivedAndReal(vcpu, ctx(), DERIVABLE);
      setInterrupt({ injected: 0, nr: 0, soft: 0 });
      const { derived, real } = derivedAndReal(vcpu, ctx(), DERIVABLE);
      expect(bitmapVectors(real)).toEqual([]);
      for (const d of derived) expect(d.equals(real)).toBe(true);
    });

    it('a batch without sregs2 or without vcpu_events still makes KVM_GET_SREGS, once', () => {
      for (const sections of [['sregs'], ['sregs', 'sregs2'], ['sregs', 'vcpu_events'], ['regs', 'sregs', 'lapic']] as SectionName[][]) {
        const fresh = observedIoctls(() => readStateBytes(vcpu, ctx(), sections));
        const reused = observedIoctls(() => readStateBytesReused(vcpu, ctx(), sections));
        for (const ioctls of [fresh, reused]) expect({ sections, sregs: ioctls.filter((i) => i === 'KVM_GET_SREGS').length }).toEqual({ sections, sregs: 1 });
      }
    });

    it('a batch of every section makes every other GET once and no KVM_GET_SREGS', () => {
      readStateBytes(vcpu, ctx(), []); // the VM caches its KVM_CHECK_EXTENSION answers on first use
      const ioctls = observedIoctls(() => readStateBytes(vcpu, ctx(), []));
      expect(ioctls).not.toContain('KVM_GET_SREGS');
      expect(ioctls).toEqual(expect.arrayContaining(['KVM_GET_SREGS2', 'KVM_GET_VCPU_EVENTS', 'KVM_GET_REGS', 'KVM_GET_MSRS']));
      expect(new Set(ioctls).size).toBe(ioctls.length);
    });
  });
});
