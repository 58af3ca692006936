/**
 * The snapshot directory: snapshot names are paths relative to it and never leave it. A name is
 * refused when it is absolute, has an empty, "." or ".." component, a hidden component (temporary
 * files are hidden), a NUL, or runs through a symbolic link. Missing subdirectories are created
 * (mode 0700) when writing.
 *
 * Confinement holds by construction, not by checking a path and using it again: every operation
 * is relative to a directory fd opened beneath the directory's own fd, with no symbolic link
 * followed (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS where the kernel has it, otherwise one
 * openat(O_NOFOLLOW | O_DIRECTORY) per component), and unlink, link and rename take that parent fd.
 * Files are opened O_NONBLOCK and refused unless fstat says regular, so a FIFO or device swapped
 * in cannot block. Everything runs on the libuv pool (src/ffi/fs-at.ts): a slow or huge directory
 * never stalls the JS thread.
 */
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { invalidArgument, notFound, snapshotExists, VcpudError, type Violation } from '../errors';
import { closeFd, FS, fsAt, fstat, hasOpenat2, isDirectory, isRegular, type FileStat } from '../ffi/fs-at';
import {
  decodePreamble,
  decodeRecordHeader,
  nextRecordOffset,
  PREAMBLE_SIZE,
  RECORD_HEADER_SIZE,
  RecordKind,
  crc32c,
  type SnapshotHeader,
  type SnapshotIdentity,
} from './snapshot-format';
import { isStaleTemp, isTempName, type AtomicTarget } from './atomic-file';
import { firstNonPlainCharacter, PLAIN_CHARACTERS } from './vm-name';

const MAX_NAME_BYTES = 1024;
const MAX_COMPONENT_BYTES = 255;
/** Directory levels a name can reach ("a/b/..." within MAX_NAME_BYTES); scans go no deeper, holding one fd per level. */
const MAX_DEPTH = MAX_NAME_BYTES / 2;
/** ListSnapshots page sizes (the proto states both). */
export const DEFAULT_PAGE_SIZE = 1000;
export const MAX_PAGE_SIZE = 10_000;
/** Header reads in flight at once while listing a page. */
const HEADER_READS_IN_FLIGHT = 16;
/** Bytes of the snapshot header record the listing reads at most. */
const MAX_HEADER_BYTES = 16 << 20;

/** openat2 calls per open when renames keep racing the lookup (EAGAIN). */
const OPENAT2_ATTEMPTS = 8;
const RESOLVE = FS.RESOLVE_BENEATH | FS.RESOLVE_NO_SYMLINKS | FS.RESOLVE_NO_MAGICLINKS;
const readFd = promisify(fs.read);

export interface SnapshotEntry {
  name: string;
  sizeBytes: number;
  modified: Date;
  /** The header, when it could be read and its checksum holds. */
  header?: SnapshotHeader;
  /** Why the header (or, for a subdirectory, its listing) could not be read. */
  problem?: string;
}

export interface SnapshotPage {
  entries: SnapshotEntry[];
  /** Empty on the last page. */
  nextPageToken: string;
}

/** An open directory beneath the snapshot directory and a name in it; close() when done. */
export interface OpenTarget extends AtomicTarget {
  close(): Promise<void>;
}

function bad(name: string, rule: string, message: string): VcpudError {
  const v: Violation = { rule, field: 'name', message };
  return invalidArgument(`snapshot name ${JSON.stringify(name)} is refused: ${message}`, [v]);
}

const errnoOf = (e: unknown) => (e as NodeJS.ErrnoException)?.code;
const isAccessErrno = (code: string | undefined) => code === 'EACCES' || code === 'EPERM';

/** FAILED_PRECONDITION naming the path vcpud may not access (errors.proto: SNAPSHOT_DIR_ACCESS_DENIED). */
export function accessDenied(file: string, code: string, doing: string): VcpudError {
  return new VcpudError('failed_precondition', `vcpud may not ${doing} ${file}: ${code}; fix the snapshot directory's owner or mode on the host`, {
    reason: 'SNAPSHOT_DIR_ACCESS_DENIED',
    errno: code,
  });
}

