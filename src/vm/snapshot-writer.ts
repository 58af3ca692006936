/**
 * Writing a snapshot of a ManagedVm (the format is in snapshot-format.ts) to a sink: a file written
 * atomically (atomic-file.ts: temporary file in the same directory, fsync, rename or link, fsync of
 * the directory) or a stream of byte chunks (CreateSnapshot to the caller, MigrateVm to another vcpud).
 *
 * The VM is held (no resume, no memory writes) and its vCPUs paused for the whole capture, so the
 * snapshot is one consistent point in time. vCPU state is read through readStateBytes/readNested, in
 * the save order vcpu-state.ts owns. Memory goes out in 4 MiB chunks, zero pages skipped, each
 * chunk checksummed on the libuv pool while it is written.
 */
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import { notFound, VcpudError } from '../errors';
import type { HostCapabilities } from '../ffi/capabilities';
import type { NativeGuestMemory } from '../ffi/native';
import { cpuid2Size, SECTIONS, type SectionName } from '../ffi/sections';
import { packageVersion } from '../package';
import { AtomicFile, type AtomicTarget } from './atomic-file';
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
  KIND_NAMES,
  MAX_METADATA_PAYLOAD,
  PAGE_SIZE,
  pagePad,
  RECORD_HEADER_SIZE,
  RecordKind,
  type ParentLink,
  type SnapshotEnd,
  type SnapshotIdentity,
  type SnapshotHeader,
  type SnapshotRunState,
  type SnapshotVcpu,
} from './snapshot-format';
import { readNested, readStateBytes, type StateContext } from './vcpu-state';

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

/**
 * A snapshot file written through the one atomic writer (atomic-file.ts): a temporary file next to the
 * final name, fsynced and published by finish() (renamed over the final name with `replace`, else
 * linked there, which fails if the name exists).
 */
export class AtomicFileSink implements SnapshotSink {
  private pos = 0;

  private constructor(private readonly file: AtomicFile) {}

  /** Creates the temporary file in the target's directory. */
  static async create(target: AtomicTarget): Promise<AtomicFileSink> {
    return new AtomicFileSink(await AtomicFile.create(target));
  }

  get finalName(): string {
    return this.file.finalName;
  }

  get tempName(): string {
    return this.file.tempName;
  }

  get position(): number {
    return this.pos;
  }

  async write(buf: Buffer): Promise<void> {
    this.file.writeAt(buf, this.pos);
    this.pos += buf.length;
  }

  async writeMemoryData(seq: number, gpa: number, memory: NativeGuestMemory, offset: number, pages: number, bitmap: Buffer, stored: number): Promise<void> {
    const headerAt = this.pos;
    const pad = stored ? pagePad(headerAt) : 0;
    const dataAt = headerAt + RECORD_HEADER_SIZE + pad;
    // The data goes first, in large sequential writes straight from guest memory (the pages are
    // never copied into JS); its checksum comes back with it, then the header is written before it.
    const payloadCrc = stored ? await memory.writePagesToFd(offset, pages, bitmap, this.file.fd, dataAt) : 0;
    const header = encodeRecordHeader({ kind: RecordKind.MemoryData, seq, pad, payloadCrc, payloadLength: stored * PAGE_SIZE, aux: gpa, aux2: stored });
    this.file.writeAt(header, headerAt);
    this.pos = dataAt + stored * PAGE_SIZE; // page-aligned, so 8-aligned; the padding is a hole (zeros)
  }

  finish(): Promise<void> {
    return this.file.commit();
  }

  abort(): Promise<void> {
    return this.file.abort();
  }
}

/**
 * Where a StreamSink's chunks go: `chunk` holds the next bytes of the snapshot, and `framed` the same
 * bytes with `headroom` free bytes before them in one buffer, where the consumer may put its message
 * header and send both without copying the chunk. The chunk must be taken (queued, in order) before
 * emit returns; what the returned promise means depends on StreamSinkOptions.inFlight.
 */
