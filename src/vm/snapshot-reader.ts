/**
 * Reading a snapshot (snapshot-format.ts) from a file or a byte stream into guest memory and saved
 * state, verifying every checksum on the way. Nothing is created here: the caller's check (the
 * compatibility check, limits) runs on the header before any memory is allocated, and a failure
 * anywhere releases what was allocated.
 *
 * From a file, memory data is mapped lazily where the layout allows (MAP_PRIVATE of the file's
 * page-aligned data runs over the guest memory, as Firecracker does): the guest faults pages in
 * from the page cache, and its writes stay private to the VM. Checksums are computed through that
 * mapping, i.e. over exactly the bytes the guest will see. The layers of an incremental snapshot's
 * chain (each read from its own file) are checksummed through a read-only mapping of the file on
 * the pool instead, i.e. over the same page-cache pages: that lets every layer be read at once, and
 * their pages are put into guest memory once the whole chain's are known, each page once from the
 * newest layer storing it (snapshot-page-plan.ts), while the checksums still run. Memory is handed
 * on only once all of them matched.
 */
import fs from 'node:fs';
import { VcpudError } from '../errors';
import { native, type NativeGuestMemory } from '../ffi/native';
import {
  bitmapBytes,
  bitmapRuns,
  CHUNK_PAGES,
  countBits,
  crc32c,
  decodeNamed,
  decodePreamble,
  decodeRecordHeader,
  describeChunk,
  hex,
  kindName,
  MAX_METADATA_PAYLOAD,
  nextRecordOffset,
  PAGE_SIZE,
  payloadOffset,
  PREAMBLE_SIZE,
  RECORD_HEADER_SIZE,
  RecordKind,
  snapshotCorrupt,
  type RecordHeader,
  type ParentLink,
  type SnapshotEnd,
  type SnapshotHeader,
  type SnapshotIdentity,
} from './snapshot-format';
import { PagePlan, RunWriter } from './snapshot-page-plan';

/** Memory chunks whose checksums (and copies) may be running at once (the libuv pool has 4 threads). */
const MAX_CRCS_IN_FLIGHT = 2;
/**
 * A chain layer's memory data are checksummed from its file in one pool task once its records are
 * read, by this many threads when they are at least SPLIT_CRC_BYTES (the full ancestor; a child is
 * small and checked beside it).
 */
const FILE_CRC_THREADS = 2;
const SPLIT_CRC_BYTES = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Byte sources

export interface ByteSource {
  /** Offset of the next byte. */
  readonly position: number;
  /** The next `n` bytes; throws a truncation error built by `what` when the snapshot ends first. */
  read(n: number, what: (available: number) => Error): Promise<Buffer>;
  /** Advances past `n` bytes (same error on truncation). */
  skip(n: number, what: (available: number) => Error): Promise<void>;
  /** The next `n` bytes as one or more buffers in order, without joining them (same error). */
  readPieces(n: number, what: (available: number) => Error): Promise<Buffer[]>;
}

/**
 * Bytes a FileSource reads at least at once: a memory chunk's map record, bitmap and data record
 * header lie within a page, so they cost one read instead of three (the data itself is skipped).
 */
const READ_AHEAD = 4096;

/** What padding is compared with: a record's padding is shorter than a page. */
const ZEROS = Buffer.alloc(PAGE_SIZE);

/** A snapshot file, read with positioned reads; memory data can be mapped from its fd. */
export class FileSource implements ByteSource {
  pos = 0;
  readonly size: number;
  /** The bytes of the last read, from file offset aheadAt on. */
  private ahead = Buffer.alloc(0);
  private aheadAt = 0;

  constructor(readonly fd: number) {
    this.size = fs.fstatSync(fd).size;
  }

  get position(): number {
    return this.pos;
  }

