/**
 * The one error taxonomy of vcpud. Every layer throws these; src/server maps each kind to a
 * single gRPC status, so a new error needs a kind, never a new mapping rule.
 */
export type ErrorKind =
  | 'not_found' // unknown VM or vCPU
  | 'invalid_argument' // malformed request, bad blob, rule violations
  | 'failed_precondition' // wrong state for the operation (paused/running, incompatible snapshot)
  | 'already_exists' // what the call would create exists and the request did not ask to replace it
  | 'unsupported' // the host lacks a capability the operation needs
  | 'resource_exhausted' // a configured limit or a size bound
  | 'unavailable' // shutting down, or a peer (migration destination) cannot be reached
  | 'cancelled' // the caller cancelled the call (or its deadline passed) while it worked; what it held was freed
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
  /** KVM_SET_MSRS refused an MSR: its index and its position in the entries written. */
  msr?: { index: number; position: number };
}

export class VcpudError extends Error {
  constructor(
    readonly kind: ErrorKind,
    message: string,
    readonly details: ErrorDetails = {},
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'VcpudError';
  }
}

/** How one failed syscall is answered: the kind (hence the gRPC code) and ErrorInfo.reason. */
export interface ErrnoClass {
  kind: ErrorKind;
  reason: string;
}

/**
 * Errnos meaning the host ran out of file descriptors (EMFILE: vcpud's limit, ENFILE: the system's)
 * or memory: neither bad input nor a bug, and the same call can succeed once something is released.
 */
const HOST_EXHAUSTION_ERRNOS: ReadonlySet<string> = new Set(['EMFILE', 'ENFILE', 'ENOMEM']);

/** Errnos with which the kernel refuses caller-supplied values (EPOSITIVE: an ioctl returned > 0). */
const REFUSAL_ERRNOS: ReadonlySet<string> = new Set(['EINVAL', 'E2BIG', 'ERANGE', 'EFAULT', 'EPOSITIVE']);

/** Errnos of opening /dev/kvm that mean "this host gives vcpud no KVM" (absent, no module, no access). */
const NO_KVM_ERRNOS: ReadonlySet<string> = new Set(['ENOENT', 'ENXIO', 'ENODEV', 'EACCES', 'EPERM']);

/**
 * Errnos with which a connection itself fails (EOF: the peer closed it, as the native stream calls
 * report it). The caller's account is the peer's: a migration channel waits for the peer's ERROR
 * envelope before naming the failure, where any other errno is this side's and classified below.
 */
const CONNECTION_ERRNOS: ReadonlySet<string> = new Set([
  'EOF',
  'EPIPE',
  'ECONNRESET',
  'ECONNABORTED',
  'ENOTCONN',
  'ESHUTDOWN',
  'ENETDOWN',
  'ENETUNREACH',
  'EHOSTDOWN',
  'EHOSTUNREACH',
]);

export const isConnectionErrno = (errno: string): boolean => CONNECTION_ERRNOS.has(errno);

/** Ioctls that write values the caller chose: a refusal there is the caller's value, not our bug. */
const WRITES_CALLER_VALUES = /^KVM_(SET|CREATE|ENABLE|CLEAR)_/;

/**
 * THE classification of a failed syscall, by (ioctl or syscall name, errno name), first match wins.
 * Every path that sees an errno (KvmError, SetState's sections, nested state, snapshots, Node's
 * own ErrnoExceptions in the server) answers through this table, so one refusal gets one code.
 */
const ERRNO_TABLE: readonly { ioctl?: RegExp; errnos: ReadonlySet<string>; class: ErrnoClass }[] = [
  { errnos: HOST_EXHAUSTION_ERRNOS, class: { kind: 'resource_exhausted', reason: 'HOST_RESOURCES_EXHAUSTED' } },
  { ioctl: /^open$/, errnos: NO_KVM_ERRNOS, class: { kind: 'unavailable', reason: 'KVM_UNAVAILABLE' } },
  { ioctl: WRITES_CALLER_VALUES, errnos: REFUSAL_ERRNOS, class: { kind: 'invalid_argument', reason: 'KERNEL_REJECTED' } },
];
/** Anything else: a GET failing, EBADF, EIO... never expected (INTERNAL). */
const UNEXPECTED: ErrnoClass = { kind: 'kernel', reason: 'INTERNAL_ERROR' };

export function classifyErrno(ioctl: string | undefined, errno: string): ErrnoClass {
  const row = ERRNO_TABLE.find((r) => r.errnos.has(errno) && (!r.ioctl || (ioctl !== undefined && r.ioctl.test(ioctl))));
  return row?.class ?? UNEXPECTED;
}

/**
 * A failed ioctl or syscall, shaped like Node's ErrnoException: errno, code, and the ioctl's name.
 * Its kind and reason come from classifyErrno when it is made, so every layer sees the same answer.
 */
export class KvmError extends VcpudError {
  readonly errno: number;
  readonly code: string;
  readonly ioctl: string;
  /** For E2BIG: the size or count the kernel asked for, when it wrote one back. */
  readonly required?: number;

  constructor(ioctl: string, errno: number, code: string, message: string, required?: number) {
    const { kind, reason } = classifyErrno(ioctl, code);
    super(kind, message.includes(code) ? message : `${message} (${code})`, { ioctl, errno: code, reason });
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

export const notFound = (what: string, reason?: 'VM_NOT_FOUND' | 'VCPU_NOT_FOUND' | 'SNAPSHOT_NOT_FOUND', field?: string) =>
  new VcpudError('not_found', what, { reason, field });
export const invalidArgument = (message: string, violations?: Violation[]) => new VcpudError('invalid_argument', message, { violations });
export const failedPrecondition = (message: string, reason?: 'VCPU_RUNNING' | 'WRONG_RUN_STATE') => new VcpudError('failed_precondition', message, { reason });
/** A snapshot file that exists, for a CreateSnapshot that did not ask to replace it. */
export const snapshotExists = (file: string) =>
  new VcpudError('already_exists', `a snapshot already exists at ${file}: set replace (vcpuctl snapshot create --replace) to replace it`, {
    reason: 'SNAPSHOT_EXISTS',
    field: 'name',
  });
export const limitExceeded = (limit: string, message: string) => new VcpudError('resource_exhausted', message, { limit });
