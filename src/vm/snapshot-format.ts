/**
 * The vcpud snapshot format, version 2 (version 1 is still read): one byte sequence that is both the file under the snapshot
 * directory and what CreateSnapshot streams, RestoreSnapshotStream accepts and MigrateVm sends.
 *
 *   preamble   16 bytes: "VCPUDSNP", u32 format version, u32 CRC-32C of the 12 bytes before it
 *   records    each a 48-byte header, `pad` zero bytes, the payload, zero padding to 8 bytes
 *
 * Record header (little endian):
 *    0 u32 magic "VREC"          4 u16 kind            6 u16 pad (zero bytes before the payload)
 *    8 u32 seq (the chunk number: 0, 1, 2, ... without gaps)     12 u32 CRC-32C of the payload
 *   16 u64 payload length       24 u64 aux            32 u64 aux2
 *   40 u32 reserved (0)         44 u32 CRC-32C of bytes 0..43
 *
 * Records, in this order:
 *   HEADER       (seq 0) JSON SnapshotHeader: format version, the source host's facts (vendor, KVM
 *                API version, nested-state max size, xsave size, MSR index list, capabilities), the
 *                VM (memory, vCPU count, irqchip, the CPUID its vCPUs were given), every vCPU's
 *                saved sections, the memory layout
 *   VCPU_STATE   one per vCPU and section: aux = vCPU id; payload = name (24 bytes, NUL-padded) and
 *                the bytes the section's KVM_GET ioctl produced (the section codec's encoding);
 *                "nested" is the KVM_GET_NESTED_STATE blob
 *   VM_STATE     same shape, aux = 0: "clock" (kvm_clock_data), "irqchip.0/1/2" (kvm_irqchip)
 *   MEMORY_MAP   per 4 MiB of guest memory (CHUNK_PAGES pages): aux = guest-physical address,
 *                aux2 = pages; payload = bitmap, bit i (LSB first) set when page i is stored
 *   MEMORY_DATA  follows its map: aux = guest-physical address, aux2 = pages stored; payload = those
 *                pages in address order, starting at a 4096-aligned offset (pad), so a restore can
 *                map them straight from the file. Zero pages are not stored.
 *   END          JSON SnapshotEnd: record and page counts. A snapshot without it is truncated.
 *
 * Every payload is checksummed on its own; a reader names the chunk (record) at fault.
 *
 * Version 2 adds incremental snapshots, all in the header (the records are version 1's):
 *   snapshotId   a UUID given at capture (a merge keeps it)
 *   parent       absent for a full snapshot; for an incremental one its parent's name under the
 *                snapshot directory and its identity (snapshotId and the payload CRCs of its HEADER
 *                and END records), so a parent replaced or rewritten under the same name is detected
 *   chainDepth   0 for a full snapshot, the parent's + 1 for an incremental one
 *   mergedFrom   a merged (full) snapshot: the identity of the incremental snapshot it replaced, which
 *                links of that snapshot's children still name
 * In an incremental snapshot a MEMORY_MAP bit that is clear means "the parent's page", not "zero":
 * every page dirtied since the parent is stored, zero or not.
 */
import { VcpudError } from '../errors';
import { native } from '../ffi/native';
import type { CpuidEntry2, SectionName } from '../ffi/sections';

export const SNAPSHOT_MAGIC = Buffer.from('VCPUDSNP', 'latin1');
export const FORMAT_VERSION = 2;
/** Versions this vcpud reads. */
export const READABLE_VERSIONS = [1, 2];
/** Links from an incremental snapshot down to its full ancestor, at most (merge a longer chain first). */
export const MAX_CHAIN_DEPTH = 64;
export const PREAMBLE_SIZE = 16;
export const RECORD_HEADER_SIZE = 48;
export const RECORD_MAGIC = 0x43455256; // "VREC" little endian
export const PAGE_SIZE = 4096;
/** Guest memory per MEMORY_MAP/MEMORY_DATA pair: 4 MiB. */
export const CHUNK_PAGES = 1024;
export const NAME_SIZE = 24;
/** Largest non-memory payload a reader accepts (the header with a 256-entry CPUID is ~20 KiB). */
export const MAX_METADATA_PAYLOAD = 16 * 1024 * 1024;

export enum RecordKind {
  Header = 1,
  VcpuState = 2,
  VmState = 3,
  MemoryMap = 4,
  MemoryData = 5,
  End = 6,
}