  async read(n: number, what: (available: number) => Error): Promise<Buffer> {
    if (this.pos + n > this.size) throw what(this.size - this.pos);
    const from = this.pos - this.aheadAt;
    if (from < 0 || from + n > this.ahead.length) {
      const want = Math.min(Math.max(n, READ_AHEAD), this.size - this.pos);
      const buf = Buffer.allocUnsafe(want);
      let off = 0;
      while (off < want) {
        const got = fs.readSync(this.fd, buf, off, want - off, this.pos + off);
        if (got === 0) break;
        off += got;
      }
      if (off < n) throw what(off);
      this.ahead = buf.subarray(0, off);
      this.aheadAt = this.pos;
    }
    const at = this.pos - this.aheadAt;
    this.pos += n;
    return this.ahead.subarray(at, at + n);
  }

  async skip(n: number, what: (available: number) => Error): Promise<void> {
    if (this.pos + n > this.size) throw what(this.size - this.pos);
    this.pos += n;
  }

  async readPieces(n: number, what: (available: number) => Error): Promise<Buffer[]> {
    return [await this.read(n, what)];
  }
}

/** A snapshot arriving as chunks (a gRPC client stream): pulls the next chunk only when needed. */
export class StreamSource implements ByteSource {
  private pos = 0;
  private buffered: Buffer[] = [];
  private bufferedBytes = 0;
  private ended = false;
  /** Bytes received in total (progress). */
  received = 0;

  constructor(private readonly chunks: AsyncIterator<Buffer>) {}

  get position(): number {
    return this.pos;
  }

  private async fill(n: number): Promise<boolean> {
    while (this.bufferedBytes < n && !this.ended) {
      const next = await this.chunks.next();
      if (next.done) {
        this.ended = true;
        break;
      }
      if (next.value.length) {
        this.buffered.push(next.value);
        this.bufferedBytes += next.value.length;
        this.received += next.value.length;
      }
    }
    return this.bufferedBytes >= n;
  }

  async read(n: number, what: (available: number) => Error): Promise<Buffer> {
    const pieces = await this.readPieces(n, what);
    return pieces.length === 1 ? pieces[0] : Buffer.concat(pieces, n);
  }

  async readPieces(n: number, what: (available: number) => Error): Promise<Buffer[]> {
    if (!(await this.fill(n))) throw what(this.bufferedBytes);
    const out: Buffer[] = [];
    for (let left = n; left > 0; ) {
      const b = this.buffered[0];
      const take = Math.min(b.length, left);
      out.push(take === b.length ? b : b.subarray(0, take));
      if (take === b.length) this.buffered.shift();
      else this.buffered[0] = b.subarray(take);
      left -= take;
    }
    this.bufferedBytes -= n;
    this.pos += n;
    return out;
  }

  async skip(n: number, what: (available: number) => Error): Promise<void> {
    await this.read(n, what);
  }

  /** True when nothing follows (checked after END). */
  async atEnd(): Promise<boolean> {
    return !(await this.fill(1));
  }
}

// ---------------------------------------------------------------------------------------------
// Loading

export interface LoadedSnapshot {
  header: SnapshotHeader;
  end: SnapshotEnd;
  /** Per vCPU id: section name (or "nested") -> the bytes saved. */
  vcpuState: Map<number, Map<string, Buffer>>;
  /** VM_STATE records by name. */
  vmState: Map<string, Buffer>;
  /** Guest memory with the snapshot's contents; the caller owns it (hand it to a VM or release it). */
  memory: NativeGuestMemory;
  /** Memory bytes mapped from the file, and bytes copied (read or received). */
  mappedBytes: number;
  copiedBytes: number;
  /** Bytes of the snapshot (of the whole chain for an incremental one). */
  bytes: number;
  /** What identifies this snapshot (what a child's link names). */
  identity: SnapshotIdentity;
  /** Snapshots read: 1, or the chain's length for an incremental one. */
  chainLength: number;
}

