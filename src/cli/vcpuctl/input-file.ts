/**
 * Files named on vcpuctl's command line (--in, --tls-ca, load's FILE, ...): opened or read with
 * what went wrong said in words, as a usage error (exit 2) naming the option, never a raw errno.
 */
import fs from 'node:fs';
import { UsageError } from './args';

const PROBLEMS: Record<string, string> = {
  ENOENT: 'no such file',
  EISDIR: 'is a directory, not a file',
  EACCES: 'permission denied',
  EPERM: 'permission denied',
  ENOTDIR: 'a component of the path is not a directory',
  ELOOP: 'too many symbolic links',
};

/** `flag FILE: problem` as a UsageError for the command `command`. */
export function inputFileError(flag: string, file: string, e: unknown, command = ''): UsageError {
  const code = (e as NodeJS.ErrnoException).code;
  return new UsageError(`${flag} ${file}: ${(code && PROBLEMS[code]) ?? (e as Error).message}`, command);
}

/** Opens a regular file for reading; its descriptor and size. */
export function openInputFile(flag: string, file: string, resolved: string = file, command = ''): { fd: number; size: number } {
  let fd: number;
  try {
    fd = fs.openSync(resolved, 'r');
  } catch (e) {
    throw inputFileError(flag, file, e, command);
  }
  const st = fs.fstatSync(fd);
  // open(2) succeeds on a directory; reading it would fail later with a bare EISDIR
  if (!st.isFile()) {
    fs.closeSync(fd);
    throw inputFileError(flag, file, Object.assign(new Error('not a regular file'), { code: st.isDirectory() ? 'EISDIR' : undefined }), command);
  }
  return { fd, size: st.size };
}

/** Reads a whole input file. */
export function readInputFile(flag: string, file: string, resolved: string = file, command = ''): Buffer {
  try {
    return fs.readFileSync(resolved);
  } catch (e) {
    throw inputFileError(flag, file, e, command);
  }
}
