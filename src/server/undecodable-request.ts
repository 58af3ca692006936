/**
 * Requests that are not valid protobuf for their method's type. grpc-js answers a deserializer that
 * throws with INTERNAL "Error deserializing request" and no details, before any handler runs: a client's
 * bad bytes read as a server fault, page whoever alerts on INTERNAL, and break errors.proto's promise of
 * an ErrorInfo on every error. The server's deserializers therefore never throw: they hand the handler
 * an UndecodableRequest, and `decodedRequest` turns it into INVALID_ARGUMENT / INVALID_REQUEST.
 */
import type * as grpc from '@grpc/grpc-js';
import { invalidArgument } from '../errors';

/** What a deserializer gives for bytes it could not decode: the type and protobufjs's reason. */
export class UndecodableRequest {
  constructor(
    readonly typeName: string,
    readonly reason: string,
  ) {}
}

/** `deserialize`, with a failure returned as an UndecodableRequest of `typeName` instead of thrown. */
function tolerant<T>(typeName: string, deserialize: (bytes: Buffer) => T): (bytes: Buffer) => T | UndecodableRequest {
  return (bytes) => {
    try {
      return deserialize(bytes);
    } catch (e) {
      return new UndecodableRequest(typeName, (e as Error).message);
    }
  };
}

/** `service` with every method's request deserializer made tolerant (see the top of this file). */
export function tolerantRequests<S extends grpc.ServiceDefinition>(service: S): S {
  const out: Record<string, grpc.MethodDefinition<unknown, unknown>> = {};
  for (const [name, method] of Object.entries(service)) {
    // proto-loader's definitions name the request type; the path serves where one does not.
    const typeName = (method as { requestType?: { type?: { name?: string } } }).requestType?.type?.name ?? `request of ${method.path}`;
    out[name] = { ...method, requestDeserialize: tolerant(typeName, method.requestDeserialize) };
  }
  return out as S;
}

/** The request as decoded, or INVALID_ARGUMENT (rule request.undecodable) when its bytes were not its type's. */
export function decodedRequest<T>(request: T | UndecodableRequest): T {
  if (!(request instanceof UndecodableRequest)) return request;
  throw invalidArgument(`the request message is not a valid ${request.typeName}: ${request.reason}`, [
    { rule: 'request.undecodable', field: '', message: `not a valid ${request.typeName} (protobuf: ${request.reason})` },
  ]);
}