export interface SnapshotStoreOptions {
  /** Resolve with openat2 (default: when the kernel has it); false walks one openat per component. */
  openat2?: boolean;
}

export class SnapshotStore {
  private useOpenat2: Promise<boolean>;

  constructor(
    readonly dir: string,
    opts: SnapshotStoreOptions = {},
  ) {
    this.useOpenat2 = opts.openat2 === false ? Promise.resolve(false) : hasOpenat2();
  }

  /** Checks a name's syntax; returns its components. */
  components(name: string): string[] {
    if (typeof name !== 'string' || name.length === 0) throw bad(String(name), 'snapshot.name.required', 'a snapshot name is required');
    if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw bad(name, 'snapshot.name.length', `longer than ${MAX_NAME_BYTES} bytes`);
    if (name.includes('\0')) throw bad(name, 'snapshot.name.nul', 'contains a NUL byte');
    if (name.startsWith('/')) throw bad(name, 'snapshot.name.absolute', 'absolute paths are not allowed: names are relative to the snapshot directory');
    const parts = name.split('/');
    for (const p of parts) {
      if (p === '' || p === '.') throw bad(name, 'snapshot.name.component', 'empty or "." path components are not allowed');
      if (p === '..') throw bad(name, 'snapshot.name.traversal', '".." is not allowed: names stay inside the snapshot directory');
      if (p.startsWith('.')) throw bad(name, 'snapshot.name.hidden', `component "${p}" starts with "." (reserved for temporary files)`);
      if (Buffer.byteLength(p) > MAX_COMPONENT_BYTES) throw bad(name, 'snapshot.name.length', `component longer than ${MAX_COMPONENT_BYTES} bytes`);
    }
    return parts;
  }

  /**
   * The error to report for errno error `e` met resolving or using `name` (`rel` of it: the part
   * walked so far). Anything else passes through.
   */
  private fsError(e: unknown, name: string, rel: string, doing: string): unknown {
    const code = errnoOf(e);
    switch (code) {
      case 'ENOENT':
        return notFound(`no snapshot named ${JSON.stringify(name)} in ${this.dir}`, 'SNAPSHOT_NOT_FOUND', 'name');
      case 'ELOOP':
        return bad(name, 'snapshot.name.symlink', `"${rel}" is or runs through a symbolic link`);
      case 'EXDEV':
        return bad(name, 'snapshot.name.escape', 'resolves outside the snapshot directory');
      case 'ENOTDIR':
        return bad(name, 'snapshot.name.not_directory', `a component of "${rel}" is not a directory`); // refined by notDirectory()
      case 'EISDIR':
        return bad(name, 'snapshot.name.not_file', `"${rel}" is a directory, not a snapshot file`);
      default:
        return isAccessErrno(code) ? accessDenied(path.join(this.dir, rel), code as string, doing) : e;
    }
  }

  /**
   * ENOTDIR while opening the directories of `name` (O_DIRECTORY | O_NOFOLLOW answers it for a
   * symbolic link too): which component, and whether it is a link. Diagnostic only, by path: the
   * refusal is decided already.
   */
  private async notDirectory(name: string, parts: string[]): Promise<VcpudError> {
    for (let i = 1; i <= parts.length; i++) {
      const rel = parts.slice(0, i).join('/');
      const st = await fs.promises.lstat(path.join(this.dir, rel)).catch(() => undefined);
      if (st?.isSymbolicLink()) return bad(name, 'snapshot.name.symlink', `"${rel}" is a symbolic link`);
      if (st && !st.isDirectory()) return bad(name, 'snapshot.name.not_directory', `"${rel}" is not a directory`);
    }
    return bad(name, 'snapshot.name.not_directory', `a component of "${parts.join('/')}" is not a directory`);
  }