/** A chain layer as loadParent gives it: settled `verified` = every checksum of it and its ancestors matched. */
export interface LoadedLayer extends LoadedSnapshot {
  verified: Promise<void>;
  /**
   * A chain layer read from its file: its pages and its ancestors', not yet in `memory` (the
   * restored snapshot applies them); its file stays open until `plan.done`.
   */
  plan?: PagePlan;
}

export interface LoadOptions {
  /**
   * Runs on the header (and its record's payload CRC) before memory is allocated (compatibility
   * check, limits, a link's identity): throw to refuse.
   */
  check(header: SnapshotHeader, headerCrc: number): void;
  /**
   * Loads an incremental snapshot's parent chain (every link checked) into memory from `allocate`
   * (the child's allocator), which this snapshot's pages are then applied over; its checksums may
   * still be running (`verified`). Without it an incremental snapshot is refused.
   */
  loadParent?: (link: ParentLink, child: SnapshotHeader, allocate?: (bytes: number) => NativeGuestMemory) => Promise<LoadedLayer>;
  /** From a file: map memory data lazily (default true); false reads it. */
  lazy?: boolean;
  /**
   * This snapshot is an ancestor of the one restored (a chain layer): from a file its checksums are
   * computed from the file, not through guest memory, so that its children can be mapped over it meanwhile.
   */
  asAncestor?: boolean;
  onProgress?: (memoryBytesDone: number, memoryBytesTotal: number, bytes: number) => void;
  /** Allocates the guest memory (the registry's source: anonymous or a state-directory file); default anonymous. */
  allocate?: (bytes: number) => NativeGuestMemory;
  /** Called once guest memory is allocated, before it is filled (a restore prepares the VM meanwhile). */
  onMemory?: (memory: NativeGuestMemory, header: SnapshotHeader) => void;
}

function truncated(h: RecordHeader | undefined, what: string, source: ByteSource, need: number) {
  return (available: number) => {
    const endsAt = source.position + available;
    const inside = h ? ` inside ${describeChunk(h)}` : '';
    return snapshotCorrupt(
      `truncated: the snapshot ends at byte ${hex(endsAt)}${inside}, whose ${what} needs ${need} bytes from ${hex(source.position)}`,
      h?.seq,
      endsAt,
    );
  };
}

function mismatch(h: RecordHeader): Error {
  return snapshotCorrupt(`checksum mismatch in ${describeChunk(h)}`, h.seq, h.offset);
}

function checkHeaderShape(h: SnapshotHeader, rec: RecordHeader): void {
  const bad = (what: string) => snapshotCorrupt(`${describeChunk(rec)}: malformed snapshot header: ${what}`, rec.seq, rec.offset);
  if (h.format !== 'vcpud-snapshot') throw bad(`format is ${JSON.stringify(h.format)}`);
  if (!h.vm || !Number.isSafeInteger(h.vm.memoryBytes) || h.vm.memoryBytes <= 0 || h.vm.memoryBytes % PAGE_SIZE) throw bad('vm.memoryBytes');
  if (!Number.isInteger(h.vm.vcpuCount) || h.vm.vcpuCount < 1) throw bad('vm.vcpuCount');
  if (!Array.isArray(h.vcpus) || h.vcpus.length !== h.vm.vcpuCount) throw bad('vcpus does not list vm.vcpuCount vCPUs');
  if (!Array.isArray(h.vm.cpuid) || !Array.isArray(h.vm.memory) || !h.source || !Array.isArray(h.source.msrIndexList)) throw bad('missing fields');
  if (h.memoryLayout?.pageSize !== PAGE_SIZE || h.memoryLayout?.chunkPages !== CHUNK_PAGES) throw bad('memory layout');
}

/**
 * Reads a whole snapshot, verifying the preamble, every record header and every payload checksum,
 * the chunk sequence, the memory coverage and the END record. `fileFd`: memory data may be mapped
 * from this file (a FileSource over the same fd).
 */