export type ChunkEmitter = (chunk: Buffer, framed: Buffer) => Promise<void>;

export interface StreamSinkOptions {
  /** Largest chunk (default 1 MiB). */
  maxChunk?: number;
  /** Free bytes before every chunk in its buffer (default 0). */
  headroom?: number;
  /**
   * Unset: emit resolves when the consumer can take more, each chunk has a buffer of its own, and
   * one emit runs at a time. Set: emit resolves once the chunk's bytes have left (its buffer is then
   * reused), and up to this many emits run at once while the next pages are copied. Reusing the
   * buffers spares the garbage collector: at ~1 GiB/s, fresh 1 MiB buffers promoted to the old
   * generation while queued made it run dozens of full collections per GiB.
   */
  inFlight?: number;
}

/**
 * A snapshot as a stream of byte chunks handed to `emit`: small records are coalesced, memory data
 * goes out in chunks of at most `maxChunk` bytes, copied from guest memory straight into the buffers
 * that are sent (on the libuv pool, checksummed on the way).
 */
export class StreamSink implements SnapshotSink {
  private pos = 0;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private readonly maxChunk: number;
  private readonly headroom: number;
  private readonly inFlight: number;
  /** Emits not yet resolved, oldest first (inFlight mode). */
  private sending: Promise<void>[] = [];
  /** Full-size buffers whose chunks have left, for reuse (inFlight mode). */
  private free: Buffer[] = [];

  constructor(
    private readonly emit: ChunkEmitter,
    maxChunkOrOptions: number | StreamSinkOptions = {},
  ) {
    const o = typeof maxChunkOrOptions === 'number' ? { maxChunk: maxChunkOrOptions } : maxChunkOrOptions;
    this.maxChunk = o.maxChunk ?? 1024 * 1024;
    this.headroom = o.headroom ?? 0;
    this.inFlight = o.inFlight ?? 0;
  }

  get position(): number {
    return this.pos;
  }

  async write(buf: Buffer): Promise<void> {
    this.pos += buf.length;
    this.pending.push(buf);
    this.pendingBytes += buf.length;
    if (this.pendingBytes >= this.maxChunk) await this.flush();
  }

  /** `length` bytes in buffers of at most maxChunk bytes, each with the headroom before it. */
  private framedBuffers(length: number): { chunks: Buffer[]; framed: Buffer[] } {
    const chunks: Buffer[] = [];
    const framed: Buffer[] = [];
    const full = this.headroom + this.maxChunk;
    for (let off = 0; off < length; off += this.maxChunk) {
      const size = this.headroom + Math.min(this.maxChunk, length - off);
      const f = size === full && this.free.length ? (this.free.pop() as Buffer) : Buffer.allocUnsafe(size);
      framed.push(f);
      chunks.push(f.subarray(this.headroom));
    }
    return { chunks, framed };
  }

  private async send(chunk: Buffer, framed: Buffer): Promise<void> {
    if (!this.inFlight) return this.emit(chunk, framed);
    const sent = this.emit(chunk, framed).then(() => {
      if (framed.length === this.headroom + this.maxChunk) this.free.push(framed);
    });
    sent.catch(() => {}); // awaited below or by finish/abort
    this.sending.push(sent);
    if (this.sending.length >= this.inFlight) await this.sending.shift();
  }

  async writeMemoryData(seq: number, gpa: number, memory: NativeGuestMemory, offset: number, pages: number, bitmap: Buffer, stored: number): Promise<void> {
    const { chunks, framed } = this.framedBuffers(stored * PAGE_SIZE);
    // In inFlight mode the previous chunks are still being sent meanwhile.
    const payloadCrc = stored ? await memory.copyPages(offset, pages, bitmap, chunks) : 0;
    const pad = stored ? pagePad(this.pos) : 0;
    await this.write(
      Buffer.concat([
        encodeRecordHeader({ kind: RecordKind.MemoryData, seq, pad, payloadCrc, payloadLength: stored * PAGE_SIZE, aux: gpa, aux2: stored }),
        Buffer.alloc(pad),
      ]),
    );
    await this.flush();
    for (let i = 0; i < chunks.length; i++) await this.send(chunks[i], framed[i]);
    this.pos += stored * PAGE_SIZE;
  }

