/**
 * SetState's path over kernel bytes (readBase, stateBytesFromProto, writeState of struct bytes) against the
 * path it replaced (readState, stateFromProto, writeState of decoded objects), on a real vCPU: for the
 * vCPU's own state and fuzzed edits of it (test/support/fuzz.ts, as the server fuzz sends them), both paths
 * leave the vCPU with the same kernel bytes in every section, and a refused request (by vcpud's checks or
 * by the kernel, rolled back) fails with the same error on both.
 */
import { probeCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import * as S from '../../src/ffi/sections';
import type { Vcpu } from '../../src/ffi/vcpu';
import type { Vm } from '../../src/ffi/vm';
import type { VcpuState__Output } from '../../src/api/generated/vcpud/v1/VcpuState';
import { VcpudError } from '../../src/errors';
import { stateFromProto, stateToProto } from '../../src/server/convert';
import { asRequested, stateBytesFromProto } from '../../src/server/convert/state-bytes';
import { vcpudServiceDefinitions } from '../../src/server/service-definitions';
import { readBase } from '../../src/server/services/state-service';
import { readableSections, readState, readStateBytes, writeState, type StateContext } from '../../src/vm/vcpu-state';
import { mutateState, Rng } from '../support/fuzz';
import { describeKvm, KVM_PATH, stateTestVcpu } from '../support/kvm';

const setState = vcpudServiceDefinitions().VcpuStateService.SetState;
const overTheWire = (state: object) =>
  (setState.requestDeserialize(setState.requestSerialize({ vmId: 'x', vcpuId: 0, state })) as { state: VcpuState__Output }).state;

/** MSRs that move on their own while the vCPU sits paused (the TSC). */
const CLOCK_MSRS = new Set([0x10]);

/** Every section's kernel bytes (msrs as entries, the clock ones left out). */
function snapshot(vcpu: Vcpu, ctx: StateContext): Record<string, unknown> {
  const { values } = readStateBytes(vcpu, ctx, []);
  const msrs = Buffer.isBuffer(values.msrs) ? S.SECTIONS.msrs.decode(values.msrs) : (values.msrs ?? []);
  return { ...values, msrs: msrs.filter((e) => !CLOCK_MSRS.has(e.index)) };
}

function outcome(fn: () => unknown): { ok: unknown } | { error: { kind: string; message: string; details: unknown } } {
  try {
    return { ok: fn() };
  } catch (e) {
    if (!(e instanceof VcpudError)) throw e;
    return { error: { kind: e.kind, message: e.message, details: e.details } };
  }
}

const present = (p: VcpuState__Output) =>
  S.SECTION_NAMES.filter((s) => (p as unknown as Record<string, unknown>)[s.replace(/_(.)/g, (_, c: string) => c.toUpperCase())]);

describeKvm('SetState over kernel bytes against the path over objects', () => {
  let kvm: Kvm;
  let vm: Vm;
  let vcpu: Vcpu;
  let ctx: StateContext;
  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
    ctx = { caps: probeCapabilities(kvm), irqchip: true };
    ({ vm, vcpu } = stateTestVcpu(kvm, { bare: true }));
  });
  afterAll(() => {
    vm.close();
    kvm.close();
  });

  test('the same vCPU state after, or the same error, for the vCPU own state and 300 fuzzed edits of it', () => {
    const initial = readState(vcpu, ctx, []);
    const initialBytes = snapshot(vcpu, ctx);
    const current = overTheWire(stateToProto(initial.values, initial)) as unknown as Record<string, unknown>;
    const reset = () => {
      writeState(vcpu, ctx, initial.values);
      expect(snapshot(vcpu, ctx)).toEqual(initialBytes);
    };
    const rng = new Rng(20261205);
    const tally = { ok: 0, refused: 0 };
    for (let i = 0; i < 301; i++) {
      const p = (i === 0 ? current : overTheWire(mutateState(rng, current))) as VcpuState__Output;
      const sections = present(p);
      reset();
      const objects = outcome(() =>
        writeState(
          vcpu,
          ctx,
          stateFromProto(
            p,
            readState(
              vcpu,
              ctx,
              sections.filter((s) => s !== 'msrs'),
            ).values,
          ),
        ),
      );
      const afterObjects = snapshot(vcpu, ctx);
      reset();
      const bytes = outcome(() => writeState(vcpu, ctx, stateBytesFromProto(p, readBase(vcpu, ctx, sections)), asRequested));
      expect(bytes).toEqual(objects);
      expect(snapshot(vcpu, ctx)).toEqual(afterObjects);
      tally['ok' in bytes ? 'ok' : 'refused']++;
    }
    // Both kinds of outcome were compared.
    expect(tally.ok).toBeGreaterThan(10);
    expect(tally.refused).toBeGreaterThan(10);
    expect(readableSections(ctx).length).toBeGreaterThan(10);
  });
});
