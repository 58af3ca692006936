/**
 * src/server/undecodable-request.ts: no request deserializer of the API's services throws; bytes that
 * are not the type come back as an UndecodableRequest, valid bytes as before, and decodedRequest turns
 * the former into INVALID_ARGUMENT / INVALID_REQUEST with rule request.undecodable.
 */
import * as grpc from '@grpc/grpc-js';
import { vcpudProto } from '../../src/api/proto';
import { decodeStatusDetails } from '../../src/api/status-details';
import { toServiceError } from '../../src/server/errors';
import { vcpudServiceDefinitions } from '../../src/server/service-definitions';
import { decodedRequest, UndecodableRequest } from '../../src/server/undecodable-request';

/** Field 1 with wire type 7, and a varint cut short: refused for every message type. */
const UNDECODABLE = [Buffer.from([0x0f]), Buffer.from([0x08, 0xff])];

describe('the API services take undecodable requests without throwing', () => {
  const methods = Object.entries(vcpudServiceDefinitions()).flatMap(([service, def]) =>
    Object.entries(def as grpc.ServiceDefinition).map(([name, m]) => [`${service}/${name}`, m] as const),
  );

  it('every method is covered (all four services)', () => {
    expect(new Set(methods.map(([n]) => n.split('/')[0]))).toEqual(new Set(['VcpuStateService', 'VmService', 'SnapshotService', 'MigrationService']));
    expect(methods.length).toBeGreaterThan(20);
  });

  it.each(methods)('%s', (_, method) => {
    for (const bytes of UNDECODABLE) {
      const bad = method.requestDeserialize(bytes);
      expect(bad).toBeInstanceOf(UndecodableRequest);
      expect((bad as UndecodableRequest).typeName).toMatch(/Request$/);
    }
    expect(method.requestDeserialize(Buffer.alloc(0))).not.toBeInstanceOf(UndecodableRequest); // an empty message is valid
  });

  it('valid bytes decode as proto-loader decodes them', () => {
    const original = (vcpudProto().vcpud.v1.VcpuStateService as unknown as grpc.ServiceClientConstructor).service.GetState;
    const bytes = original.requestSerialize({ vmId: 'vm-1', vcpuId: 3 });
    expect(vcpudServiceDefinitions().VcpuStateService.GetState.requestDeserialize(bytes)).toEqual(original.requestDeserialize(bytes));
  });
});

describe('decodedRequest', () => {
  it('passes a decoded request through', () => {
    const req = { vmId: 'x' };
    expect(decodedRequest(req)).toBe(req);
  });

  it('answers an undecodable one INVALID_ARGUMENT with reason INVALID_REQUEST and rule request.undecodable', () => {
    const bad = vcpudServiceDefinitions().VcpuStateService.SetState.requestDeserialize(UNDECODABLE[1]);
    let thrown: unknown;
    try {
      decodedRequest(bad);
    } catch (e) {
      thrown = e;
    }
    const status = toServiceError(thrown);
    expect(status.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(status.details).toMatch(/^the request message is not a valid SetStateRequest: index out of range/);
    const decoded = decodeStatusDetails(status.metadata);
    expect(decoded?.errorInfo?.reason).toBe('INVALID_REQUEST');
    expect(decoded?.errorInfo?.metadata?.rule).toBe('request.undecodable');
  });
});

describe('a string field running past the end of the message (protobufjs alone reads what is there)', () => {
  const getState = () => vcpudServiceDefinitions().VcpuStateService.GetState;

  it('is refused: field 1 declared 5 bytes long with 1 there', () => {
    const bad = getState().requestDeserialize(Buffer.from([0x0a, 0x05, 0x61]));
    expect(bad).toBeInstanceOf(UndecodableRequest);
    expect((bad as unknown as UndecodableRequest).reason).toBe('index out of range: 2 + 5 > 3');
  });

  it('a vm_id cut one byte short is refused, not read as the shorter id', () => {
    const whole = getState().requestSerialize({ vmId: '123e4567-e89b-12d3-a456-426614174000', vcpuId: 0 });
    expect(getState().requestDeserialize(whole.subarray(0, 2 + 35))).toBeInstanceOf(UndecodableRequest);
  });

  it('strings that fit decode as before, multi-byte UTF-8 and empty included', () => {
    for (const vmId of ['', 'vm-1', 'ünïcode vm ✓', 'x'.repeat(300)]) {
      const bytes = getState().requestSerialize({ vmId, vcpuId: 7 });
      expect(getState().requestDeserialize(bytes)).toMatchObject({ vmId, vcpuId: 7 });
    }
  });
});
