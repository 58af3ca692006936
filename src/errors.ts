/**
 * The one error taxonomy of vcpud. Every layer throws these; src/server maps each kind to a
 * single gRPC status, so a new error needs a kind, never a new mapping rule.
 */
export type ErrorKind =
  | 'not_found' // unknown VM or vCPU
  | 'invalid_argument' // malformed request, bad blob, rule violations
  | 'failed_precondition' // wrong state for the operation (paused/running, incompatible snapshot)
  | 'unsupported' // the host lacks a capability the operation needs
  | 'resource_exhausted' // a configured limit or a size bound
  | 'unavailable' // shutting down, or a peer (migration destination) cannot be reached
  | 'data_loss' // a snapshot whose bytes are corrupt or truncated (a chunk checksum fails)
  | 'kernel' // an ioctl failed with an errno
  | 'internal'; // should never happen

/** One violated rule: stable id, the field it concerns, and a sentence a human can act on. */
export interface Violation {
  rule: string;
  field: string;
  message: string;
}

/** What an error says beyond its kind, carried to clients as google.rpc ErrorInfo / BadRequest. */
export interface ErrorDetails {
  /** ErrorInfo.reason override (protos/vcpud/v1/errors.proto), e.g. VM_NOT_FOUND. */
  reason?: string;
  violations?: Violation[];
  capability?: string;
  limit?: string;
  section?: string;
  field?: string;
  ioctl?: string;
  errno?: string;
  /** Snapshots: the number of the record (chunk) at fault and its byte offset in the snapshot. */
  chunk?: string;
  offset?: string;
}

export class VcpudError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
    readonly details: ErrorDetails = {},
  ) {
    super(message);
    this.name = 'VcpudError';
  }
}

/** A failed ioctl or syscall, shaped like Node's ErrnoException: errno, code, and the ioctl's name. */
export class KvmError extends VcpudError {
  readonly errno: number;
  readonly code: string;
  readonly ioctl: string;
  /** For E2BIG: the size or count the kernel asked for, when it wrote one back. */
  readonly required?: number;

  constructor(ioctl: string, errno: number, code: string, message: string, required?: number) {
    super('kernel', message, { ioctl, errno: code });
    this.name = 'KvmError';
    this.ioctl = ioctl;
    this.errno = errno;
    this.code = code;
    this.required = required;
  }
}

/** The host cannot do what was asked: names the KVM capability (or module parameter) and why. */
export class UnsupportedError extends VcpudError {
  constructor(
    readonly capability: string,
    readonly reason: string,
  ) {
    super('unsupported', `${capability} is not available on this host: ${reason}`, { capability });
    this.name = 'UnsupportedError';
  }
}

/**
 * Errnos meaning the host ran out of file descriptors (EMFILE: vcpud's limit, ENFILE: the system's)
 * or memory: neither bad input nor a bug, and the same call can succeed once something is released.
 * They are answered RESOURCE_EXHAUSTED with reason HOST_RESOURCES_EXHAUSTED, whichever layer saw them.
 */
export const HOST_EXHAUSTION_ERRNOS: ReadonlySet<string> = new Set(['EMFILE', 'ENFILE', 'ENOMEM']);

export const notFound = (what: string, reason?: 'VM_NOT_FOUND' | 'VCPU_NOT_FOUND' | 'SNAPSHOT_NOT_FOUND', field?: string) =>
  new VcpudError('not_found', what, { reason, field });
export const invalidArgument = (message: string, violations?: Violation[]) =>
  new VcpudError('invalid_argument', message, { violations });
export const failedPrecondition = (message: string, reason?: 'VCPU_RUNNING' | 'WRONG_RUN_STATE') =>
  new VcpudError('failed_precondition', message, { reason });
export const limitExceeded = (limit: string, message: string) =>
  new VcpudError('resource_exhausted', message, { limit });