  /**
   * Opens the snapshot directory itself, creating it (mode 0700) when missing unless `create` is
   * false (then ENOENT is thrown). The configured path is the operator's: followed as given.
   */
  private async openRoot(create = true): Promise<number> {
    const open = () => fsAt.openat(FS.AT_FDCWD, this.dir, FS.O_RDONLY | FS.O_DIRECTORY, 0);
    try {
      try {
        return await open();
      } catch (e) {
        if (errnoOf(e) !== 'ENOENT' || !create) throw e;
        await fs.promises.mkdir(this.dir, { recursive: true, mode: 0o700 });
        return await open();
      }
    } catch (e) {
      const code = errnoOf(e);
      if (isAccessErrno(code)) throw accessDenied(this.dir, code as string, 'open the snapshot directory');
      throw e;
    }
  }

  /** Runs `fn` with the snapshot directory's fd, closed afterwards. */
  private async withRoot<T>(fn: (rootFd: number) => Promise<T>, create = true): Promise<T> {
    const rootFd = await this.openRoot(create);
    try {
      return await fn(rootFd);
    } finally {
      await closeFd(rootFd);
    }
  }

  /**
   * Opens `rel` (components joined by "/") beneath `dirFd` without following a symbolic link
   * anywhere; the result is `flags`' kind of fd. A ".." cannot reach it (names are checked), and
   * RESOLVE_BENEATH would refuse it anyway.
   */
  private async openBeneath(dirFd: number, rel: string, flags: number, mode = 0): Promise<number> {
    if (await this.useOpenat2) {
      // A scoped lookup answers EAGAIN when a rename anywhere raced it; it is safe to ask again.
      for (let attempt = 1; ; attempt++) {
        try {
          return await fsAt.openat2(dirFd, rel, flags | FS.O_NOFOLLOW, mode, RESOLVE);
        } catch (e) {
          if (errnoOf(e) !== 'EAGAIN' || attempt >= OPENAT2_ATTEMPTS) throw e;
        }
      }
    }
    const parts = rel.split('/');
    let at = dirFd;
    try {
      for (const [i, p] of parts.entries()) {
        const last = i === parts.length - 1;
        const next = await fsAt.openat(at, p, last ? flags | FS.O_NOFOLLOW : FS.O_RDONLY | FS.O_DIRECTORY | FS.O_NOFOLLOW, last ? mode : 0);
        if (at !== dirFd) await closeFd(at);
        at = next;
      }
      return at;
    } catch (e) {
      if (at !== dirFd) await closeFd(at);
      throw e;
    }
  }

  /** Opens the directory `parts` names beneath `rootFd`, creating missing ones (0700) when `create`. */
  private async openDirectory(rootFd: number, name: string, parts: string[], create: boolean): Promise<number> {
    const flags = FS.O_RDONLY | FS.O_DIRECTORY;
    if (parts.length === 0) return fsAt.openat(rootFd, '.', flags, 0);
    if (!create) {
      try {
        return await this.openBeneath(rootFd, parts.join('/'), flags);
      } catch (e) {
        throw errnoOf(e) === 'ENOTDIR' ? await this.notDirectory(name, parts) : this.fsError(e, name, parts.join('/'), 'open');
      }
    }
    let at = await fsAt.openat(rootFd, '.', flags, 0);
    for (const [i, p] of parts.entries()) {
      const rel = parts.slice(0, i + 1).join('/');
      let next: number;
      try {
        try {
          next = await this.openBeneath(at, p, flags);
        } catch (e) {
          if (errnoOf(e) !== 'ENOENT') throw e;
          await fsAt.mkdirat(at, p, 0o700).catch((m) => {
            if (errnoOf(m) !== 'EEXIST') throw m;
          });
          next = await this.openBeneath(at, p, flags);
        }
      } catch (e) {
        await closeFd(at);
        throw errnoOf(e) === 'ENOTDIR' ? await this.notDirectory(name, parts) : this.fsError(e, name, rel, 'create or open');
      }
      await closeFd(at);
      at = next;
    }
    return at;
  }

