/**
 * File operations relative to directory fds (native/fs_at.cc), typed. Every call runs on the libuv
 * pool and rejects with a Node-style errno error (code, errno, syscall). No policy here: what is
 * opened with which flags, and what is refused, is src/vm/snapshot-store.ts's.
 */
import fs from 'node:fs';
import { promisify } from 'node:util';
import { native } from './native';

export interface FileStat {
  mode: number;
  size: number;
  mtimeMs: number;
  uid: number;
  ino: number;
  dev: number;
}

export interface DirEntries {
  names: string[];
  /** d_type per name (DT_UNKNOWN where the filesystem does not say). */
  types: Uint8Array;
}

interface FsAtNative {
  openat2(dirFd: number, path: string, flags: number, mode: number, resolve: number): Promise<number>;
  openat(dirFd: number, path: string, flags: number, mode: number): Promise<number>;
  mkdirat(dirFd: number, name: string, mode: number): Promise<void>;
  unlinkat(dirFd: number, name: string, flags: number): Promise<void>;
  renameat(fromDirFd: number, from: string, toDirFd: number, to: string): Promise<void>;
  linkat(fromDirFd: number, from: string, toDirFd: number, to: string, flags: number): Promise<void>;
  fstatat(dirFd: number, name: string, flags: number): Promise<FileStat>;
  readdir(dirFd: number): Promise<DirEntries>;
  clearNonblock(fd: number): void;
  /** flock(fd, LOCK_EX | LOCK_NB), synchronous: throws EWOULDBLOCK when another holder has it. */
  lockExclusive(fd: number): void;
  constants: Record<
    | 'AT_FDCWD'
    | 'AT_EMPTY_PATH'
    | 'AT_SYMLINK_NOFOLLOW'
    | 'AT_REMOVEDIR'
    | 'O_RDONLY'
    | 'O_WRONLY'
    | 'O_CREAT'
    | 'O_EXCL'
    | 'O_NOFOLLOW'
    | 'O_DIRECTORY'
    | 'O_NONBLOCK'
    | 'O_PATH'
    | 'RESOLVE_BENEATH'
    | 'RESOLVE_NO_SYMLINKS'
    | 'RESOLVE_NO_MAGICLINKS'
    | 'RESOLVE_NO_XDEV'
    | 'S_IFMT'
    | 'S_IFREG'
    | 'S_IFDIR'
    | 'S_IFLNK'
    | 'DT_UNKNOWN'
    | 'DT_REG'
    | 'DT_DIR'
    | 'DT_LNK',
    number
  >;
}

export const fsAt = (native as unknown as { fsAt: FsAtNative }).fsAt;
export const FS = fsAt.constants;

/** fstat(fd). */
export const fstat = (fd: number): Promise<FileStat> => fsAt.fstatat(fd, '', FS.AT_EMPTY_PATH);

/** close(fd) on the pool. */
export const closeFd: (fd: number) => Promise<void> = promisify(fs.close);

/** fsync(fd) on the pool. */
export const fsyncFd: (fd: number) => Promise<void> = promisify(fs.fsync);

export const isRegular = (st: FileStat) => (st.mode & FS.S_IFMT) === FS.S_IFREG;
export const isDirectory = (st: FileStat) => (st.mode & FS.S_IFMT) === FS.S_IFDIR;

let openat2Probe: Promise<boolean> | undefined;

/**
 * Whether openat2 works here (Linux 5.6+; a seccomp filter may refuse it with ENOSYS or EPERM); asked
 * once. Callers without it walk one openat per component, which is as safe, only slower.
 */
export function hasOpenat2(): Promise<boolean> {
  openat2Probe ??= fsAt.openat2(FS.AT_FDCWD, '/', FS.O_PATH | FS.O_DIRECTORY, 0, 0).then(
    (fd) => closeFd(fd).then(() => true),
    () => false,
  );
  return openat2Probe;
}