export const KIND_NAMES: Record<RecordKind, string> = {
  [RecordKind.Header]: 'header',
  [RecordKind.VcpuState]: 'vcpu state',
  [RecordKind.VmState]: 'vm state',
  [RecordKind.MemoryMap]: 'memory map',
  [RecordKind.MemoryData]: 'memory data',
  [RecordKind.End]: 'end',
};

export const kindName = (k: number): string => KIND_NAMES[k as RecordKind] ?? `unknown kind ${k}`;

/** CRC-32C (Castagnoli) of `buf`, continuing `seed`. */
export const crc32c = (buf: Buffer, seed = 0): number => native.crc32c(buf, seed);

// ---------------------------------------------------------------------------------------------
// The header

/** What the source host was: what a restore checks for compatibility. */
export interface SourceHost {
  hostname: string;
  kernelRelease: string;
  kvmModule: string;
  vendor: string;
  kvmApiVersion: number;
  /** KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE): 0 without nested support. */
  nestedMaxSize: number;
  xsaveSize: number;
  maxPhysAddrBits: number;
  /** KVM_GET_MSR_INDEX_LIST. */
  msrIndexList: number[];
  /** KVM_CAP_* values the source reported. */
  caps: Record<string, number>;
}

export type SnapshotRunState = 'created' | 'running' | 'paused' | 'halted' | 'stopped';

export interface SnapshotVcpu {
  id: number;
  /** Run state when the snapshot began (the VM was paused for it). */
  runState: SnapshotRunState;
  stopReason?: string;
  /** The sections stored, in save order, with their byte sizes. */
  sections: { name: SectionName; size: number }[];
  /** Size of the nested-state blob; 0 when none was saved. */
  nestedSize: number;
  /** MSRs of the source's index list that KVM_GET_MSRS refused (not saved). */
  msrsUnreadable: number[];
}

export interface SnapshotHeader {
  format: 'vcpud-snapshot';
  formatVersion: number;
  createdAt: string;
  producer: { name: 'vcpud'; version: string };
  source: SourceHost;
  vm: {
    id: string;
    name: string;
    memoryBytes: number;
    vcpuCount: number;
    irqchip: boolean;
    exposeNested: boolean;
    /** The CPUID every vCPU was given (KVM_SET_CPUID2). */
    cpuid: CpuidEntry2[];
    /** Guest memory slots; vcpud VMs have one at guest-physical address 0. */
    memory: { slot: number; guestPhysAddr: number; size: number }[];
  };
  vcpus: SnapshotVcpu[];
  /** VM_STATE records present, by name. */
  vmState: { name: string; size: number }[];
  memoryLayout: { pageSize: number; chunkPages: number };
  /** Version 2: this snapshot's id (a merge keeps it). */
  snapshotId?: string;
  /** Version 2, incremental snapshots: the parent (its name and identity). */
  parent?: ParentLink;
  /** Version 2: 0 for a full snapshot, the parent's + 1 otherwise. */
  chainDepth?: number;
  /** Version 2, a merged snapshot: the identity of the incremental snapshot it replaced. */
  mergedFrom?: SnapshotIdentity;
}

/** What identifies one snapshot's contents: a different file under the same name has another. */
export interface SnapshotIdentity {
  snapshotId: string;
  /** Payload CRC-32C of the HEADER and END records (END counts the records and pages). */
  headerCrc: number;
  endCrc: number;
}

export interface ParentLink extends SnapshotIdentity {
  /** The parent's name under the snapshot directory. */
  name: string;
}

export const sameIdentity = (a: SnapshotIdentity | undefined, b: SnapshotIdentity | undefined): boolean =>
  !!a && !!b && a.snapshotId === b.snapshotId && a.headerCrc === b.headerCrc && a.endCrc === b.endCrc;

/** Whether snapshot `h` (identity `id`) is the one `link` names: itself, or the merge that replaced it. */
export const satisfiesLink = (h: SnapshotHeader, id: SnapshotIdentity, link: SnapshotIdentity): boolean =>
  sameIdentity(id, link) || sameIdentity(h.mergedFrom, link);

export interface SnapshotEnd {
  /** Records before END (END itself is record number `records`). */
  records: number;
  memoryPages: number;
  pagesStored: number;
}

// ---------------------------------------------------------------------------------------------
// Errors

/** A corrupt or truncated snapshot: DATA_LOSS naming the chunk and where it is. */
export function snapshotCorrupt(message: string, chunk?: number, offset?: number): VcpudError {
  return new VcpudError('data_loss', message, {
    reason: 'SNAPSHOT_CORRUPT',
    ...(chunk !== undefined ? { chunk: String(chunk) } : {}),
    ...(offset !== undefined ? { offset: `0x${offset.toString(16)}` } : {}),
  });
}