  /**
   * Opens `rel` beneath `dirFd` for reading as a regular file: O_NONBLOCK (a FIFO or device cannot
   * block the open), refused unless fstat says regular, then blocking again for the reads.
   */
  private async openRegular(dirFd: number, name: string, rel: string): Promise<{ fd: number; st: FileStat }> {
    let fd: number;
    try {
      fd = await this.openBeneath(dirFd, rel, FS.O_RDONLY | FS.O_NONBLOCK);
    } catch (e) {
      throw errnoOf(e) === 'ENOTDIR' ? await this.notDirectory(name, rel.split('/')) : this.fsError(e, name, rel, 'open');
    }
    try {
      const st = await fstat(fd);
      if (!isRegular(st)) throw bad(name, 'snapshot.name.not_file', `"${rel}" is not a regular file (${fileKind(st)})`);
      fsAt.clearNonblock(fd);
      return { fd, st };
    } catch (e) {
      await closeFd(fd);
      throw e;
    }
  }

  /**
   * Where CreateSnapshot writes `name`: its directory (created as needed) opened beneath the
   * snapshot directory, with stale temporary files there removed. An existing snapshot there is
   * ALREADY_EXISTS unless `replace`. A name vcpud writes prints as itself, like a VM name (files
   * already there under other names can still be read and deleted).
   */
  async openForWrite(name: string, { replace = false }: { replace?: boolean } = {}): Promise<OpenTarget> {
    const parts = this.components(name);
    const unprintable = firstNonPlainCharacter(name);
    if (unprintable)
      throw invalidArgument(
        `the snapshot name has the character ${unprintable.codePoint} at position ${unprintable.index}, which a snapshot name cannot hold`,
        [{ rule: 'snapshot.name.characters', field: 'name', message: PLAIN_CHARACTERS }],
      );
    const base = parts.pop() as string;
    const dirFd = await this.withRoot((root) => this.openDirectory(root, name, parts, true));
    try {
      const st = await fsAt.fstatat(dirFd, base, FS.AT_SYMLINK_NOFOLLOW).catch((e) => {
        if (errnoOf(e) === 'ENOENT') return undefined;
        throw this.fsError(e, name, name, 'inspect');
      });
      if (st && (st.mode & FS.S_IFMT) === FS.S_IFLNK) throw bad(name, 'snapshot.name.symlink', `"${name}" is a symbolic link`);
      if (st && !isRegular(st)) throw bad(name, 'snapshot.name.not_file', `"${name}" exists and is not a regular file (${fileKind(st)})`);
      if (st && !replace) throw snapshotExists(path.join(this.dir, name)); // before the VM is paused; finish() closes the race
      await this.removeStaleTempsIn(dirFd);
    } catch (e) {
      await closeFd(dirFd);
      throw e;
    }
    return { dirFd, name: base, displayPath: path.join(this.dir, name), replace, close: () => closeFd(dirFd) };
  }

  /** Opens `name` for reading (a regular file, never through a symbolic link): its fd and path. */
  async openForRead(name: string): Promise<{ fd: number; path: string }> {
    const parts = this.components(name);
    const { fd } = await this.withRoot((root) => this.openRegular(root, name, parts.join('/')));
    return { fd, path: path.join(this.dir, name) };
  }

