/**
 * src/server/wire-encoder: what it writes decodes, through proto-loader's own deserializer, to exactly what
 * protobufjs's serializer gives for the same object; GetState's served definition uses it.
 */
import type * as protoLoader from '@grpc/proto-loader';
import { stateToProto } from '../../src/server/convert';
import { vcpudPackageDefinition } from '../../src/api/proto';
import { vcpudServiceDefinitions } from '../../src/server/service-definitions';
import { wireSerializer } from '../../src/server/wire-encoder';
import { allRandom } from '../support/random-state';

const definition = vcpudPackageDefinition();
const method = (service: string, name: string) => (definition[`vcpud.v1.${service}`] as protoLoader.ServiceDefinition)[name];
const getState = method('VcpuStateService', 'GetState');
const wire = wireSerializer(definition, 'vcpud.v1.GetStateResponse');
const decode = (b: Buffer) => getState.responseDeserialize(b) as object;

describe('wire encoder', () => {
  test('random full states decode the same as with protobufjs', () => {
    for (let i = 0; i < 50; i++) {
      const values = allRandom();
      const res = { state: stateToProto(values, { msrsUnreadable: i % 2 ? [0x10, 0xc0000103, 0xffffffff] : [] }), implicitlyPaused: i % 3 === 0 };
      expect(decode(wire(res))).toEqual(decode(getState.responseSerialize(res)));
    }
  });

  test('edge values: u64 in every form, long bodies, non-ASCII strings, enums by name and number', () => {
    const lapicRaw = Buffer.alloc(1 << 17, 7); // a length that needs three varint bytes
    const res = {
      state: {
        regs: { rax: { low: -1, high: -1, unsigned: true }, rbx: '18446744073709551615', rcx: 0, rdx: 2 ** 53 - 1, rsi: '0', rip: 1n << 63n },
        msrs: { entries: [{ index: 0xffffffff, data: '1', name: 'Grüße ✓' }], unreadableIndices: [0, 127, 128, 0xffffffff] },
        lapic: { raw: lapicRaw, apicId: 0xffffffff },
        mpState: { value: 'MP_STATE_HALTED', kvmValue: 3 },
        sregs: { cs: { base: '4096', present: true, dpl: 3 }, interruptBitmap: ['0', '1', '18446744073709551615', '0'] },
      },
      implicitlyPaused: true,
    };
    const fromWire = decode(wire(res));
    expect(fromWire).toEqual(decode(getState.responseSerialize(res)));
    expect(fromWire).toMatchObject({ state: { regs: { rax: '18446744073709551615', rip: '9223372036854775808' }, mpState: { value: 'MP_STATE_HALTED' } } });
    const numbered = { state: { mpState: { value: 4 } } };
    expect(decode(wire(numbered))).toEqual(decode(getState.responseSerialize(numbered)));
    expect(() => wire({ state: { mpState: { value: 'MP_STATE_NOPE' } } })).toThrow(/MP_STATE_NOPE.*vcpud\.v1\.MpState/);
  });

  test('the buffer is reused but each result is its own copy', () => {
    const a = wire({ implicitlyPaused: true });
    const b = wire({ state: { tscKhz: { khz: 3_000_000 } } });
    expect(decode(a)).toMatchObject({ implicitlyPaused: true, state: null });
    expect(decode(b)).toMatchObject({ implicitlyPaused: false, state: { tscKhz: { khz: 3_000_000 } } });
  });

  test('types it cannot encode are refused when it is built', () => {
    expect(() => wireSerializer(definition, 'vcpud.v1.Vcpu')).toThrow(/map entry/);
    expect(() => wireSerializer(definition, 'vcpud.v1.NoSuchMessage')).toThrow(/NoSuchMessage/);
  });

  test('the served GetState uses it; other methods keep proto-loader serializers', () => {
    const served = vcpudServiceDefinitions().VcpuStateService;
    const res = { state: stateToProto(allRandom()) };
    expect(served.GetState.responseSerialize(res as never)).toEqual(wire(res));
    expect(served.SetState.responseSerialize).toBe(method('VcpuStateService', 'SetState').responseSerialize);
  });
});