/** Not a snapshot at all, or a newer format: the caller gave the wrong bytes. */
export function notASnapshot(message: string): VcpudError {
  return new VcpudError('invalid_argument', message, {
    violations: [{ rule: 'snapshot.format', field: 'snapshot', message }],
  });
}

export const hex = (n: number | bigint): string => `0x${n.toString(16)}`;

/** "chunk 7 (memory data, guest-physical 0x1000000, offset 0x1003000)" */
export function describeChunk(h: Pick<RecordHeader, 'seq' | 'kind' | 'aux' | 'offset'>): string {
  const where =
    h.kind === RecordKind.MemoryMap || h.kind === RecordKind.MemoryData
      ? `, guest-physical ${hex(h.aux)}`
      : h.kind === RecordKind.VcpuState
        ? `, vCPU ${h.aux}`
        : '';
  return `chunk ${h.seq} (${kindName(h.kind)}${where}, offset ${hex(h.offset)})`;
}

// ---------------------------------------------------------------------------------------------
// Preamble

export function encodePreamble(version = FORMAT_VERSION): Buffer {
  const b = Buffer.alloc(PREAMBLE_SIZE);
  SNAPSHOT_MAGIC.copy(b, 0);
  b.writeUInt32LE(version, 8);
  b.writeUInt32LE(crc32c(b.subarray(0, 12)), 12);
  return b;
}

/** Checks magic, version and checksum; returns the version. */
export function decodePreamble(b: Buffer): number {
  if (b.length < PREAMBLE_SIZE)
    throw snapshotCorrupt(`truncated: the snapshot is ${b.length} bytes, shorter than its ${PREAMBLE_SIZE}-byte preamble`, undefined, 0);
  if (!b.subarray(0, 8).equals(SNAPSHOT_MAGIC))
    throw notASnapshot(`not a vcpud snapshot: it starts with ${JSON.stringify(b.subarray(0, 8).toString('latin1'))}, not "VCPUDSNP"`);
  if (b.readUInt32LE(12) !== crc32c(b.subarray(0, 12))) throw snapshotCorrupt('checksum mismatch in the preamble (offset 0x0)', undefined, 0);
  const version = b.readUInt32LE(8);
  if (!READABLE_VERSIONS.includes(version))
    throw new VcpudError(
      'failed_precondition',
      `snapshot format version ${version} is not supported: this vcpud reads versions ${READABLE_VERSIONS.join(' and ')}`,
      {
        reason: 'SNAPSHOT_INCOMPATIBLE',
        violations: [
          { rule: 'snapshot.format_version', field: 'format_version', message: `version ${version}, this vcpud reads ${READABLE_VERSIONS.join(' and ')}` },
        ],
      },
    );
  return version;
}

// ---------------------------------------------------------------------------------------------
// Records

export interface RecordHeader {
  kind: RecordKind;
  seq: number;
  pad: number;
  payloadCrc: number;
  payloadLength: number;
  aux: number;
  aux2: number;
  /** Byte offset of the header in the snapshot. */
  offset: number;
}

export function encodeRecordHeader(h: Omit<RecordHeader, 'offset'>): Buffer {
  const b = Buffer.alloc(RECORD_HEADER_SIZE);
  b.writeUInt32LE(RECORD_MAGIC, 0);
  b.writeUInt16LE(h.kind, 4);
  b.writeUInt16LE(h.pad, 6);
  b.writeUInt32LE(h.seq, 8);
  b.writeUInt32LE(h.payloadCrc >>> 0, 12);
  b.writeBigUInt64LE(BigInt(h.payloadLength), 16);
  b.writeBigUInt64LE(BigInt(h.aux), 24);
  b.writeBigUInt64LE(BigInt(h.aux2), 32);
  b.writeUInt32LE(crc32c(b.subarray(0, 44)), 44);
  return b;
}

