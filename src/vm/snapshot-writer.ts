/**
 * Writing a snapshot of a ManagedVm (the format is in snapshot-format.ts) to a sink: a file written
 * atomically (temporary file in the same directory, fsync, rename, fsync of the directory) or a
 * stream of byte chunks (CreateSnapshot to the caller, MigrateVm to another vcpud).
 *
 * The VM is held (no resume, no memory writes) and its vCPUs paused for the whole capture, so the
 * snapshot is one consistent point in time. vCPU state is read through readState/readNested, in
 * the save order vcpu-state.ts owns. Memory goes out in 4 MiB chunks, zero pages skipped, each
 * chunk checksummed on the libuv pool while it is written.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { notFound, VcpudError } from '../errors';
import type { HostCapabilities } from '../ffi/capabilities';
import type { NativeGuestMemory } from '../ffi/native';
import { SECTIONS, type SectionName } from '../ffi/sections';
import { packageVersion } from '../package';
import type { ManagedVm } from './managed-vm';
import { assertBackingIntact, backingFaultError } from './memory-backing';
import {
  align,
  bitmapBytes,
  CHUNK_PAGES,
  countBits,
  crc32c,
  encodeNamed,
  encodePreamble,
  encodeRecordHeader,
  FORMAT_VERSION,
  PAGE_SIZE,
  pagePad,
  RECORD_HEADER_SIZE,
  RecordKind,
  type SnapshotEnd,
  type SnapshotHeader,
  type SnapshotRunState,
  type SnapshotVcpu,
} from './snapshot-format';
import { readNested, readState, type StateContext } from './vcpu-state';

const fsync = promisify(fs.fsync);

// ---------------------------------------------------------------------------------------------
// Sinks

export interface SnapshotSink {
  /** Bytes of the snapshot so far (the offset of the next byte). */
  readonly position: number;
  /** Appends bytes. */
  write(buf: Buffer): Promise<void>;
  /** Appends a MEMORY_DATA record of the pages `bitmap` selects from [offset, +pages). */
  writeMemoryData(seq: number, gpa: number, memory: NativeGuestMemory, offset: number, pages: number, bitmap: Buffer, stored: number): Promise<void>;
  /** Makes the snapshot durable and visible (file: fsync, rename, fsync the directory). */
  finish(): Promise<void>;
  /** Drops what was written (file: the temporary file is removed). Idempotent. */
  abort(): Promise<void>;
}

const TEMP_SUFFIX = '.vcpud-tmp';
/** `.NAME.PID.INSTANCE.RANDOM.vcpud-tmp`; files of versions before the instance token lack RANDOM. */
const TEMP_PATTERN = /^\..+\.(\d+)\.([0-9a-f]{8})(?:\.[0-9a-f]{8})?\.vcpud-tmp$/;

/**
 * This process's incarnation. A pid alone does not tell a crashed vcpud's files from ours: in a
 * container vcpud is PID 1 every time, so the pid of the one that crashed is ours again.
 */
const INSTANCE = randomBytes(4).toString('hex');
const STARTED_MS = performance.timeOrigin;

/** The temporary name a snapshot is written under before the rename: hidden, with our pid and instance. */
export function tempNameFor(finalPath: string): string {
  return path.join(path.dirname(finalPath), `.${path.basename(finalPath)}.${process.pid}.${INSTANCE}.${randomBytes(4).toString('hex')}${TEMP_SUFFIX}`);
}

/**
 * Removes temporary files left by vcpud processes that no longer exist (a crash mid-snapshot): those of
 * a dead pid, and those of an earlier incarnation with our pid (another instance token) not written
 * since we started. A live writer elsewhere keeps its file's mtime moving, so it is left alone.
 */
export function removeStaleTemps(dir: string): string[] {
  const removed: string[] = [];
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    const m = TEMP_PATTERN.exec(name);
    if (!m) continue;
    const pid = Number(m[1]);
    const file = path.join(dir, name);
    const stale = pid === process.pid ? m[2] !== INSTANCE && writtenBefore(file, STARTED_MS) : !processAlive(pid);
    if (!stale) continue;
    try {
      fs.unlinkSync(file);
      removed.push(name);
    } catch {
      // raced with another cleaner: fine
    }
  }
  return removed;
}

