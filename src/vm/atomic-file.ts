/**
 * The one atomic file writer: snapshot files (snapshot-writer.ts AtomicFileSink) and the restart
 * handover's state files and manifest (handover.ts) are written through it.
 *
 * Everything goes to a hidden temporary file next to the final name; commit() fsyncs it, publishes it
 * under the final name and fsyncs the directory. Until then the final name shows the previous file
 * (or nothing); a crash leaves only the temporary file, whose name says which process wrote it (the
 * snapshot store sweeps those of dead processes, a handover restore removes every file it does not
 * know). Every operation is relative to the directory's fd (never a path string), so swapping a
 * directory on the way for a symbolic link cannot move the file elsewhere.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { snapshotExists } from '../errors';
import { closeFd, FS, fsAt, fsyncFd } from '../ffi/fs-at';

const TEMP_SUFFIX = '.vcpud-tmp';
/**
 * `.NAME.PID.INSTANCE.RANDOM.vcpud-tmp`, and `.NAME.PID.INSTANCE.vcpud-tmp` from versions before the
 * random part. Parsed in that order: a current name whose INSTANCE is all decimal digits also fits the
 * older shape, read with INSTANCE as the pid and RANDOM as the instance (a live writer's file taken
 * for a dead one's). An older name never fits the current shape: its PID would need 8 digits, and
 * Linux pids have at most 7 (pid_max <= 4194304).
 */
const TEMP_PATTERNS = [/^\..+\.(\d+)\.([0-9a-f]{8})\.[0-9a-f]{8}\.vcpud-tmp$/, /^\..+\.(\d+)\.([0-9a-f]{8})\.vcpud-tmp$/];
const parseTempName = (name: string): RegExpExecArray | undefined => {
  for (const pattern of TEMP_PATTERNS) {
    const m = pattern.exec(name);
    if (m) return m;
  }
  return undefined;
};

/**
 * This process's incarnation. A pid alone does not tell a crashed vcpud's files from ours: in a
 * container vcpud is PID 1 every time, so the pid of the one that crashed is ours again.
 */
const INSTANCE = randomBytes(4).toString('hex');
const STARTED_MS = performance.timeOrigin;

/** The temporary name (in the same directory) `finalName` is written under before it is published: hidden, with our pid and instance. */
export function tempNameFor(finalName: string): string {
  return `.${finalName}.${process.pid}.${INSTANCE}.${randomBytes(4).toString('hex')}${TEMP_SUFFIX}`;
}

/** Whether a directory entry's name is one of our temporary files (of any vcpud process). */
export const isTempName = (name: string): boolean => parseTempName(name) !== undefined;

/**
 * Whether temporary file `name` (last written at `mtimeMs`) was left by a vcpud process that no longer
 * exists (a crash mid-write): that of a dead pid, or of an earlier incarnation with our pid (another
 * instance token) not written since we started. A live writer elsewhere keeps its file's mtime moving.
 */