  async flush(): Promise<void> {
    if (!this.pendingBytes) return;
    const all = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    const { chunks, framed } = this.framedBuffers(all.length);
    for (let i = 0; i < chunks.length; i++) {
      all.copy(chunks[i], 0, i * this.maxChunk);
      await this.send(chunks[i], framed[i]);
    }
  }

  async finish(): Promise<void> {
    await this.flush();
    while (this.sending.length) await this.sending.shift();
  }

  async abort(): Promise<void> {
    this.pending = [];
    this.pendingBytes = 0;
    await Promise.allSettled(this.sending.splice(0));
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
    // Each state as its pause found it: one read here could see a GetState's implicit pause, which
    // GetState undoes before our pause runs (the vCPU then ran, was recorded paused, and stayed paused).
    const paused = await Promise.all(vm.vcpus.map((v) => v.pauseFrom()));
    vm.assertAlive(); // deleted while its vCPUs paused
    const before = paused.map(({ before: s }) => ({ id: s.id, state: s.state as SnapshotRunState, reason: s.reason }));
    const wasRunning = before.filter((s) => s.state === 'running').map((s) => s.id);
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
  /** Store only the pages dirtied since a parent (an incremental snapshot). */
  incremental?: IncrementalCapture;
}

export interface CaptureResult {
  header: SnapshotHeader;
  end: SnapshotEnd;
  identity: SnapshotIdentity;
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

/** The header describing `vm` with the given vCPU records and VM-state records. */
export function snapshotHeader(vm: ManagedVm, caps: HostCapabilities, vcpus: SnapshotVcpu[], vmState: SnapshotHeader['vmState']): SnapshotHeader {
  return {
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
    vcpus,
    vmState,
    memoryLayout: { pageSize: PAGE_SIZE, chunkPages: CHUNK_PAGES },
  };
}

export interface CapturedState {
  header: SnapshotHeader;
  /** Per vCPU, in id order: its records (section name or "nested", bytes). */
  vcpus: CapturedVcpu[];
  /** VM-wide records: the kvmclock base and the in-kernel PIC/IOAPIC. */
  vmState: [string, Buffer][];
}

/**
 * Reads every vCPU's state (every section in the save order, nested state after them) and the VM
 * state, and builds the snapshot header describing them. The VM must be held and its vCPUs paused;
 * `runStates` are the run states to record (those before the pause).
 */
export async function captureState(vm: ManagedVm, caps: HostCapabilities, runStates: HeldVm['before']): Promise<CapturedState> {
  const ctx: StateContext = { caps, irqchip: vm.vm.hasIrqchip };
  // vCPU state, in the save order (readStateBytes: one native call), nested state after the sections.
  const vcpus: CapturedVcpu[] = [];
  for (const v of vm.vcpus) {
    const captured = await v.withState(() => {
      const r = readStateBytes(v.vcpu, ctx, []);
      const records: [string, Buffer][] = [];
      const sections: { name: SectionName; size: number }[] = [];
      for (const [name, value] of Object.entries(r.values) as [SectionName, unknown][]) {
        const bytes = sectionRecord(name, value);
        records.push([name, bytes]);
        sections.push({ name, size: bytes.length });
      }
      let nestedSize = 0;
      if (v.vcpu.nestedStateMaxSize() > 0) {
        const blob = readNested(v.vcpu);
        records.push(['nested', blob]);
        nestedSize = blob.length;
      }
      const before = runStates.find((s) => s.id === v.id);
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

  const header = snapshotHeader(
    vm,
    caps,
    vcpus.map((v) => v.meta),
    vmState.map(([name, data]) => ({ name, size: data.length })),
  );
  return { header, vcpus, vmState };
}

/**
 * A section's record: the bytes its ioctl exchanges, which is what the section's codec encodes. A
 * bytes read (readStateBytes) has them already for the structs, xsave, lapic and a complete msrs read
 * (cpuid2's list up to its nent); the rest are encoded. Decoding and re-encoding them cost a
 * migration's paused window ~0.3 ms per vCPU, reading section by section another ~0.7 (BENCHMARKS.md).
 */
export function sectionRecord(name: SectionName, value: unknown): Buffer {
  if (!Buffer.isBuffer(value)) return (SECTIONS[name] as { encode(v: unknown): Buffer }).encode(value);
  return name === 'cpuid2' ? value.subarray(0, cpuid2Size(value.readUInt32LE(0))) : value;
}

/** One record as the format lays it out: header, payload, zeros to the next 8-byte boundary. */
export function encodeRecord(kind: RecordKind, seq: number, payload: Buffer, aux = 0, aux2 = 0): Buffer {
  // Never write what no reader accepts (memory data has its own bound: one chunk).
  if (kind !== RecordKind.MemoryData && payload.length > MAX_METADATA_PAYLOAD)
    throw new VcpudError(
      'internal',
      `a ${KIND_NAMES[kind]} record of ${payload.length} bytes is over the ${MAX_METADATA_PAYLOAD} bytes a snapshot reader accepts`,
    );
  const header = encodeRecordHeader({ kind, seq, pad: 0, payloadCrc: crc32c(payload), payloadLength: payload.length, aux, aux2 });
  const tail = align(payload.length, 8) - payload.length;
  return Buffer.concat(tail ? [header, payload, Buffer.alloc(tail)] : [header, payload]);
}

/** What goes into a snapshot besides the header's own fields. */
export interface SnapshotContent {
  header: SnapshotHeader;
  /** Per vCPU, in id order: its id and records (section name or "nested", bytes). */
  vcpus: { id: number; records: [string, Buffer][] }[];
  vmState: [string, Buffer][];
  /** Guest memory, by slot. */
  regions: readonly { guestPhysAddr: number; size: number; memory: NativeGuestMemory }[];
  /** Incremental: per region, the pages to store (bit i = page i), zero or not; the others are the parent's. */
  dirty?: Buffer[];
}

export interface WriteOptions {
  onProgress?: (p: SnapshotProgress) => void;
  /** Runs between memory chunks (a cancelled call, a deleted VM): throw to stop. */
  checkpoint?: () => void;
  /** Turns an error of a memory chunk of `region` into the one to report. */
  memoryError?: (e: unknown, regionIndex: number) => unknown;
}

/**
 * Writes a snapshot of `content` to `sink` (the records in format order) and finishes the sink.
 * Memory goes out in CHUNK_PAGES chunks: a full snapshot stores the non-zero pages, an incremental
 * one the pages `content.dirty` selects. Resolves to the END record and the snapshot's identity.
 */
export async function writeSnapshot(
  sink: SnapshotSink,
  content: SnapshotContent,
  opts: WriteOptions = {},
): Promise<{ end: SnapshotEnd; identity: SnapshotIdentity }> {
  const memoryTotal = content.regions.reduce((n, r) => n + r.size, 0);
  const progress = (phase: SnapshotProgress['phase'], memoryBytesDone: number) =>
    opts.onProgress?.({ phase, memoryBytesDone, memoryBytesTotal: memoryTotal, bytesWritten: sink.position });
  let seq = 0;
  const record = (kind: RecordKind, payload: Buffer, aux = 0, aux2 = 0) => sink.write(encodeRecord(kind, seq++, payload, aux, aux2));

  const headerPayload = Buffer.from(JSON.stringify(content.header));
  await sink.write(encodePreamble());
  await record(RecordKind.Header, headerPayload);
  for (const v of content.vcpus) for (const [name, data] of v.records) await record(RecordKind.VcpuState, encodeNamed(name, data), v.id);
  for (const [name, data] of content.vmState) await record(RecordKind.VmState, encodeNamed(name, data));

  let pagesStored = 0;
  let memoryPages = 0;
  let done = 0;
  for (const [index, region] of content.regions.entries()) {
    const regionPages = region.size / PAGE_SIZE;
    for (let first = 0; first < regionPages; first += CHUNK_PAGES) {
      opts.checkpoint?.();
      const pages = Math.min(CHUNK_PAGES, regionPages - first);
      const offset = first * PAGE_SIZE;
      const gpa = region.guestPhysAddr + offset;
      try {
        // CHUNK_PAGES is a multiple of 8: a chunk's bits start on a byte of the region's bitmap.
        const bitmap = content.dirty
          ? Buffer.from(content.dirty[index].subarray(first / 8, first / 8 + bitmapBytes(pages)))
          : region.memory.scanPages(offset, pages);
        const stored = countBits(bitmap, pages);
        await record(RecordKind.MemoryMap, bitmap.subarray(0, bitmapBytes(pages)), gpa, pages);
        await sink.writeMemoryData(seq++, gpa, region.memory, offset, pages, bitmap, stored);
        pagesStored += stored;
      } catch (e) {
        throw opts.memoryError ? opts.memoryError(e, index) : e;
      }
      memoryPages += pages;
      done += pages * PAGE_SIZE;
      progress('memory', done);
    }
  }
  opts.checkpoint?.();
  const end: SnapshotEnd = { records: seq, memoryPages, pagesStored };
  const endPayload = Buffer.from(JSON.stringify(end));
  await record(RecordKind.End, endPayload);
  progress('sync', done);
  await sink.finish();
  progress('done', done);
  return { end, identity: { snapshotId: content.header.snapshotId ?? '', headerCrc: crc32c(headerPayload), endCrc: crc32c(endPayload) } };
}

/** An incremental capture: the parent and the pages dirtied since it (per region). */
export interface IncrementalCapture {
  parent: ParentLink;
  parentDepth: number;
  dirty: Buffer[];
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
  const checkCancel = () => {
    if (opts.cancelled?.()) throw new VcpudError('unavailable', 'the snapshot was cancelled by the caller');
    if (vm.isDestroyed) throw notFound(`VM ${vm.id} was deleted during the snapshot`, 'VM_NOT_FOUND', 'vm_id');
  };
  try {
    opts.onProgress?.({ phase: 'state', memoryBytesDone: 0, memoryBytesTotal: vm.memoryBytes, bytesWritten: sink.position });
    const { header, vcpus, vmState } = await captureState(vm, caps, opts.runStates);
    const inc = opts.incremental;
    Object.assign(header, { snapshotId: randomUUID(), chainDepth: inc ? inc.parentDepth + 1 : 0 }, inc ? { parent: inc.parent } : {});
    // A snapshot file the memory maps (lazy restore) may have been changed under the VM: checked
    // before and after (a rewrite that does not fault), a page that faults fails the chunk.
    const { regions } = vm.vm;
    assertBackingIntact(regions, vm.id, 'snapshot');
    const { end, identity } = await writeSnapshot(
      sink,
      { header, vcpus: vcpus.map((v) => ({ id: v.meta.id, records: v.records })), vmState, regions, dirty: inc?.dirty },
      {
        onProgress: opts.onProgress,
        // a VM deleted during the last await has no regions left to iterate: not a complete snapshot
        checkpoint: () => {
          checkCancel();
          assertBackingIntact(regions, vm.id, 'snapshot');
        },
        memoryError: (e, i) => backingFaultError(e, regions[i], regions, vm.id, 'snapshot'),
      },
    );
    return { header, end, identity, bytes: sink.position, durationMs: Number(process.hrtime.bigint() - started) / 1e6 };
  } catch (e) {
    await sink.abort();
    throw e;
  }
}