function writtenBefore(file: string, ms: number): boolean {
  try {
    return fs.statSync(file).mtimeMs < ms;
  } catch {
    return false;
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * A snapshot file written atomically: everything goes to a temporary file next to the final name;
 * finish() fsyncs it, renames it over the final name and fsyncs the directory. Until then the final
 * name shows the previous snapshot (or nothing); a crash leaves only the temporary file.
 */
export class AtomicFileSink implements SnapshotSink {
  private pos = 0;
  private fd: number;
  private done = false;
  readonly tempPath: string;

  constructor(readonly finalPath: string) {
    this.tempPath = tempNameFor(finalPath);
    const { O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_CLOEXEC } = fs.constants as Record<string, number>;
    this.fd = fs.openSync(this.tempPath, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | (O_CLOEXEC ?? 0), 0o600);
  }

  get position(): number {
    return this.pos;
  }

  async write(buf: Buffer): Promise<void> {
    writeAllSync(this.fd, buf, this.pos);
    this.pos += buf.length;
  }

  async writeMemoryData(seq: number, gpa: number, memory: NativeGuestMemory, offset: number, pages: number, bitmap: Buffer, stored: number): Promise<void> {
    const headerAt = this.pos;
    const pad = stored ? pagePad(headerAt) : 0;
    const dataAt = headerAt + RECORD_HEADER_SIZE + pad;
    // The data goes first, in large sequential writes straight from guest memory (the pages are
    // never copied into JS); its checksum comes back with it, then the header is written before it.
    const payloadCrc = stored ? await memory.writePagesToFd(offset, pages, bitmap, this.fd, dataAt) : 0;
    const header = encodeRecordHeader({ kind: RecordKind.MemoryData, seq, pad, payloadCrc, payloadLength: stored * PAGE_SIZE, aux: gpa, aux2: stored });
    writeAllSync(this.fd, header, headerAt);
    this.pos = dataAt + stored * PAGE_SIZE; // page-aligned, so 8-aligned; the padding is a hole (zeros)
  }

  async finish(): Promise<void> {
    await fsync(this.fd);
    fs.closeSync(this.fd);
    this.done = true;
    // A snapshot being replaced keeps a second (hidden, temporary-named) link until after the
    // rename, so the rename does not free its blocks inline (hundreds of ms for a large file);
    // the unlink afterwards runs on the pool. A crash in between leaves only that hidden link,
    // which removeStaleTemps cleans up.
    let previous: string | undefined = tempNameFor(this.finalPath);
    try {
      fs.linkSync(this.finalPath, previous);
    } catch {
      previous = undefined; // nothing to replace
    }
    fs.renameSync(this.tempPath, this.finalPath);
    fsyncDir(path.dirname(this.finalPath));
    if (previous) void fs.promises.unlink(previous).catch(() => {});
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    try {
      fs.closeSync(this.fd);
    } catch {
      // already closed
    }
    fs.rmSync(this.tempPath, { force: true });
  }
}

function writeAllSync(fd: number, buf: Buffer, position: number): void {
  let off = 0;
  while (off < buf.length) off += fs.writeSync(fd, buf, off, buf.length - off, position + off);
}

export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A snapshot as a stream of byte chunks handed to `emit` (which resolves when the consumer can take
 * more): small records are coalesced, memory data goes out in chunks of at most `maxChunk` bytes.
 */
export class StreamSink implements SnapshotSink {
  private pos = 0;
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(
    private readonly emit: (chunk: Buffer) => Promise<void>,
    private readonly maxChunk = 1024 * 1024,
  ) {}

  get position(): number {
    return this.pos;
  }

  async write(buf: Buffer): Promise<void> {
    this.pos += buf.length;
    this.pending.push(buf);
    this.pendingBytes += buf.length;
    if (this.pendingBytes >= this.maxChunk) await this.flush();
  }

  async writeMemoryData(seq: number, gpa: number, memory: NativeGuestMemory, offset: number, pages: number, bitmap: Buffer, stored: number): Promise<void> {
    const data = Buffer.allocUnsafe(stored * PAGE_SIZE);
    const payloadCrc = stored ? await memory.copyPages(offset, pages, bitmap, data) : 0;
    const pad = stored ? pagePad(this.pos) : 0;
    await this.write(Buffer.concat([encodeRecordHeader({ kind: RecordKind.MemoryData, seq, pad, payloadCrc, payloadLength: data.length, aux: gpa, aux2: stored }), Buffer.alloc(pad)]));
    await this.flush();
    for (let off = 0; off < data.length; off += this.maxChunk) await this.emit(data.subarray(off, Math.min(data.length, off + this.maxChunk)));
    this.pos += data.length;
  }

  async flush(): Promise<void> {
    if (!this.pendingBytes) return;
    const chunk = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    for (let off = 0; off < chunk.length; off += this.maxChunk) await this.emit(chunk.subarray(off, Math.min(chunk.length, off + this.maxChunk)));
  }

  async finish(): Promise<void> {
    await this.flush();
  }

  async abort(): Promise<void> {
    this.pending = [];
    this.pendingBytes = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Holding the VM

export interface HeldVm {
  /** vCPUs that were running when the hold began (paused now). */
  wasRunning: number[];
  /** Run states before the pause. */
  before: { id: number; state: SnapshotRunState; reason?: string }[];
  /** Resumes the vCPUs that were running (the hold stays). */
  resume(): Promise<void>;
  /** Ends the hold: run control and memory writes work again. */
  release(): void;
}

/** Holds the VM for `what` and pauses its running vCPUs; FAILED_PRECONDITION if already held. */
export async function holdAndPause(vm: ManagedVm, what: string): Promise<HeldVm> {
  const release = vm.hold(what);
  try {
    const before = vm.statuses().map((s) => ({ id: s.id, state: s.state as SnapshotRunState, reason: s.reason }));
    const wasRunning = before.filter((s) => s.state === 'running').map((s) => s.id);
    await vm.pauseAll();
    vm.assertAlive(); // deleted while its vCPUs paused
    return {
      wasRunning,
      before,
      resume: async () => {
        if (vm.isDestroyed) return;
        await Promise.all(wasRunning.map((id) => vm.vcpus[id].resumeHeld()));
      },
      release,
    };
  } catch (e) {
    release();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Capture

export interface SnapshotProgress {
  phase: 'state' | 'memory' | 'sync' | 'done';
  memoryBytesDone: number;
  memoryBytesTotal: number;
  /** Snapshot bytes produced so far. */
  bytesWritten: number;
}

export interface CaptureOptions {
  caps: HostCapabilities;
  /** Run states before the hold (holdAndPause's `before`); the VM must be held and paused. */
  runStates: HeldVm['before'];
  onProgress?: (p: SnapshotProgress) => void;
  /** Checked between chunks: a cancelled call stops the capture. */
  cancelled?: () => boolean;
}

export interface CaptureResult {
  header: SnapshotHeader;
  end: SnapshotEnd;
  bytes: number;
  durationMs: number;
}

/** Host facts for the header (and the compatibility check of a restore on this host). */
export function sourceHost(caps: HostCapabilities): SnapshotHeader['source'] {
  return {
    hostname: os.hostname(),
    kernelRelease: caps.kernelRelease,
    kvmModule: caps.kvmModule,
    vendor: caps.vendor,
    kvmApiVersion: caps.apiVersion,
    nestedMaxSize: caps.nested.maxSize,
    xsaveSize: caps.xsaveSize,
    maxPhysAddrBits: caps.maxPhysAddrBits,
    msrIndexList: caps.msrIndexList,
    caps: caps.caps,
  };
}

interface CapturedVcpu {
  meta: SnapshotVcpu;
  records: [string, Buffer][];
}

/**
 * Writes a snapshot of `vm`, which the caller holds paused (holdAndPause), to `sink`, and finishes
 * the sink. On failure the sink is aborted and the error rethrown.
 */
export async function captureSnapshot(vm: ManagedVm, sink: SnapshotSink, opts: CaptureOptions): Promise<CaptureResult> {
  const started = process.hrtime.bigint();
  const held = vm.heldBy();
  if (!held) throw new VcpudError('internal', 'captureSnapshot needs the VM held and paused');
  const { caps } = opts;
  const ctx: StateContext = { caps, irqchip: vm.vm.hasIrqchip };
  const memoryTotal = vm.memoryBytes;
  const progress = (phase: SnapshotProgress['phase'], memoryBytesDone: number) =>
    opts.onProgress?.({ phase, memoryBytesDone, memoryBytesTotal: memoryTotal, bytesWritten: sink.position });
  const checkCancel = () => {
    if (opts.cancelled?.()) throw new VcpudError('unavailable', 'the snapshot was cancelled by the caller');
    if (vm.isDestroyed) throw notFound(`VM ${vm.id} was deleted during the snapshot`, 'VM_NOT_FOUND', 'vm_id');
  };
  try {
    progress('state', 0);
    // vCPU state, in the save order (readState), nested state after the sections.
    const vcpus: CapturedVcpu[] = [];
    for (const v of vm.vcpus) {
      const captured = await v.withState(() => {
        const r = readState(v.vcpu, ctx, []);
        const records: [string, Buffer][] = [];
        const sections: { name: SectionName; size: number }[] = [];
        for (const [name, value] of Object.entries(r.values) as [SectionName, unknown][]) {
          const bytes = (SECTIONS[name] as { encode(v: unknown): Buffer }).encode(value);
          records.push([name, bytes]);
          sections.push({ name, size: bytes.length });
        }
        let nestedSize = 0;
        if (caps.nested.maxSize > 0) {
          const blob = readNested(v.vcpu, caps);
          records.push(['nested', blob]);
          nestedSize = blob.length;
        }
        const before = opts.runStates.find((s) => s.id === v.id);
        const meta: SnapshotVcpu = {
          id: v.id,
          runState: before?.state ?? 'paused',
          ...(before?.reason ? { stopReason: before.reason } : {}),
          sections,
          nestedSize,
          msrsUnreadable: r.msrsUnreadable,
        };
        return { meta, records };
      });
      vcpus.push(captured);
    }
    // VM-wide state: the kvmclock base and the in-kernel PIC/IOAPIC.
    const vmState: [string, Buffer][] = [];
    if ((caps.caps.KVM_CAP_ADJUST_CLOCK ?? 0) > 0) vmState.push(['clock', vm.vm.getClock()]);
    if (vm.vm.hasIrqchip) for (const chip of [0, 1, 2]) vmState.push([`irqchip.${chip}`, vm.vm.getIrqchip(chip)]);

    const header: SnapshotHeader = {
      format: 'vcpud-snapshot',
      formatVersion: FORMAT_VERSION,
      createdAt: new Date().toISOString(),
      producer: { name: 'vcpud', version: packageVersion() },
      source: sourceHost(caps),
      vm: {
        id: vm.id,
        name: vm.name,
        memoryBytes: vm.memoryBytes,
        vcpuCount: vm.vcpus.length,
        irqchip: vm.vm.hasIrqchip,
        exposeNested: !!vm.spec.cpuidPolicy?.exposeNested,
        cpuid: vm.cpuid.map(({ function: fn, index, flags, eax, ebx, ecx, edx }) => ({ function: fn, index, flags, eax, ebx, ecx, edx })),
        memory: vm.vm.regions.map((r) => ({ slot: r.slot, guestPhysAddr: r.guestPhysAddr, size: r.size })),
      },
      vcpus: vcpus.map((v) => v.meta),
      vmState: vmState.map(([name, data]) => ({ name, size: data.length })),
      memoryLayout: { pageSize: PAGE_SIZE, chunkPages: CHUNK_PAGES },
    };

    let seq = 0;
    const record = async (kind: RecordKind, payload: Buffer, aux = 0, aux2 = 0) => {
      const header = encodeRecordHeader({ kind, seq: seq++, pad: 0, payloadCrc: crc32c(payload), payloadLength: payload.length, aux, aux2 });
      const tail = align(payload.length, 8) - payload.length;
      await sink.write(tail ? Buffer.concat([header, payload, Buffer.alloc(tail)]) : Buffer.concat([header, payload]));
    };

    await sink.write(encodePreamble());
    await record(RecordKind.Header, Buffer.from(JSON.stringify(header)));
    for (const v of vcpus) for (const [name, data] of v.records) await record(RecordKind.VcpuState, encodeNamed(name, data), v.meta.id);
    for (const [name, data] of vmState) await record(RecordKind.VmState, encodeNamed(name, data));

    let pagesStored = 0;
    let memoryPages = 0;
    let done = 0;
    // A snapshot file the memory maps (lazy restore) may have been changed under the VM: checked
    // before and after (a rewrite that does not fault), a page that faults fails the chunk.
    const { regions } = vm.vm;
    assertBackingIntact(regions, vm.id, 'snapshot');
    for (const region of regions) {
      const regionPages = region.size / PAGE_SIZE;
      for (let first = 0; first < regionPages; first += CHUNK_PAGES) {
        checkCancel();
        const pages = Math.min(CHUNK_PAGES, regionPages - first);
        const offset = first * PAGE_SIZE;
        const gpa = region.guestPhysAddr + offset;
        try {
          const bitmap = region.memory.scanPages(offset, pages);
          const stored = countBits(bitmap, pages);
          await record(RecordKind.MemoryMap, bitmap.subarray(0, bitmapBytes(pages)), gpa, pages);
          await sink.writeMemoryData(seq++, gpa, region.memory, offset, pages, bitmap, stored);
          pagesStored += stored;
        } catch (e) {
          throw backingFaultError(e, region, regions, vm.id, 'snapshot');
        }
        memoryPages += pages;
        done += pages * PAGE_SIZE;
        progress('memory', done);
      }
    }
    checkCancel(); // a VM deleted during the last await has no regions left to iterate: not a complete snapshot
    assertBackingIntact(regions, vm.id, 'snapshot');
    const end: SnapshotEnd = { records: seq, memoryPages, pagesStored };
    await record(RecordKind.End, Buffer.from(JSON.stringify(end)));
    progress('sync', done);
    await sink.finish();
    progress('done', done);
    return { header, end, bytes: sink.position, durationMs: Number(process.hrtime.bigint() - started) / 1e6 };
  } catch (e) {
    await sink.abort();
    throw e;
  }
}
