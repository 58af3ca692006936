/**
 * The service definitions the server registers: the API's services as src/api/proto.ts loads them, with
 * the hot and bulk responses serialized by the server's own encoders instead of protobufjs.
 */
import type * as grpc from '@grpc/grpc-js';
import type { MigrationServiceDefinition } from '../api/generated/vcpud/v1/MigrationService';
import type { SnapshotServiceDefinition } from '../api/generated/vcpud/v1/SnapshotService';
import type { VcpuStateServiceDefinition } from '../api/generated/vcpud/v1/VcpuStateService';
import type { VmServiceDefinition } from '../api/generated/vcpud/v1/VmService';
import { passPreserialized } from '../api/preserialized';
import { vcpudPackageDefinition, vcpudProto } from '../api/proto';
import { tolerantRequests } from './undecodable-request';
import { wireSerializer } from './wire-encoder';

export interface VcpudServiceDefinitions {
  VcpuStateService: VcpuStateServiceDefinition;
  VmService: VmServiceDefinition;
  SnapshotService: SnapshotServiceDefinition;
  MigrationService: MigrationServiceDefinition;
}

let serviceDefinitions: VcpudServiceDefinitions | undefined;

/**
 * The service definitions to pass to server.addService. GetState's response, the hot path of checkpoint
 * loops, arrives already serialized (convert/raw-state.ts) or is written by the wire encoder
 * (src/server/wire-encoder.ts) instead of protobufjs; every other method keeps proto-loader's serializers.
 * No request deserializer throws: bytes that are not the request's type reach the handler as an
 * UndecodableRequest, which it answers INVALID_ARGUMENT (src/server/undecodable-request.ts).
 */
export function vcpudServiceDefinitions(): VcpudServiceDefinitions {
  if (!serviceDefinitions) {
    const v1 = vcpudProto().vcpud.v1;
    const state = v1.VcpuStateService.service;
    // The handler answers with Preserialized bytes (convert/raw-state.ts); anything else goes through the wire encoder.
    const getState = { ...state.GetState, responseSerialize: passPreserialized(wireSerializer(vcpudPackageDefinition(), 'vcpud.v1.GetStateResponse')) };
    // Every request deserializer hands an undecodable message to the handler (undecodable-request.ts).
    serviceDefinitions = {
      VcpuStateService: tolerantRequests({ ...state, GetState: getState }),
      VmService: tolerantRequests(v1.VmService.service),
      // CreateSnapshot's data messages are sent pre-serialized (snapshot-service.ts streamData).
      SnapshotService: tolerantRequests(passingPreserialized(v1.SnapshotService.service, 'CreateSnapshot')),
      MigrationService: tolerantRequests(v1.MigrationService.service),
    };
  }
  return serviceDefinitions;
}

/** `service` with `method`'s responses passed through when they are already serialized (preserialized.ts). */
function passingPreserialized<S extends grpc.ServiceDefinition, M extends keyof S & string>(service: S, method: M): S {
  return { ...service, [method]: { ...service[method], responseSerialize: passPreserialized(service[method].responseSerialize) } };
}
