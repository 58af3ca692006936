/**
 * The one error table: every VcpudError kind maps to one gRPC code, and every error carries a
 * google.rpc.Status in the grpc-status-details-bin trailer with exactly one ErrorInfo (domain
 * vcpud.dev, reason from protos/vcpud/v1/errors.proto) and, for bad input, a BadRequest listing
 * every violation; a FAILED_PRECONDITION with violations (an incompatible snapshot) carries them
 * as a google.rpc.PreconditionFailure instead.
 */
import * as grpc from '@grpc/grpc-js';
import type protobuf from 'protobufjs';
import { classifyErrno, VcpudError, type ErrorKind } from '../errors';
import { STATUS_DETAILS_KEY, statusTypes } from '../api/status-details';

const DOMAIN = 'vcpud.dev';

const CODES: Record<ErrorKind, grpc.status> = {
  not_found: grpc.status.NOT_FOUND,
  invalid_argument: grpc.status.INVALID_ARGUMENT,
  failed_precondition: grpc.status.FAILED_PRECONDITION,
  already_exists: grpc.status.ALREADY_EXISTS,
  unsupported: grpc.status.FAILED_PRECONDITION,
  resource_exhausted: grpc.status.RESOURCE_EXHAUSTED,
  unavailable: grpc.status.UNAVAILABLE,
  cancelled: grpc.status.CANCELLED,
  data_loss: grpc.status.DATA_LOSS,
  kernel: grpc.status.INTERNAL,
  internal: grpc.status.INTERNAL,
};

const DEFAULT_REASONS: Record<ErrorKind, string> = {
  not_found: 'VM_NOT_FOUND',
  invalid_argument: 'INVALID_REQUEST',
  failed_precondition: 'WRONG_RUN_STATE',
  already_exists: 'SNAPSHOT_EXISTS',
  unsupported: 'CAPABILITY_MISSING',
  resource_exhausted: 'LIMIT_EXCEEDED',
  unavailable: 'SHUTTING_DOWN',
  // So far only PrepareIncomingMigration answers it (the incoming migration discarded).
  cancelled: 'MIGRATION_FAILED',
  data_loss: 'SNAPSHOT_CORRUPT',
  kernel: 'INTERNAL_ERROR',
  internal: 'INTERNAL_ERROR',
};

function any(type: protobuf.Type, value: object) {
  return { type_url: `type.googleapis.com/${type.fullName.replace(/^\./, '')}`, value: type.encode(type.create(value)).finish() };
}

/** The errno an error carries: one a VcpudError recorded, or a Node ErrnoException's (fs, net). */
function errnoOf(e: unknown): string | undefined {
  if (e instanceof VcpudError) return e.details.errno;
  const code = (e as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? code : undefined;
}

/**
 * Normalizes anything thrown into a VcpudError. A KvmError was classified when it was made
 * (classifyErrno); an errno met anywhere else (a file, a socket, or wrapped as internal) goes
 * through the same table, with no ioctl: only its host-wide rows (out of descriptors or memory)
 * apply. Anything else unknown is internal.
 */
export function asVcpudError(e: unknown): VcpudError {
  if (e instanceof VcpudError && e.kind !== 'internal') return e;
  const errno = errnoOf(e);
  const c = errno === undefined ? undefined : classifyErrno(undefined, errno);
  const message = (e as Error)?.message ?? String(e);
  if (errno && c && c.kind !== 'kernel')
    return new VcpudError(
      c.kind,
      message.includes(errno) ? message : `${message} (${errno})`,
      {
        ...(e instanceof VcpudError ? e.details : {}),
        reason: c.reason,
        errno,
      },
      { cause: e },
    );
  if (e instanceof VcpudError) return e;
  return new VcpudError('internal', `internal error: ${message}`, {}, { cause: e });
}

/** The status object a grpc-js handler passes to its callback (or emits on a stream). */
export function toServiceError(e: unknown): Partial<grpc.StatusObject> & { code: grpc.status } {
  const err = asVcpudError(e);
  const code = CODES[err.kind];
  const d = err.details;
  const reason = d.reason ?? DEFAULT_REASONS[err.kind];
  const first = d.violations?.[0];
  const metadata: Record<string, string> = {};
  const put = (k: string, v: string | undefined) => v !== undefined && (metadata[k] = v);
  put('rule', first?.rule);
  put('field', d.field ?? first?.field);
  put('ioctl', d.ioctl);
  put('errno', d.errno);
  put('section', d.section && `STATE_SECTION_${d.section.toUpperCase()}`);
  put('capability', d.capability);
  put('limit', d.limit);
  put('chunk', d.chunk);
  put('offset', d.offset);
  const t = statusTypes;
  const details = [any(t.ErrorInfo, { reason, domain: DOMAIN, metadata })];
  if (d.violations?.length && code === grpc.status.FAILED_PRECONDITION) {
    details.push(
      any(t.PreconditionFailure, {
        violations: d.violations.map((v) => ({ type: v.rule, subject: v.field, description: v.message })),
      }),
    );
  } else if (d.violations?.length) {
    details.push(
      any(t.BadRequest, {
        field_violations: d.violations.map((v) => ({ field: v.field, description: v.message, reason: v.rule })),
      }),
    );
  }
  const status = t.Status.encode(t.Status.create({ code, message: err.message, details })).finish();
  const md = new grpc.Metadata();
  md.set(STATUS_DETAILS_KEY, Buffer.from(status));
  return { code, details: err.message, metadata: md };
}