  /**
   * The header and identity of snapshot `name`, the file closed again. `known(snapshotId)`: an
   * identity recorded when that snapshot was written; when the file's header record matches it,
   * its END is taken from there instead of following every record header to it (readIdentity).
   */
  async identify(name: string, known?: (snapshotId: string) => SnapshotIdentity | undefined): Promise<{ header: SnapshotHeader; identity: SnapshotIdentity }> {
    const { fd } = await this.openForRead(name);
    try {
      const size = (await fstat(fd)).size;
      const { header, headerCrc } = await readHeaderRecord(fd, size);
      const recorded = header.snapshotId ? known?.(header.snapshotId) : undefined;
      if (recorded?.headerCrc === headerCrc) return { header, identity: recorded };
      return await readIdentity(fd, size);
    } finally {
      await closeFd(fd);
    }
  }

  /** Every snapshot under the directory whose header could be read, page after page of list(). */
  async allEntries(): Promise<SnapshotEntry[]> {
    const out: SnapshotEntry[] = [];
    let token = '';
    do {
      const page = await this.list(MAX_PAGE_SIZE, token);
      out.push(...page.entries.filter((e) => e.header));
      token = page.nextPageToken;
    } while (token);
    return out;
  }

  /** Removes `name` (a regular file; the unlink is relative to its directory's fd). */
  async remove(name: string): Promise<void> {
    const parts = this.components(name);
    const base = parts.pop() as string;
    const dirFd = await this.withRoot((root) => this.openDirectory(root, name, parts, false));
    try {
      const st = await fsAt.fstatat(dirFd, base, FS.AT_SYMLINK_NOFOLLOW);
      if (!isRegular(st)) throw bad(name, 'snapshot.name.not_file', `"${name}" is not a regular file (${fileKind(st)})`);
      await fsAt.unlinkat(dirFd, base, 0);
    } catch (e) {
      throw e instanceof VcpudError ? e : this.fsError(e, name, name, 'remove');
    } finally {
      await closeFd(dirFd);
    }
  }

  /**
   * One page of the snapshot files under the directory (hidden and temporary files left out), in
   * ascending order of their names (UTF-16 code units). A subdirectory that cannot be read is an entry with a
   * problem; the rest is listed.
   */
  async list(pageSize = 0, pageToken = ''): Promise<SnapshotPage> {
    if (!Number.isInteger(pageSize) || pageSize < 0)
      throw invalidArgument(`page_size ${pageSize} is negative`, [
        { rule: 'page_size.min', field: 'page_size', message: 'give 0 (the default page size) or more' },
      ]);
    const size = pageSize === 0 ? DEFAULT_PAGE_SIZE : Math.min(pageSize, MAX_PAGE_SIZE);
    const after = decodePageToken(pageToken);
    return this.withRoot(async (root) => {
      const files: string[] = [];
      const problems = new Map<string, string>();
      await this.walk(root, '', {
        file: (rel) => files.push(rel),
        unreadable: (rel, e) => problems.set(rel, `cannot list this directory: ${errnoOf(e) ?? (e as Error).message}`),
      });
      const names = [...files, ...problems.keys()].filter((n) => after === undefined || n > after).sort(); // default order: UTF-16 code units, as `>` compares
      const page = names.slice(0, size);
      const entries = await mapLimited(
        page,
        HEADER_READS_IN_FLIGHT,
        (n): Promise<SnapshotEntry> =>
          problems.has(n) ? Promise.resolve({ name: n, sizeBytes: 0, modified: new Date(0), problem: problems.get(n) }) : this.entry(root, n),
      );
      return { entries, nextPageToken: names.length > size ? encodePageToken(page[page.length - 1]) : '' };
    });
  }

  /** A listing entry for file `name`: its size, mtime and header (or why the header is unreadable). */
  private async entry(root: number, name: string): Promise<SnapshotEntry> {
    let opened: { fd: number; st: FileStat };
    try {
      opened = await this.openRegular(root, name, name);
    } catch (e) {
      return { name, sizeBytes: 0, modified: new Date(0), problem: (e as Error).message };
    }
    const entry: SnapshotEntry = { name, sizeBytes: opened.st.size, modified: new Date(opened.st.mtimeMs) };
    try {
      entry.header = await readHeader(opened.fd, opened.st.size);
    } catch (err) {
      entry.problem = (err as Error).message;
    } finally {
      await closeFd(opened.fd);
    }
    return entry;
  }

