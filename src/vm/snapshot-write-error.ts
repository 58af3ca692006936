/**
 * What a CreateSnapshot caller is told when writing the snapshot file fails with an errno (a full
 * disk above all): the snapshot's name, the errno and the directory, and that the previous snapshot
 * under that name is intact (the write is atomic: AtomicFileSink). Without this the raw Node or
 * native error ("pwrite failed: ENOSPC ...") reached the client as INTERNAL with no name or path.
 */
import path from 'node:path';
import { getSystemErrorMap } from 'node:util';
import { VcpudError } from '../errors';
import { accessDenied } from './snapshot-store';

/** Errnos that mean the filesystem has no room for the snapshot: retrying helps once space is freed. */
const NO_ROOM = new Set(['ENOSPC', 'EDQUOT', 'EFBIG']);

let errnoText: Map<string, string> | undefined;
function describeErrno(code: string): string {
  errnoText ??= new Map([...getSystemErrorMap().values()]);
  return errnoText.get(code) ?? 'system error';
}

/**
 * The error to report for `e`, thrown while writing snapshot `name` to `file`. Errors that are
 * already vcpud's (a bad name, a KVM ioctl, a cancelled call) pass through unchanged.
 */
export function snapshotWriteError(e: unknown, name: string, file: string): unknown {
  if (e instanceof VcpudError) return e;
  const err = e as { code?: unknown; syscall?: unknown };
  if (typeof err?.code !== 'string' || !/^E[A-Z0-9]+$/.test(err.code)) return e;
  const code = err.code;
  if (code === 'EACCES' || code === 'EPERM') return Object.assign(accessDenied(path.dirname(file), code, 'write a snapshot in'), { cause: e });
  const full = NO_ROOM.has(code);
  const during = typeof err.syscall === 'string' ? ` from ${err.syscall}` : '';
  return new VcpudError(
    full ? 'resource_exhausted' : 'internal',
    `snapshot "${name}" could not be written to ${path.dirname(file)}: ${code} (${describeErrno(code)})${during}; ` +
      'the previous snapshot under that name, if any, is unchanged',
    { reason: full ? 'STORAGE_FULL' : 'INTERNAL_ERROR', errno: code },
    { cause: e },
  );
}
