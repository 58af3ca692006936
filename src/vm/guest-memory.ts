/**
 * Where guest memory comes from. Anonymous memory is the default. With a state directory
 * (--state-dir, on tmpfs or hugetlbfs) each VM's memory is one file there, mapped MAP_SHARED, so it
 * outlives the process: a graceful restart (handover.ts) maps the same files in place, without a
 * copy. A file is removed when its memory is released (the VM deleted, a failed restore or
 * migration); it stays only when the process exits holding it (the handover), or is disowned to be
 * kept aside for inspection.
 *
 * Either way the memory is the same NativeGuestMemory (one host address and length), so every user
 * (snapshots, lazy restore, dirty logging, migration) works on both.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { VcpudError } from '../errors';
import { fsAt } from '../ffi/fs-at';
import { kvmCall, native, type NativeGuestMemory } from '../ffi/native';

export interface GuestMemorySource {
  /** New zeroed guest memory of `bytes` (a multiple of 4096). */
  allocate(bytes: number): NativeGuestMemory;
}

export const anonymousMemory: GuestMemorySource = {
  allocate: (bytes) => kvmCall('mmap', () => new native.GuestMemory(bytes)),
};

/** Names of memory files in a state directory end with this. */
export const MEMORY_FILE_SUFFIX = '.mem';

export const isMemoryFile = (name: string): boolean => name.endsWith(MEMORY_FILE_SUFFIX);

/** The file a vcpud holds an exclusive flock on while it uses the state directory. */
export const LOCK_NAME = '.lock';

/** Guest memory as shared files in `dir` (which exists). */
export class StateDirMemory implements GuestMemorySource {
  private readonly files = new WeakMap<NativeGuestMemory, string>();

  constructor(readonly dir: string) {}

  /**
   * The state directory `dir` (made if missing), locked for this process: a second vcpud on it
   * would take the first one's memory files for a crash's leftovers and remove them.
   */
  static lock(dir: string): StateDirMemory {
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const file = path.join(dir, LOCK_NAME);
    const fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o600);
    try {
      fsAt.lockExclusive(fd); // held until this process ends (the descriptor stays open)
    } catch (e) {
      fs.closeSync(fd);
      if ((e as NodeJS.ErrnoException).code !== 'EWOULDBLOCK' && (e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
      throw new VcpudError(
        'failed_precondition',
        `state directory ${dir} is in use by another vcpud process (it holds ${file}): give each vcpud its own --state-dir`,
      );
    }
    return new StateDirMemory(dir);
  }

  allocate(bytes: number): NativeGuestMemory {
    const name = `${randomUUID()}${MEMORY_FILE_SUFFIX}`;
    const file = path.join(this.dir, name);
    const fd = this.fileCall(`creating ${file}`, () =>
      fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW, 0o600),
    );
    try {
      this.fileCall(`sizing ${file} to ${bytes} bytes`, () => fs.ftruncateSync(fd, bytes)); // sparse: pages cost memory when touched
      return this.adopt(
        name,
        kvmCall('mmap', () => new native.GuestMemory(bytes, fd)),
      );
    } catch (e) {
      fs.rmSync(file, { force: true });
      throw e;
    } finally {
      fs.closeSync(fd);
    }
  }

  /**
   * Maps the existing memory file `name` in place (a restart): it must be exactly `bytes` long. The
   * file is not owned yet (releasing the memory leaves it, for inspection) until own().
   */
  open(name: string, bytes: number): NativeGuestMemory {
    const file = path.join(this.dir, name);
    if (path.basename(name) !== name || !isMemoryFile(name)) throw new VcpudError('data_loss', `${JSON.stringify(name)} is not a memory file name`);
    const fd = this.fileCall(`opening ${file}`, () => fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_NOFOLLOW));
    try {
      const size = fs.fstatSync(fd).size;
      if (size !== bytes) throw new VcpudError('data_loss', `memory file ${file} is ${size} bytes, the VM has ${bytes}`);
      return this.adopt(
        name,
        kvmCall('mmap', () => new native.GuestMemory(bytes, fd)),
        false,
      );
    } finally {
      fs.closeSync(fd);
    }
  }

  /** Takes ownership of the file `name` that `memory` (from open) maps. */
  own(memory: NativeGuestMemory, name: string): void {
    this.files.set(memory, name);
  }

  /** The file name of memory this source made, if it still owns it. */
  fileOf(memory: NativeGuestMemory | undefined): string | undefined {
    return memory && this.files.get(memory);
  }

  /** Forgets memory's file: releasing the memory then leaves the file where it is. */
  disown(memory: NativeGuestMemory): void {
    this.files.delete(memory);
  }

  /** The file goes with the memory: whoever releases it (the VM, a failed restore) removes it. */
  private adopt(name: string, memory: NativeGuestMemory, owned = true): NativeGuestMemory {
    if (owned) this.files.set(memory, name);
    const unmap = memory.release.bind(memory);
    // An own property: the native class's methods are read-only on its prototype.
    Object.defineProperty(memory, 'release', {
      value: () => {
        unmap();
        const owned = this.files.get(memory);
        this.files.delete(memory);
        if (owned) fs.rmSync(path.join(this.dir, owned), { force: true });
      },
    });
    return memory;
  }

  private fileCall<T>(what: string, fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const kind = err.code === 'ENOSPC' || err.code === 'ENOMEM' ? 'resource_exhausted' : 'internal';
      throw Object.assign(new VcpudError(kind, `guest memory in the state directory: ${what}: ${err.message}`), { cause: e });
    }
  }
}