export async function loadSnapshot(source: ByteSource, opts: LoadOptions, fileFd?: number): Promise<LoadedSnapshot> {
  const loaded = await loadLayer(source, opts, fileFd);
  try {
    await loaded.verified;
  } catch (e) {
    loaded.memory.release();
    throw e;
  }
  return loaded;
}

/**
 * loadSnapshot for a chain layer: returns once the snapshot is read and its memory applied; its
 * checksums (and its ancestors') may still be running: `verified`. The caller releases the memory
 * when that rejects.
 */
export async function loadLayer(source: ByteSource, opts: LoadOptions, fileFd?: number): Promise<LoadedLayer> {
  decodePreamble(await source.read(PREAMBLE_SIZE, truncated(undefined, 'preamble', source, PREAMBLE_SIZE)));
  let seq = 0;
  const nextHeader = async (): Promise<RecordHeader> => {
    const at = source.position;
    const raw = await source.read(RECORD_HEADER_SIZE, (available) =>
      snapshotCorrupt(
        `truncated: the snapshot ends at byte ${hex(at + available)}, where the header of chunk ${seq} (offset ${hex(at)}) should be${seq > 0 ? '; no END record' : ''}`,
        seq,
        at + available,
      ),
    );
    return decodeRecordHeader(raw, at, seq++);
  };
  const readPayload = async (h: RecordHeader, max = MAX_METADATA_PAYLOAD): Promise<Buffer> => {
    if (h.payloadLength > max)
      throw snapshotCorrupt(`${describeChunk(h)} declares a ${h.payloadLength}-byte payload, over the ${max}-byte limit of its kind`, h.seq, h.offset);
    await zeroPadding(h, h.pad, 'padding');
    const payload = await source.read(h.payloadLength, truncated(h, 'payload', source, h.payloadLength));
    if (crc32c(payload) !== h.payloadCrc) throw mismatch(h);
    await checkTail(h);
    return payload;
  };
  // Padding is outside every checksum, and the format says it is zero: it is read and checked rather
  // than skipped, so a damaged byte there is refused like one in a payload (a few bytes per record:
  // the pad before memory data ends the page its header is on, which a file source has read already).
  const zeroPadding = async (h: RecordHeader, n: number, what: string) => {
    if (!n) return;
    const at = source.position;
    const b = await source.read(n, truncated(h, what, source, n));
    if (b.equals(ZEROS.subarray(0, n))) return;
    const i = b.findIndex((x) => x !== 0);
    throw snapshotCorrupt(`${describeChunk(h)}: its ${what} holds a non-zero byte at offset ${hex(at + i)} (the format's padding is zero)`, h.seq, at + i);
  };
  const checkTail = (h: RecordHeader) => zeroPadding(h, nextRecordOffset(h) - (payloadOffset(h) + h.payloadLength), 'end padding');

  const first = await nextHeader();
  if (first.kind !== RecordKind.Header) throw snapshotCorrupt(`${describeChunk(first)}: the first chunk must be the header`, first.seq, first.offset);
  let header: SnapshotHeader;
  try {
    header = JSON.parse((await readPayload(first)).toString('utf8')) as SnapshotHeader;
  } catch (e) {
    if (e instanceof VcpudError) throw e;
    throw snapshotCorrupt(`${describeChunk(first)}: the header is not valid JSON: ${(e as Error).message}`, first.seq, first.offset);
  }
  checkHeaderShape(header, first);
  opts.check(header, first.payloadCrc);

  const memoryBytes = header.vm.memoryBytes;
  const lazy = fileFd !== undefined && opts.lazy !== false;
  // A chain layer from a file: its checksums are computed from the file, settled in `verified`.
  const fromFile = lazy && (opts.asAncestor || header.parent !== undefined);
  const allocate = (bytes: number) => {
    const m = opts.allocate ? opts.allocate(bytes) : new native.GuestMemory(bytes);
    opts.onMemory?.(m, header); // as soon as there is memory, even under a chain still being read
    return m;
  };
  // An incremental snapshot's pages go over its parent chain's memory (which then belongs to it),
  // applied while the parent's checksums may still run (`verified`).
  let base: LoadedLayer | undefined;
  if (header.parent) {
    if (!opts.loadParent) throw snapshotCorrupt(`${describeChunk(first)}: an incremental snapshot, and no parent can be read here`, first.seq, first.offset);
    base = await opts.loadParent(header.parent, header, allocate);
  }
  const memory = base?.memory ?? allocate(memoryBytes);
  const writer = new RunWriter(memory);
  // A file layer's pages join its ancestors' plan, applied by the snapshot restored (or merged) once
  // its own are added; another layer's go over memory holding its ancestors' pages (applied first).
  let plan = fromFile ? (base?.plan ?? new PagePlan(memoryBytes / PAGE_SIZE)) : undefined;
  const planLayer = plan ? plan.addLayer(fileFd as number) : 0;
  const vcpuState = new Map<number, Map<string, Buffer>>(header.vcpus.map((v) => [v.id, new Map()]));
  const vmState = new Map<string, Buffer>();
  let copiedBytes = 0;
  let nextGpa = 0;
  let pagesStored = 0;
  /** Maps (lazily) or reads the stored pages of one memory chunk into guest memory, or plans them. */
  const applyChunk = (h: RecordHeader, map: { gpa: number; pages: number; bitmap: Buffer }) => {
    let fileOff = payloadOffset(h);
    for (const [firstPage, count] of bitmapRuns(map.bitmap, map.pages)) {
      const memOff = map.gpa + firstPage * PAGE_SIZE;
      if (plan) plan.add(planLayer, memOff / PAGE_SIZE, count, fileOff);
      else writer.put(memOff, count * PAGE_SIZE, fileFd as number, fileOff);
      fileOff += count * PAGE_SIZE;
    }
  };
  // A chain layer's data records, checksummed from the file once all are read (fileCrcs).
  const fileRecords: RecordHeader[] = [];
  let fileBytes = 0;
  let fileCrcs: Promise<void> | undefined;
  const checkFileRecords = () => {
    if (!fileRecords.length) return;
    const ranges = new Float64Array(fileRecords.flatMap((h) => [payloadOffset(h), h.payloadLength]));
    // One task, not one per chunk like crc32cPages: the next would wait for this thread, busy
    // reading the next layers' records, to see the last one finish.
    fileCrcs = native.crc32cFileRanges(fileFd as number, ranges, fileBytes >= SPLIT_CRC_BYTES ? FILE_CRC_THREADS : 1).then(
      (crcs) => {
        const bad = fileRecords.findIndex((h, i) => crcs[i] !== h.payloadCrc);
        if (bad >= 0) throw mismatch(fileRecords[bad]);
      },
      (e) => {
        if ((e as { code?: unknown })?.code !== 'MEMORY_FAULT') throw e;
        const at = Number((e as { offset?: unknown }).offset);
        const h = fileRecords.find((b) => at >= payloadOffset(b) && at < payloadOffset(b) + b.payloadLength) ?? fileRecords[0];
        throw snapshotCorrupt(
          `${describeChunk(h)}: its memory can no longer be read from the file, which was truncated or changed during the restore`,
          h.seq,
          h.offset,
        );
      },
    );
    fileCrcs.catch(() => {}); // awaited in `verified`
  };
  // Memory chunks are checksummed (and copied) on the libuv pool, several at once, while the next
  // records are read; a mismatch is reported for the first chunk (in order) that has one.
  const pendingCrcs: Promise<RecordHeader | undefined>[] = [];
  let settledCrcs = 0;
  const firstMismatch = async (upTo: number) => {
    for (; settledCrcs < upTo; settledCrcs++) {
      const bad = await pendingCrcs[settledCrcs];
      if (bad) throw mismatch(bad); // still pending for the catch below: the same error again
    }
  };
  const checked = async (h: RecordHeader, crc: Promise<number>) => {
    const result = crc.then(
      (c) => (c === h.payloadCrc ? undefined : h),
      (e) => {
        // A mapped page faulted: the file was truncated or rewritten while we restored it.
        if ((e as { code?: unknown })?.code !== 'MEMORY_FAULT') throw e;
        throw snapshotCorrupt(
          `${describeChunk(h)}: its memory can no longer be read from the file, which was truncated or changed during the restore`,
          h.seq,
          h.offset,
        );
      },
    );
    result.catch(() => {}); // handled where it is awaited; a rejection before that must not count as unhandled
    pendingCrcs.push(result);
    await firstMismatch(pendingCrcs.length - MAX_CRCS_IN_FLIGHT + 1);
  };
  try {
    if (!fromFile) base?.plan?.apply(writer);
    let map: { gpa: number; pages: number; bitmap: Buffer } | undefined;
    for (;;) {
      const h = await nextHeader();
      const corrupt = (what: string) => snapshotCorrupt(`${describeChunk(h)}: ${what}`, h.seq, h.offset);
      if (map && h.kind !== RecordKind.MemoryData) throw corrupt(`a memory map must be followed by its memory data, not ${kindName(h.kind)}`);
      switch (h.kind) {
        case RecordKind.Header:
          throw corrupt('a second header');
        case RecordKind.VcpuState:
        case RecordKind.VmState: {
          const { name, data } = decodeNamed(await readPayload(h));
          const into = h.kind === RecordKind.VmState ? vmState : vcpuState.get(h.aux);
          if (!into) throw corrupt(`state of vCPU ${h.aux}, which the header does not list`);
          if (into.has(name)) throw corrupt(`${name} appears twice`);
          into.set(name, data);
          break;
        }
        case RecordKind.MemoryMap: {
          const pages = h.aux2;
          if (h.aux !== nextGpa) throw corrupt(`memory map for ${hex(h.aux)} where ${hex(nextGpa)} comes next`);
          if (pages < 1 || pages > CHUNK_PAGES || nextGpa + pages * PAGE_SIZE > memoryBytes) throw corrupt(`${pages} pages do not fit guest memory`);
          const bitmap = await readPayload(h, bitmapBytes(pages));
          if (bitmap.length !== bitmapBytes(pages)) throw corrupt('bitmap size does not match its page count');
          map = { gpa: h.aux, pages, bitmap };
          break;
        }
        case RecordKind.MemoryData: {
          if (!map || map.gpa !== h.aux) throw corrupt('memory data without its memory map');
          const stored = countBits(map.bitmap, map.pages);
          if (h.aux2 !== stored || h.payloadLength !== stored * PAGE_SIZE)
            throw corrupt(`holds ${h.aux2} pages (${h.payloadLength} bytes) where its map selects ${stored}`);
          if (stored) {
            if (lazy) {
              // Everything that gets mapped must exist: a mapping past the end of the file would
              // fault (SIGBUS) on first touch instead of failing here.
              await zeroPadding(h, h.pad, 'padding');
              await source.skip(h.payloadLength, truncated(h, 'memory data', source, h.payloadLength));
              if (payloadOffset(h) % PAGE_SIZE) throw corrupt('memory data is not page-aligned');
              applyChunk(h, map);
              if (!fromFile) await checked(h, memory.crc32cPages(map.gpa, map.pages, map.bitmap));
              else {
                fileRecords.push(h);
                fileBytes += h.payloadLength;
              }
            } else {
              await zeroPadding(h, h.pad, 'padding');
              // The bytes as they arrived (no joining), copied into the pages on the libuv pool; this
              // memory is no VM's yet and its chunks are disjoint, so each copy has its pages to itself.
              const data = await source.readPieces(h.payloadLength, truncated(h, 'memory data', source, h.payloadLength));
              await checked(h, memory.writePages(map.gpa, map.pages, map.bitmap, data, true));
              copiedBytes += h.payloadLength;
            }
          } else if (h.payloadCrc !== 0) {
            throw mismatch(h);
          }
          await checkTail(h);
          pagesStored += stored;
          nextGpa += map.pages * PAGE_SIZE;
          map = undefined;
          opts.onProgress?.(nextGpa, memoryBytes, source.position);
          break;
        }
        case RecordKind.End: {
          let end: SnapshotEnd;
          const payload = await readPayload(h);
          try {
            end = JSON.parse(payload.toString('utf8')) as SnapshotEnd;
          } catch {
            throw corrupt('END is not valid JSON');
          }
          if (end.records !== h.seq) throw corrupt(`END counts ${end.records} chunks before it, the snapshot has ${h.seq}`);
          if (nextGpa !== memoryBytes) throw corrupt(`memory ends at ${hex(nextGpa)}, the VM has ${hex(memoryBytes)} bytes`);
          if (end.pagesStored !== pagesStored || end.memoryPages !== memoryBytes / PAGE_SIZE) throw corrupt('END page counts do not match the memory chunks');
          for (const v of header.vcpus) {
            const have = vcpuState.get(v.id) as Map<string, Buffer>;
            for (const s of v.sections) if (!have.has(s.name)) throw corrupt(`vCPU ${v.id} section ${s.name} is missing`);
            if (v.nestedSize && !have.has('nested')) throw corrupt(`vCPU ${v.id} nested state is missing`);
          }
          for (const s of header.vmState ?? []) if (!vmState.has(s.name)) throw corrupt(`VM state ${s.name} is missing`);
          await firstMismatch(pendingCrcs.length);
          if (source instanceof StreamSource && !(await source.atEnd())) throw corrupt('bytes follow the END record');
          if (source instanceof FileSource && source.position !== source.size) throw corrupt(`${source.size - source.position} bytes follow the END record`);
          checkFileRecords();
          if (plan && !opts.asAncestor) {
            plan.apply(writer);
            plan = undefined;
          }
          // Settled only when all are (they read the caller's descriptor); a broken ancestor is the
          // fault reported first, as when the chain is read in order.
          const verified = Promise.allSettled([base?.verified, fileCrcs]).then((results) => {
            const failed = results.find((r) => r.status === 'rejected');
            if (failed) throw (failed as PromiseRejectedResult).reason;
          });
          verified.catch(() => {}); // awaited by loadSnapshot
          const identity = { snapshotId: header.snapshotId ?? '', headerCrc: first.payloadCrc, endCrc: h.payloadCrc };
          return {
            header,
            end,
            vcpuState,
            vmState,
            memory,
            mappedBytes: writer.mappedBytes + (base?.mappedBytes ?? 0),
            copiedBytes: copiedBytes + writer.copiedBytes + (base?.copiedBytes ?? 0),
            bytes: source.position + (base?.bytes ?? 0),
            identity,
            chainLength: (base?.chainLength ?? 0) + 1,
            verified,
            plan,
          };
        }
      }
    }
  } catch (e) {
    // Checksums still running keep the memory mapped until they finish (release is deferred). A
    // chunk before the failure that did not match is the first fault in the snapshot: it is reported.
    const settled = await Promise.allSettled(pendingCrcs.slice(settledCrcs));
    // They read the caller's descriptors (this file's, the ancestors'), closed after this returns;
    // a broken ancestor is the older fault.
    const [ancestors] = await Promise.allSettled([base?.verified, fileCrcs]);
    base?.plan?.settle();
    plan?.settle();
    memory.release();
    if (ancestors.status === 'rejected') throw ancestors.reason;
    const bad = settled.find((r) => r.status === 'fulfilled' && r.value);
    throw bad ? mismatch((bad as PromiseFulfilledResult<RecordHeader>).value) : e;
  }
}
