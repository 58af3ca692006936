/**
 * The rich error status of the gRPC API (google.rpc.Status in the grpc-status-details-bin trailer, with
 * ErrorInfo, BadRequest and PreconditionFailure details): the types the server encodes it with
 * (src/server/errors.ts) and the decoding its clients use (vcpuctl, MigrateVm's source, the tests).
 */
import path from 'node:path';
import type * as grpc from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import { packageRoot } from '../package';

/** The trailer that carries the encoded google.rpc.Status. */
export const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

/**
 * The google.rpc types every error reply needs, loaded once when vcpud starts: loading them at the
 * first error needed descriptors, and an error caused by running out of them (EMFILE) then threw
 * inside the error path and ended the process.
 */
export const statusTypes = (() => {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => path.join(packageRoot(), 'protos', target);
  root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
  return {
    Status: root.lookupType('google.rpc.Status'),
    ErrorInfo: root.lookupType('google.rpc.ErrorInfo'),
    BadRequest: root.lookupType('google.rpc.BadRequest'),
    PreconditionFailure: root.lookupType('google.rpc.PreconditionFailure'),
  };
})();

export interface DecodedStatus {
  code: number;
  message: string;
  errorInfo?: { reason: string; domain: string; metadata: Record<string, string> };
  badRequest?: { field: string; description: string; reason: string }[];
  preconditionFailure?: { type: string; subject: string; description: string }[];
}

/**
 * Decodes the rich status of an error a client received (vcpuctl, MigrateVm's source, the tests).
 * A trailer that does not parse (not from vcpud) gives undefined: callers fall back to code and details.
 */
export function decodeStatusDetails(metadata: grpc.Metadata | undefined): DecodedStatus | undefined {
  const raw = typeof metadata?.get === 'function' ? metadata.get(STATUS_DETAILS_KEY)[0] : undefined;
  if (!raw || typeof raw === 'string') return undefined;
  try {
    const t = statusTypes;
    const s = t.Status.toObject(t.Status.decode(raw)) as { code: number; message: string; details?: { type_url: string; value: Uint8Array }[] };
    const out: DecodedStatus = { code: s.code, message: s.message };
    for (const a of s.details ?? []) {
      if (a.type_url.endsWith('google.rpc.ErrorInfo'))
        out.errorInfo = t.ErrorInfo.toObject(t.ErrorInfo.decode(a.value), { defaults: true }) as DecodedStatus['errorInfo'];
      // Only the fields DecodedStatus names (toObject would add e.g. localized_message: null).
      if (a.type_url.endsWith('google.rpc.BadRequest')) {
        const br = t.BadRequest.toObject(t.BadRequest.decode(a.value), { defaults: true }) as { field_violations?: NonNullable<DecodedStatus['badRequest']> };
        out.badRequest = (br.field_violations ?? []).map(({ field, description, reason }) => ({ field, description, reason }));
      }
      if (a.type_url.endsWith('google.rpc.PreconditionFailure')) {
        const pf = t.PreconditionFailure.toObject(t.PreconditionFailure.decode(a.value), { defaults: true }) as {
          violations?: NonNullable<DecodedStatus['preconditionFailure']>;
        };
        out.preconditionFailure = (pf.violations ?? []).map(({ type, subject, description }) => ({ type, subject, description }));
      }
    }
    return out;
  } catch {
    return undefined;
  }
}