  /**
   * Walks the tree beneath `dirFd` (at `rel`) depth-first: regular files (not hidden) go to
   * `file`, hidden entries to `hidden` (with their directory's fd, open for the call), subdirectories
   * that cannot be opened or read to `unreadable`. Symbolic links and other kinds are skipped.
   */
  private async walk(
    dirFd: number,
    rel: string,
    visit: { file?: (rel: string) => void; hidden?: (dirFd: number, name: string) => Promise<void>; unreadable?: (rel: string, e: unknown) => void },
    depth = 1,
  ): Promise<void> {
    const { names, types } = await fsAt.readdir(dirFd);
    for (const [i, n] of names.entries()) {
      if (n.startsWith('.')) {
        await visit.hidden?.(dirFd, n);
        continue;
      }
      const child = rel ? `${rel}/${n}` : n;
      let type = types[i];
      if (type === FS.DT_UNKNOWN) {
        const st = await fsAt.fstatat(dirFd, n, FS.AT_SYMLINK_NOFOLLOW).catch(() => undefined);
        type = !st ? FS.DT_UNKNOWN : isRegular(st) ? FS.DT_REG : isDirectory(st) ? FS.DT_DIR : FS.DT_UNKNOWN;
      }
      if (type === FS.DT_REG) visit.file?.(child);
      if (type !== FS.DT_DIR) continue;
      if (depth >= MAX_DEPTH) {
        visit.unreadable?.(child, new Error(`deeper than ${MAX_DEPTH} levels, which no snapshot name reaches: not listed`));
        continue;
      }
      let sub: number;
      try {
        sub = await this.openBeneath(dirFd, n, FS.O_RDONLY | FS.O_DIRECTORY);
      } catch (e) {
        if (errnoOf(e) !== 'ENOENT' && errnoOf(e) !== 'ELOOP') visit.unreadable?.(child, e); // gone, or swapped for a link: not ours to list
        continue;
      }
      try {
        await this.walk(sub, child, visit, depth + 1);
      } catch (e) {
        visit.unreadable?.(child, e);
      } finally {
        await closeFd(sub);
      }
    }
  }

  /** Removes crashed runs' temporary files in one directory (fd); returns their names. */
  private async removeStaleTempsIn(dirFd: number): Promise<string[]> {
    const { names } = await fsAt.readdir(dirFd);
    const removed: string[] = [];
    for (const n of names) if (await removeIfStale(dirFd, n)) removed.push(n);
    return removed;
  }

  /**
   * Removes crashed runs' temporary files anywhere under the directory (at start: a kill -9 during
   * a snapshot into a subdirectory leaves one there); returns their names. A directory that does
   * not exist yet is left uncreated.
   */
  async removeStaleTemps(): Promise<string[]> {
    const removed: string[] = [];
    try {
      await this.withRoot(
        (root) =>
          this.walk(root, '', {
            hidden: async (dirFd, n) => {
              if (await removeIfStale(dirFd, n)) removed.push(n);
            },
          }),
        false,
      );
    } catch (e) {
      if (errnoOf(e) !== 'ENOENT') throw e;
    }
    return removed;
  }
}

async function removeIfStale(dirFd: number, name: string): Promise<boolean> {
  if (!isTempName(name)) return false;
  try {
    const st = await fsAt.fstatat(dirFd, name, FS.AT_SYMLINK_NOFOLLOW);
    if (!isStaleTemp(name, st.mtimeMs)) return false;
    await fsAt.unlinkat(dirFd, name, 0);
    return true;
  } catch {
    return false; // raced with another cleaner: fine
  }
}

function fileKind(st: FileStat): string {
  const kinds: Record<number, string> = {
    0o010000: 'a FIFO',
    0o020000: 'a character device',
    0o040000: 'a directory',
    0o060000: 'a block device',
    0o120000: 'a symbolic link',
    0o140000: 'a socket',
  };
  return kinds[st.mode & FS.S_IFMT] ?? 'not a regular file';
}