/** Decodes and checks a record header read at `offset`: magic, its own checksum, the chunk number. */
export function decodeRecordHeader(b: Buffer, offset: number, expectedSeq: number): RecordHeader {
  const where = `chunk ${expectedSeq} header (offset ${hex(offset)})`;
  if (b.readUInt32LE(44) !== crc32c(b.subarray(0, 44))) throw snapshotCorrupt(`checksum mismatch in ${where}`, expectedSeq, offset);
  if (b.readUInt32LE(0) !== RECORD_MAGIC) throw snapshotCorrupt(`bad record magic in ${where}`, expectedSeq, offset);
  const big = (at: number, what: string) => {
    const v = b.readBigUInt64LE(at);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw snapshotCorrupt(`${what} ${v} out of range in ${where}`, expectedSeq, offset);
    return Number(v);
  };
  const h: RecordHeader = {
    kind: b.readUInt16LE(4),
    pad: b.readUInt16LE(6),
    seq: b.readUInt32LE(8),
    payloadCrc: b.readUInt32LE(12),
    payloadLength: big(16, 'payload length'),
    aux: big(24, 'aux'),
    aux2: big(32, 'aux2'),
    offset,
  };
  if (h.seq !== expectedSeq) throw snapshotCorrupt(`${where} carries chunk number ${h.seq}: a chunk is missing or repeated`, expectedSeq, offset);
  if (!KIND_NAMES[h.kind]) throw snapshotCorrupt(`${where} has unknown kind ${h.kind}`, expectedSeq, offset);
  if (h.pad >= PAGE_SIZE) throw snapshotCorrupt(`${where} has padding ${h.pad}`, expectedSeq, offset);
  return h;
}

/** Where the payload of a record whose header starts at `offset` begins. */
export const payloadOffset = (h: Pick<RecordHeader, 'offset' | 'pad'>): number => h.offset + RECORD_HEADER_SIZE + h.pad;
/** Where the record after it starts. */
export const nextRecordOffset = (h: Pick<RecordHeader, 'offset' | 'pad' | 'payloadLength'>): number => align(payloadOffset(h) + h.payloadLength, 8);

export const align = (n: number, to: number): number => Math.ceil(n / to) * to;

/** Padding that puts the payload of a record whose header starts at `offset` on a page boundary. */
export const pagePad = (offset: number): number => (PAGE_SIZE - ((offset + RECORD_HEADER_SIZE) % PAGE_SIZE)) % PAGE_SIZE;

// ---------------------------------------------------------------------------------------------
// Payloads

/** A named blob (VCPU_STATE, VM_STATE): 24-byte NUL-padded name, then the bytes. */
export function encodeNamed(name: string, data: Buffer): Buffer {
  if (Buffer.byteLength(name) >= NAME_SIZE) throw new VcpudError('internal', `record name ${name} too long`);
  const b = Buffer.alloc(NAME_SIZE + data.length);
  b.write(name, 0, 'latin1');
  data.copy(b, NAME_SIZE);
  return b;
}

export function decodeNamed(payload: Buffer): { name: string; data: Buffer } {
  const end = payload.indexOf(0);
  return { name: payload.subarray(0, end < 0 || end > NAME_SIZE ? NAME_SIZE : end).toString('latin1'), data: payload.subarray(NAME_SIZE) };
}

export const bitmapBytes = (pages: number): number => Math.ceil(pages / 8);

/**
 * A bitmap's whole 32-bit words as a view (bitmaps from Buffer.alloc start aligned), or undefined
 * when it does not start on a 4-byte boundary. Dirty bitmaps of big guests are scanned a word at a
 * time, skipping zero words: a byte loop over a 4 GiB guest's 128 KiB bitmap took 0.2-0.4 ms
 * warm (and milliseconds cold) inside the migration's paused window.
 */
export function bitmapWords(bitmap: Buffer): Uint32Array | undefined {
  return bitmap.byteOffset % 4 ? undefined : new Uint32Array(bitmap.buffer, bitmap.byteOffset, bitmap.length >> 2);
}

function popcount32(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return Math.imul((x + (x >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24;
}

/** Set bits among the first `pages` of a bitmap (bit i = page i); zero words skipped. */
export function countBits(bitmap: Buffer, pages: number): number {
  let n = 0;
  let i = 0;
  const whole = pages >> 3;
  const words = bitmapWords(bitmap.subarray(0, whole));
  if (words) {
    for (let w = 0; w < words.length; w++) if (words[w]) n += popcount32(words[w]);
    i = words.length * 4;
  }
  for (; i < whole; i++) for (let x = bitmap[i]; x; x &= x - 1) n++;
  if (pages & 7) for (let x = bitmap[whole] & ((1 << (pages & 7)) - 1); x; x &= x - 1) n++;
  return n;
}

/** Runs of consecutive set bits: [first page, page count]. */
export function bitmapRuns(bitmap: Buffer, pages: number): [number, number][] {
  const runs: [number, number][] = [];
  for (let i = 0; i < pages; i++) {
    if (!(bitmap[i >> 3] & (1 << (i & 7)))) continue;
    const last = runs[runs.length - 1];
    if (last && last[0] + last[1] === i) last[1]++;
    else runs.push([i, 1]);
  }
  return runs;
}