export function isStaleTemp(name: string, mtimeMs: number): boolean {
  const m = parseTempName(name);
  if (!m) return false;
  const pid = Number(m[1]);
  return pid === process.pid ? m[2] !== INSTANCE && mtimeMs < STARTED_MS : !processAlive(pid);
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Where an AtomicFile is published: an open directory (the file uses its own duplicate) and the final name in it. */
export interface AtomicTarget {
  dirFd: number;
  name: string;
  /** For messages only: the final file's path. */
  displayPath: string;
  /** Replace a file already under `name`; without it commit() refuses to (ALREADY_EXISTS). */
  replace: boolean;
}

/** A file being written atomically (see the module comment): write through `fd` or writeAt, then commit() or abort(). */
export class AtomicFile {
  private done = false;

  private constructor(
    private readonly dirFd: number,
    /** The temporary file, open for writing. */
    readonly fd: number,
    readonly tempName: string,
    private readonly target: AtomicTarget,
  ) {}

  /** Creates the temporary file (O_EXCL | O_NOFOLLOW, mode 0600) in the target's directory. */
  static async create(target: AtomicTarget): Promise<AtomicFile> {
    const dirFd = await fsAt.openat(target.dirFd, '.', FS.O_RDONLY | FS.O_DIRECTORY, 0);
    const tempName = tempNameFor(target.name);
    try {
      const fd = await fsAt.openat(dirFd, tempName, FS.O_WRONLY | FS.O_CREAT | FS.O_EXCL | FS.O_NOFOLLOW, 0o600);
      return new AtomicFile(dirFd, fd, tempName, target);
    } catch (e) {
      await closeFd(dirFd);
      throw e;
    }
  }

  get finalName(): string {
    return this.target.name;
  }

  /** Writes all of `buf` at `position` (synchronously: the callers write metadata-sized pieces here). */
  writeAt(buf: Buffer, position: number): void {
    let off = 0;
    while (off < buf.length) off += fs.writeSync(this.fd, buf, off, buf.length - off, position + off);
  }

  /** Makes the file durable and visible under its final name: fsync, publish, fsync of the directory. */
  async commit(): Promise<void> {
    await fsyncFd(this.fd);
    this.done = true;
    await closeFd(this.fd);
    if (!this.target.replace) return this.publishNew();
    // A file being replaced keeps a second (hidden, temporary-named) link until after the rename, so
    // the rename does not free its blocks inline (hundreds of ms for a large snapshot); the unlink
    // afterwards runs on the pool. A crash in between leaves only that hidden link, which the
    // stale-temp sweep cleans up.
    let previous: string | undefined = tempNameFor(this.finalName);
    try {
      await fsAt.linkat(this.dirFd, this.finalName, this.dirFd, previous, 0);
    } catch {
      previous = undefined; // nothing to replace
    }
    try {
      await fsAt.renameat(this.dirFd, this.tempName, this.dirFd, this.finalName);
      await fsyncFd(this.dirFd);
    } catch (e) {
      await this.releaseDir(previous, this.tempName); // the rename may have happened: then the temp name is gone already
      throw e;
    }
    void this.releaseDir(previous); // not awaited: the caller does not wait for the blocks to be freed
  }

  /**
   * Publishes the file under a name that must be free: link(2) never replaces, so of two writers
   * racing for one name (both past the store's existence check) exactly one wins; the other is ALREADY_EXISTS.
   */
  private async publishNew(): Promise<void> {
    try {
      await fsAt.linkat(this.dirFd, this.tempName, this.dirFd, this.finalName, 0);
    } catch (e) {
      await this.releaseDir(this.tempName);
      throw (e as NodeJS.ErrnoException)?.code === 'EEXIST' ? snapshotExists(this.target.displayPath) : e;
    }
    try {
      await fsAt.unlinkat(this.dirFd, this.tempName, 0).catch(() => {}); // published already; a leftover hidden link is swept at start
      await fsyncFd(this.dirFd);
    } finally {
      await closeFd(this.dirFd).catch(() => {});
    }
  }

  /** Drops what was written (the temporary file is removed). Idempotent; a no-op after commit(). */
  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    await closeFd(this.fd).catch(() => {}); // already closed
    await this.releaseDir(this.tempName);
  }

  /** Unlinks `names` (those given) in the directory, then closes the directory. Never throws. */
  private async releaseDir(...names: (string | undefined)[]): Promise<void> {
    for (const name of names) if (name) await fsAt.unlinkat(this.dirFd, name, 0).catch(() => {});
    await closeFd(this.dirFd).catch(() => {});
  }
}

/** Writes `data` as `dir/name` through an AtomicFile, replacing a file already there. */
export async function writeFileAtomic(dir: string, name: string, data: Buffer): Promise<void> {
  const dirFd = await fsAt.openat(FS.AT_FDCWD, dir, FS.O_RDONLY | FS.O_DIRECTORY, 0);
  try {
    const file = await AtomicFile.create({ dirFd, name, displayPath: `${dir}/${name}`, replace: true });
    try {
      file.writeAt(data, 0);
      await file.commit();
    } catch (e) {
      await file.abort(); // a no-op once commit() got as far as publishing: it cleans up after itself
      throw e;
    }
  } finally {
    await closeFd(dirFd);
  }
}
