/**
 * The snapshot directory: snapshot names are paths relative to it and never leave it. A name is
 * refused when it is absolute, has an empty, "." or ".." component, a hidden component (temporary
 * files are hidden), a NUL, or runs through a symbolic link; the resolved parent must lie inside
 * the directory's real path. Missing subdirectories are created (mode 0700) when writing.
 */
import fs from 'node:fs';
import path from 'node:path';
import { invalidArgument, notFound, VcpudError, type Violation } from '../errors';
import { decodePreamble, decodeRecordHeader, PREAMBLE_SIZE, RECORD_HEADER_SIZE, RecordKind, crc32c, type SnapshotHeader } from './snapshot-format';
import { removeStaleTemps } from './snapshot-writer';

const MAX_NAME_BYTES = 1024;
const MAX_COMPONENT_BYTES = 255;

export interface SnapshotEntry {
  name: string;
  sizeBytes: number;
  modified: Date;
  /** The header, when it could be read and its checksum holds. */
  header?: SnapshotHeader;
  /** Why the header could not be read. */
  problem?: string;
}

function bad(name: string, rule: string, message: string): VcpudError {
  const v: Violation = { rule, field: 'name', message };
  return invalidArgument(`snapshot name ${JSON.stringify(name)} is refused: ${message}`, [v]);
}

export class SnapshotStore {
  constructor(readonly dir: string) {}

  /** Creates the directory (mode 0700) if needed; returns its real path. */
  ensureDir(): string {
    fs.mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    return fs.realpathSync(this.dir);
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
   * The absolute path `name` denotes, after walking every existing component without following a
   * symbolic link. `create`: missing directories are created.
   */
  resolve(name: string, create: boolean): string {
    const parts = this.components(name);
    const root = this.ensureDir();
    let at = root;
    for (const [i, p] of parts.entries()) {
      const next = path.join(at, p);
      const last = i === parts.length - 1;
      let st: fs.Stats | undefined;
      try {
        st = fs.lstatSync(next);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
      }
      if (st?.isSymbolicLink()) throw bad(name, 'snapshot.name.symlink', `"${parts.slice(0, i + 1).join('/')}" is a symbolic link`);
      if (!last) {
        if (!st) {
          if (!create) throw notFound(`no snapshot named ${JSON.stringify(name)} in ${root}`, 'SNAPSHOT_NOT_FOUND', 'name');
          fs.mkdirSync(next, { mode: 0o700 });
        } else if (!st.isDirectory()) {
          throw bad(name, 'snapshot.name.not_directory', `"${parts.slice(0, i + 1).join('/')}" is not a directory`);
        }
      } else if (st && !st.isFile()) {
        throw bad(name, 'snapshot.name.not_file', `"${name}" exists and is not a regular file`);
      }
      at = next;
    }
    const parent = fs.realpathSync(path.dirname(at));
    if (parent !== root && !parent.startsWith(root + path.sep)) throw bad(name, 'snapshot.name.escape', 'resolves outside the snapshot directory');
    return at;
  }

  /** Where CreateSnapshot writes `name` (directories created); stale temporary files there are removed. */
  pathForWrite(name: string): string {
    const p = this.resolve(name, true);
    removeStaleTemps(path.dirname(p));
    return p;
  }

  /** Opens `name` for reading (O_NOFOLLOW): its fd and path. */
  openForRead(name: string): { fd: number; path: string } {
    const p = this.resolve(name, false);
    try {
      return { fd: fs.openSync(p, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW), path: p };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw notFound(`no snapshot named ${JSON.stringify(name)} in ${this.dir}`, 'SNAPSHOT_NOT_FOUND', 'name');
      throw e;
    }
  }

  /** Removes `name`. */
  remove(name: string): void {
    const p = this.resolve(name, false);
    try {
      fs.unlinkSync(p);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw notFound(`no snapshot named ${JSON.stringify(name)} in ${this.dir}`, 'SNAPSHOT_NOT_FOUND', 'name');
      throw e;
    }
  }

  /** Every snapshot file under the directory (hidden and temporary files left out), by name. */
  list(): SnapshotEntry[] {
    const root = this.ensureDir();
    const out: SnapshotEntry[] = [];
    const walk = (dir: string, prefix: string) => {
      for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
        if (e.name.startsWith('.')) continue;
        const full = path.join(dir, e.name);
        const name = prefix ? `${prefix}/${e.name}` : e.name;
        if (e.isDirectory()) walk(full, name);
        else if (e.isFile()) {
          const st = fs.statSync(full);
          const entry: SnapshotEntry = { name, sizeBytes: st.size, modified: st.mtime };
          try {
            entry.header = readHeader(full);
          } catch (err) {
            entry.problem = (err as Error).message;
          }
          out.push(entry);
        }
      }
    };
    walk(root, '');
    return out.sort((a, b) => a.name.localeCompare(b.name));
  }
}

/** The header of a snapshot file (its own checksum verified; the rest is not read). */
export function readHeader(file: string): SnapshotHeader {
  const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
  try {
    const head = Buffer.alloc(PREAMBLE_SIZE + RECORD_HEADER_SIZE);
    if (fs.readSync(fd, head, 0, head.length, 0) < head.length) throw new Error('shorter than a snapshot header');
    decodePreamble(head);
    const h = decodeRecordHeader(head.subarray(PREAMBLE_SIZE), PREAMBLE_SIZE, 0);
    if (h.kind !== RecordKind.Header || h.payloadLength > 16 << 20) throw new Error('the first chunk is not a header');
    const payload = Buffer.alloc(h.payloadLength);
    if (fs.readSync(fd, payload, 0, payload.length, PREAMBLE_SIZE + RECORD_HEADER_SIZE + h.pad) < payload.length) throw new Error('truncated header');
    if (crc32c(payload) !== h.payloadCrc) throw new Error('checksum mismatch in chunk 0 (header)');
    return JSON.parse(payload.toString('utf8')) as SnapshotHeader;
  } finally {
    fs.closeSync(fd);
  }
}
