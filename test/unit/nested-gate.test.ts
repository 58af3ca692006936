/**
 * One nested-state gate, one source of the maximum: SetNestedState asks the VM (Vcpu.requireNestedState,
 * ffi/caps.ts) whether it has nested state and how large a blob may be, before validating anything; the
 * host capability report is not consulted for either. With validation skipped (test only), the
 * structural rules still run first, so a blob the kernel could not even read is refused by name.
 */
import { UnsupportedError, VcpudError } from '../../src/errors';
import type { HostCapabilities } from '../../src/ffi/capabilities';
import { requireNestedState } from '../../src/ffi/caps';
import { SECTION_NAMES } from '../../src/ffi/sections';
import type { Vcpu } from '../../src/ffi/vcpu';
import { writeNested, type StateContext } from '../../src/vm/vcpu-state';
import { GOLDEN } from '../support/nested-blobs';
import { thrownBy as errorOf } from '../support/thrown';

/** The host report says nested state is there, up to 8320 bytes (what an Intel host reports). */
const ctx: StateContext = {
  irqchip: true,
  caps: {
    vendor: 'intel',
    nested: { supported: true, maxSize: 8320 },
    sections: Object.fromEntries(SECTION_NAMES.map((s) => [s, { readable: false, writable: false }])),
  } as unknown as HostCapabilities,
};

/** A vCPU whose VM answers KVM_CAP_NESTED_STATE with `vmMax`; it records what was asked of it. */
function fakeVcpu(vmMax: number) {
  const calls: string[] = [];
  const record =
    <T>(name: string, value: T) =>
    () => (calls.push(name), value);
  const vcpu = {
    requireNestedState: (ioctl: string) => (calls.push('gate'), requireNestedState({ checkExtension: () => vmMax }, ioctl)),
    getCpuid2: record('getCpuid2', []),
    getSregs: record('getSregs', { efer: 0n, cr0: 0n }),
    getVcpuEvents: record('getVcpuEvents', { smi: { smm: 0 } }),
    getNestedState: record('getNestedState', Buffer.alloc(128)),
    setNestedState: record('setNestedState', undefined),
  } as unknown as Vcpu;
  return { vcpu, calls };
}

describe('nested-state gate', () => {
  it.each([false, true])('a VM without nested state is refused by the gate before anything is read (skipValidation %s)', (skipValidation) => {
    const { vcpu, calls } = fakeVcpu(0);
    const err = errorOf(() => writeNested(vcpu, ctx, GOLDEN.vmxVmxonOnly(), { skipValidation }));
    expect(err).toBeInstanceOf(UnsupportedError);
    expect(err).toMatchObject({ kind: 'unsupported', capability: 'KVM_CAP_NESTED_STATE' });
    expect(calls).toEqual(['gate']);
  });

  it("the validator's size rule measures against the VM's maximum, not the host report's", () => {
    const { vcpu, calls } = fakeVcpu(4096);
    const blob = GOLDEN.vmxCurrentVmcs();
    expect(blob.readUInt32LE(4)).toBeGreaterThan(4096);
    const err = errorOf(() => writeNested(vcpu, ctx, blob));
    expect(err).toBeInstanceOf(VcpudError);
    expect((err as VcpudError).details).toMatchObject({
      reason: 'INVALID_NESTED_STATE',
      violations: expect.arrayContaining([expect.objectContaining({ rule: 'size.max', message: expect.stringContaining('maximum 4096') })]),
    });
    expect(calls).not.toContain('setNestedState');
  });
});

describe('SetNestedState with validation skipped', () => {
  const header = GOLDEN.vmxVmxonOnly(); // 128 bytes, size 128
  const withSize = (size: number, length = header.length) => {
    const b = Buffer.alloc(length);
    header.copy(b);
    b.writeUInt32LE(size, 4);
    return b;
  };
  it.each([
    { name: 'shorter than the header', blob: header.subarray(0, 64), rule: 'common.header.length', field: 'blob' },
    { name: 'shorter than its size field', blob: withSize(4224, 2000), rule: 'common.size.buffer', field: 'size' },
  ])('a blob $name is INVALID_NESTED_STATE $rule ($field) before any ioctl', ({ blob, rule, field }) => {
    const { vcpu, calls } = fakeVcpu(8320);
    const err = errorOf(() => writeNested(vcpu, ctx, blob, { skipValidation: true }));
    expect(err).toBeInstanceOf(VcpudError);
    expect(err).toMatchObject({
      kind: 'invalid_argument',
      details: { reason: 'INVALID_NESTED_STATE', violations: expect.arrayContaining([expect.objectContaining({ rule, field })]) },
    });
    expect(calls).toEqual(['gate']);
  });

  it('a blob longer than its size field, or breaking a semantic rule, goes to the kernel as it is', () => {
    for (const blob of [withSize(64), withSize(128, 4224)]) {
      const { vcpu, calls } = fakeVcpu(8320);
      writeNested(vcpu, ctx, blob, { skipValidation: true });
      expect(calls).toContain('setNestedState');
    }
  });
});