const TOKEN_PREFIX = 'after:';

function encodePageToken(lastName: string): string {
  return Buffer.from(TOKEN_PREFIX + lastName).toString('base64url');
}

function decodePageToken(token: string): string | undefined {
  if (!token) return undefined;
  const text = Buffer.from(token, 'base64url').toString('utf8');
  if (!text.startsWith(TOKEN_PREFIX) || encodePageToken(text.slice(TOKEN_PREFIX.length)) !== token)
    throw invalidArgument('page_token is not a next_page_token of ListSnapshots', [
      { rule: 'page_token.invalid', field: 'page_token', message: 'pass next_page_token unchanged, or leave it empty' },
    ]);
  return text.slice(TOKEN_PREFIX.length);
}

/** `fn` over `items`, at most `limit` at a time, results in order. */
async function mapLimited<T, R>(items: T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

/**
 * The header of an open snapshot file of `size` bytes (its own checksum verified; the rest is not
 * read). Reads run on the pool; a header claiming more bytes than the file has is refused before
 * its buffer is allocated.
 */
export async function readHeader(fd: number, size: number): Promise<SnapshotHeader> {
  return (await readHeaderRecord(fd, size)).header;
}

/** readHeader, with the header record's payload CRC (a snapshot's identity starts with it). */
async function readHeaderRecord(fd: number, size: number): Promise<{ header: SnapshotHeader; headerCrc: number }> {
  const readAt = async (length: number, position: number) => {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await readFd(fd, buf, 0, length, position);
    return bytesRead < length ? undefined : buf;
  };
  const head = await readAt(PREAMBLE_SIZE + RECORD_HEADER_SIZE, 0);
  if (!head) throw new Error('shorter than a snapshot header');
  decodePreamble(head);
  const h = decodeRecordHeader(head.subarray(PREAMBLE_SIZE), PREAMBLE_SIZE, 0);
  if (h.kind !== RecordKind.Header || h.payloadLength > MAX_HEADER_BYTES) throw new Error('the first chunk is not a header');
  const payloadAt = PREAMBLE_SIZE + RECORD_HEADER_SIZE + h.pad;
  if (payloadAt + h.payloadLength > size) throw new Error('truncated header');
  const payload = await readAt(h.payloadLength, payloadAt);
  if (!payload) throw new Error('truncated header');
  if (crc32c(payload) !== h.payloadCrc) throw new Error('checksum mismatch in chunk 0 (header)');
  return { header: JSON.parse(payload.toString('utf8')) as SnapshotHeader, headerCrc: h.payloadCrc };
}

/**
 * The header and identity of an open snapshot file of `size` bytes: the header's checksum is
 * verified, then the record headers (each checked against its own CRC) are followed to END. The
 * payloads are not read: a restore verifies them.
 */
export async function readIdentity(fd: number, size: number): Promise<{ header: SnapshotHeader; identity: SnapshotIdentity }> {
  const header = await readHeader(fd, size);
  const raw = Buffer.alloc(RECORD_HEADER_SIZE);
  let at = PREAMBLE_SIZE;
  let headerCrc = 0;
  for (let seq = 0; ; seq++) {
    const { bytesRead } = await readFd(fd, raw, 0, RECORD_HEADER_SIZE, at);
    if (bytesRead < RECORD_HEADER_SIZE) throw new Error(`truncated: no END record (the file ends at byte ${size})`);
    const h = decodeRecordHeader(raw, at, seq);
    if (seq === 0) headerCrc = h.payloadCrc;
    if (h.kind === RecordKind.End) return { header, identity: { snapshotId: header.snapshotId ?? '', headerCrc, endCrc: h.payloadCrc } };
    at = nextRecordOffset(h);
  }
}
