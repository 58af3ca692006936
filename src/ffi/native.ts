/**
 * The native addon's surface, typed. Every ioctl function comes in two forms: `fn` runs on the
 * calling thread, `fnAsync` on the libuv pool and returns a Promise. Errors thrown by native code
 * are converted to KvmError by `kvmCall`.
 */
import path from 'node:path';
import { KvmError } from '../errors';
import { packageRoot } from '../package';
import { currentObserver } from './observe';

type Fd = number;
type BufferIoctl = (fd: Fd, buf: Buffer) => void;
type CountIoctl = (fd: Fd, buf: Buffer) => number;

/** native/wire_program.h's ops. */
export type WireOp = 'LIT' | 'U8' | 'U16' | 'U32' | 'BOOL' | 'U64' | 'BYTES' | 'REST' | 'BEGIN' | 'END' | 'LOOP' | 'INPUT' | 'MAP';

export interface NativeGuestMemory {
  readonly size: number;
  read(offset: number, buf: Buffer): void;
  write(offset: number, buf: Buffer): void;
  /** Unmaps (deferred while a page operation runs). */
  release(): void;
  /** Bitmap of the non-zero pages of [offset, +pages*4096): bit i (LSB first) for page i. */
  scanPages(offset: number, pages: number): Buffer;
  /**
   * Bitmap of the pages of [offset, +pages*4096) that may hold data: a clear bit is a page known zero
   * without reading it (never touched; a hole of the shared file), all bits set when that cannot be
   * known. Reads no guest memory, so it allocates nothing.
   */
  candidatePages(offset: number, pages: number): Buffer;
  /** CRC-32C of the pages the bitmap selects, in order (libuv pool). */
  crc32cPages(offset: number, pages: number, bitmap: Buffer): Promise<number>;
  /** pwrite of the selected pages packed from fileOffset on; resolves to their CRC-32C (libuv pool). */
  writePagesToFd(offset: number, pages: number, bitmap: Buffer, fd: number, fileOffset: number): Promise<number>;
  /** Copies the selected pages packed into `out`, filled in order (exactly their size in all); resolves to their CRC-32C. */
  copyPages(offset: number, pages: number, bitmap: Buffer, out: Buffer | Buffer[]): Promise<number>;
  /**
   * The reverse of copyPages: `data` into the selected pages; resolves to the CRC-32C of the bytes written.
   * `exclusive`: nothing else touches these pages while the call runs (memory being restored, no VM's
   * yet), so fresh anonymous pages are filled without being zeroed and faulted in first (userfaultfd).
   */
  writePages(offset: number, pages: number, bitmap: Buffer, data: Buffer | Buffer[], exclusive?: boolean): Promise<number>;
  /** MAP_PRIVATE | MAP_FIXED of the file over [offset, +length): all page-aligned. */
  mapFile(offset: number, length: number, fd: number, fileOffset: number): void;
  /** pread of the file into [offset, +length). */
  readFromFd(offset: number, length: number, fd: number, fileOffset: number): void;
  /**
   * Memory backed by a shared file only: writes the ranges mapFile replaced (copy-on-write, unseen
   * by the file) into the file at their own offsets; resolves to the bytes written (libuv pool).
   */
  persistMapped(): Promise<number>;
  /**
   * Starts (clearing what was recorded) or stops recording the pages vcpud itself writes: write,
   * readFromFd, mapFile and applyFrames mark them (KVM's dirty log sees only the guest's writes).
   */
  trackWrites(on: boolean): void;
  /** ORs the pages written since the last take into `out` (bit i = page i, >= pages/8 bytes) and clears them; atomic against concurrent writers. */
  takeWrittenPages(out: Buffer): void;
  /**
   * The pages whose latest copy arrived torn (a tearable page frame whose payload failed its CRC,
   * native/page_frames.h) and the lowest of them: they must arrive again before the memory is used.
   */
  tornPages(): { count: number; first?: number };
  /**
   * Ends a pass for the torn marks: answers the marks older than this pass (pages torn in an
   * earlier pass that this one did not carry again), then ages this pass's marks.
   */
  closeTornPass(): { count: number; first?: number };
  /**
   * Packs the pages set in `bitmap` (bit i = page i), from `fromPage` on, into page frames
   * (native/page_frames.h) filling `out` as far as whole frames fit; zero pages go as flags
   * without payload. libuv pool.
   */
  packPages(bitmap: Buffer, fromPage: number, out: Buffer, opts: PackOptions): Promise<PackResult>;
  /**
   * Verifies and applies the whole frames at the start of `buf`, stopping at an incomplete trailing
   * frame. A corrupt frame rejects with code 'EFRAME', `check`, `seq`, `offset` (ffi/page-frames.ts
   * applyFrames turns it into a data_loss VcpudError). libuv pool.
   */
  applyFrames(buf: Buffer): Promise<ApplyResult>;
  /**
   * packPages of [fromPage, opts.toPage) into `staging`, each fill written to the socket `fd` (a
   * duplicate the call owns) on the pool thread, until toPage or opts.maxBytes; having reached
   * toPage, with opts.end, the end frame. A write that
   * waits stallMs rejects ETIMEDOUT, opts.cancel[0] = 1 rejects ECANCELED; other errors with errno.
   * result.bytes = bytes written.
   */
  sendFrames(fd: number, bitmap: Buffer, fromPage: number, staging: Buffer, opts: SendFramesOptions): Promise<PackResult>;
  /**
   * Reads frames, first from `prefix` then from the socket `fd`, straight into guest memory up to
   * the end frame (each frame checked as applyFrames checks it; its CRC over the pages where they
   * landed). Rejects EFRAME as applyFrames, code 'EOF' when the peer closed, ETIMEDOUT / ECANCELED
   * as sendFrames. libuv pool.
   */
  receiveFrames(fd: number, prefix: Buffer, opts: StreamOptions): Promise<ReceiveResult>;
  /**
   * Faults in [offset, +length) for writing (MADV_POPULATE_WRITE in 64 MiB chunks, libuv pool):
   * commits the memory ahead of its use. Resolves to the bytes populated; rejects with errno, code,
   * syscall and `offset` (where it stopped); cancel[0] = 1 rejects ECANCELED between chunks.
   */
  populate(offset: number, length: number, cancel?: Buffer): Promise<number>;
  /** Each file mapFile mapped, as fstat sees it now and as it was when first mapped. */
  backingFiles(): BackingFileInfo[];
}

export interface PackOptions {
  /** seq of the first frame; the call's frames count up from it (result.frames of them). */
  seq: bigint | number;
  /** Pages per frame (default pageFrameFormat.defaultFramePages, at most maxFramePages). */
  framePages?: number;
}

export interface StreamOptions {
  /** A wait for the socket longer than this rejects ETIMEDOUT. */
  stallMs: number;
  /** Setting byte 0 to 1 makes the call reject ECANCELED within 50 ms. */
  cancel: Buffer;
}

export interface SendFramesOptions extends PackOptions, StreamOptions {
  /** Pages from here on are left for the next call (default: the memory's end). */
  toPage?: number;
  /** Returns (result.nextPage) once this many bytes are written (whole staging fills; default no limit). */
  maxBytes?: number;
  /** Writes the end frame once toPage is reached. */
  end?: boolean;
  /**
   * Hands the guest's pages to the socket by reference (vmsplice and splice through a pipe) instead
   * of copying them through `staging` (which then holds only frame headers and tables).
   */
  zeroCopy?: boolean;
  /** With zeroCopy, while the guest runs: the frames are marked tearable (native/page_frames.h). */
  tearable?: boolean;
}

/** What one receiveFrames call applied. */
export interface ReceiveResult extends Omit<ApplyResult, 'consumed'> {
  /** Bytes of the prefix that belonged to the stream (the rest follows the end frame). */
  prefixUsed: number;
  /** Bytes read from the socket. */
  bytes: number;
}

/** What one packPages call produced (ffi/page-frames.ts). */
export interface PackResult {
  /** Where the next call continues; the memory's page count when every selected page is packed. */
  nextPage: number;
  /** Bytes of `out` filled with whole frames. */
  bytes: number;
  pages: number;
  zeroPages: number;
  frames: number;
}

/** What one applyFrames call applied (ffi/page-frames.ts). */
export interface ApplyResult {
  /** Bytes of whole, verified, applied frames from the buffer's start; the rest is an incomplete frame. */
  consumed: number;
  pages: number;
  zeroPages: number;
  frames: number;
  /** seq of the last frame applied (absent when none was). */
  lastSeq?: bigint;
  /** Data pages of tearable frames whose payload failed its CRC: applied, and marked torn (tornPages). */
  tornPages: number;
}

/**
 * A file mapped under guest memory. Every access to the memory is guarded: one that hits a page the
 * file no longer has throws (or rejects with) an Error with code "MEMORY_FAULT" and `offset`.
 */
export interface BackingFileInfo {
  /** Where /proc says the open file is now (" (deleted)" appended once unlinked). */
  path: string;
  /** The file must be at least this long for every mapped page to exist. */
  mappedEnd: number;
  sizeAtMap: number;
  mtimeNsAtMap: bigint;
  size: number;
  mtimeNs: bigint;
  links: number;
}

export type RunStateName = 'created' | 'running' | 'paused' | 'halted' | 'stopped';

export interface RunnerEvent {
  kind: 'value' | 'done' | 'state';
  value?: number;
  state?: RunStateName;
}

export interface NativeVcpuRunner {
  /** Starts or continues KVM_RUN on the vCPU's own thread; false if already running or pausing. */
  resume(): boolean;
  /** Resolves once the vCPU is out of KVM_RUN with pending I/O completed. */
  pause(): Promise<void>;
  drain(): { console: Buffer; events: RunnerEvent[] };
  /** throttle: the percent set by setThrottle (0 = off); throttledMs: time slept for it so far. */
  status(): { state: RunStateName; reason?: string; details: Record<string, number>; throttle: number; throttledMs: number };
  /** status().state alone (no object built): for checks made on every state access. */
  state(): RunStateName;
  /**
   * Throttles the vCPU: of each `sliceMs` (default 10) it runs (100 - percent)% and sleeps the
   * rest, kicked out of KVM_RUN like a pause. percent 0..99; 0 turns it off. Takes effect from the
   * next slice; state (running, paused) is unchanged.
   */
  setThrottle(percent: number, sliceMs?: number): void;
  /** Exit counts by KVM_EXIT_* number. */
  exitCounts(): Record<string, number>;
  /** CREATED -> PAUSED without running (restored vCPUs); false in any other state. */
  markPaused(): boolean;
  destroy(): void;
}

interface SyncAndAsync {
  getApiVersion(fd: Fd): number;
  checkExtension(fd: Fd, cap: number): number;
  getVcpuMmapSize(fd: Fd): number;
  getMsrIndexList: BufferIoctl;
  getMsrFeatureIndexList: BufferIoctl;
  getSupportedCpuid: BufferIoctl;
  createVm(fd: Fd, type: number): number;
  createIrqchip(fd: Fd): void;
  createVcpu(fd: Fd, id: number): number;
  setTssAddr(fd: Fd, addr: number): void;
  enableCap: BufferIoctl;
  getClock: BufferIoctl;
  setClock: BufferIoctl;
  getIrqchip: BufferIoctl;
  setIrqchip: BufferIoctl;
  setUserMemoryRegion(fd: Fd, slot: number, flags: number, gpa: number | bigint, mem: NativeGuestMemory): void;
  /** KVM_GET_DIRTY_LOG of `slot` (backed by `mem`) into `bitmap` (one bit per page, whole u64 words). */
  getDirtyLog(fd: Fd, slot: number, mem: NativeGuestMemory, bitmap: Buffer): void;
  /** KVM_CLEAR_DIRTY_LOG of [firstPage, +numPages); `bitmap` is slot-wide (bit i = page i). */
  clearDirtyLog(fd: Fd, slot: number, mem: NativeGuestMemory, firstPage: number, numPages: number, bitmap: Buffer): void;
  getRegs: BufferIoctl;
  setRegs: BufferIoctl;
  getSregs: BufferIoctl;
  setSregs: BufferIoctl;
  getSregs2: BufferIoctl;
  setSregs2: BufferIoctl;
  getFpu: BufferIoctl;
  setFpu: BufferIoctl;
  getXsave: BufferIoctl;
  /** `xsaveSize`: the VM's KVM_CAP_XSAVE2 size, which the kernel reads/writes whatever the buffer holds. */
  getXsave2(fd: Fd, buf: Buffer, xsaveSize: number): void;
  setXsave(fd: Fd, buf: Buffer, xsaveSize: number): void;
  getXcrs: BufferIoctl;
  setXcrs: BufferIoctl;
  getMsrs: CountIoctl;
  setMsrs: CountIoctl;
  getLapic: BufferIoctl;
  setLapic: BufferIoctl;
  getVcpuEvents: BufferIoctl;
  setVcpuEvents: BufferIoctl;
  getDebugregs: BufferIoctl;
  setDebugregs: BufferIoctl;
  getMpState: BufferIoctl;
  setMpState: BufferIoctl;
  getCpuid2: BufferIoctl;
  setCpuid2: BufferIoctl;
  getTscKhz(fd: Fd): number;
  setTscKhz(fd: Fd, khz: number): void;
  /** `maxSize`: the VM's KVM_CAP_NESTED_STATE size (6.1 SVM writes that much into smaller buffers). */
  getNestedState(fd: Fd, buf: Buffer, maxSize: number): void;
  setNestedState: BufferIoctl;
}

export type IoctlName = keyof SyncAndAsync;
type AsyncTwins = {
  [K in IoctlName as `${K}Async`]: (...a: Parameters<SyncAndAsync[K]>) => Promise<ReturnType<SyncAndAsync[K]>>;
};

/** A batch's failing ioctl: its error, with the op's index in the batch. */
export type BatchFailure = Error & { batchIndex: number };

/** The buffers a batch fills kvm_sregs from: [sregs, sregs2, vcpu_events]. */
export type SregsDerivation = [sregs: Buffer, sregs2: Buffer, events: Buffer];

/** PreparedBatch's runs: see native/kvm_ioctls.cc. */
export interface NativePreparedBatch {
  /** Without dest: undefined. With it: the encoding's end, -1 (no room in dest), or -2 (a list read stopped short: not encoded). */
  run(fd: Fd, dest?: Buffer, pos?: number): BatchFailure | number | undefined;
}

export interface Native extends SyncAndAsync, AsyncTwins {
  openKvm(path: string): Fd;
  closeFd(fd: Fd): void;
  /** Anonymous memory, or with `fd` a MAP_SHARED mapping of that file (at least `size` bytes long). */
  GuestMemory: new (
    size: number,
    fd?: number,
  ) => NativeGuestMemory;
  VcpuRunner: new (vcpuFd: Fd, mmapSize: number, onEvent: () => void) => NativeVcpuRunner;
  /**
   * CRC-32C (Castagnoli) of `buf`, continuing `seed`; `software` forces the table-driven path. With
   * `copyInto`, the bytes are also copied into it as they are checksummed (the fused pass page frames
   * and snapshot streams use).
   */
  crc32c(buf: Buffer, seed?: number, software?: boolean, copyInto?: Buffer): number;
  /** SO_SNDBUF on the socket `fd` (capped by net.core.wmem_max); returns the size in effect (the kernel doubles what it grants). */
  setSendBuffer(fd: number, bytes: number): number;
  /**
   * CRC-32C of each (offset, length) range of the file, read through a read-only mapping on the
   * pool, by `threads` threads (default 1, at most 8); rejects with code MEMORY_FAULT when a range
   * lies past the file's end.
   */
  crc32cFileRanges(fd: number, ranges: Float64Array, threads?: number): Promise<Uint32Array>;
  caps: Record<string, number>;
  /** native/page_frames.h's constants. */
  pageFrameFormat: {
    magic: number;
    version: number;
    headerBytes: number;
    /** Per page: its table entry, its CRC (data pages), its payload (data pages). */
    tableEntryBytes: number;
    pageCrcBytes: number;
    pageBytes: number;
    maxFramePages: number;
    defaultFramePages: number;
    maxFrameBytes: number;
  };
  /** KVM_MEM_LOG_DIRTY_PAGES and the KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 bits. */
  dirtyLogFlags: { memLogDirtyPages: number; manualProtectEnable: number; initiallySet: number };
  apiVersion: number;
  sizes: Record<string, number>;
  /**
   * Runs the GET ioctls named by `ops` (indices into batchOps) on one vCPU fd in order, stopping at
   * the first failure, whose error (with batchIndex) it returns rather than throws. out[2i] is op i's
   * return value, out[2i+1] its duration in seconds. xsaveSize: the VM's KVM_CAP_XSAVE2 size for a
   * KVM_GET_XSAVE2 op (0 without one). derive: [sregs, sregs2, vcpu_events], kvm_sregs filled from the
   * other two after the ioctls (src/ffi/sregs-from-sregs2.ts).
   */
  getBatch(fd: Fd, ops: Uint8Array, args: (Buffer | undefined)[], out: Float64Array, xsaveSize: number, derive?: SregsDerivation): BatchFailure | undefined;
  /**
   * getBatch checked once for runs over the same buffers, which it holds; after a complete run it can
   * encode them with a wire program into the caller's buffer (native/kvm_ioctls.cc says what run returns).
   */
  PreparedBatch: new (
    ops: Uint8Array,
    args: (Buffer | undefined)[],
    out: Float64Array,
    xsaveSize: number,
    derive?: SregsDerivation,
    returnsTo?: (Buffer | undefined)[],
    program?: Uint32Array,
    inputs?: Buffer[],
  ) => NativePreparedBatch;
  /** The ioctl names getBatch can run, by op index. */
  batchOps: string[];
  /**
   * Runs a protobuf wire program (native/wire_program.h) over `inputs`, writing into `out` from `pos`: the
   * position after the bytes written, or -1 when `out` is too small. Throws RangeError for a read past
   * the input's end or a malformed program.
   */
  encodeWire(program: Uint32Array, inputs: Buffer[], out: Buffer, pos: number): number;
  /** The op codes of encodeWire's programs, and where a folded field tag starts in an op word. */
  wireOps: Record<WireOp | 'TAG_SHIFT', number>;
}

// A .node addon loads only through require (there is no ES import for it).
export const native: Native = require(path.join(packageRoot(), 'build', 'Release', 'vcpud_native.node'));

interface NativeErrorShape {
  errno?: number;
  code?: string;
  syscall?: string;
  required?: number;
  message: string;
}

/** Converts a native ioctl error into KvmError; passes other errors through. */
export function toKvmError(e: unknown): unknown {
  const n = e as NativeErrorShape;
  if (n && typeof n.errno === 'number' && typeof n.code === 'string' && typeof n.syscall === 'string') {
    return new KvmError(n.syscall, n.errno, n.code, n.message, n.required);
  }
  return e;
}

/**
 * While > 0, an E2BIG is the answer a size negotiation probes for (negotiate below), not a failure:
 * it is not counted as an ioctl error. Calls are synchronous, so a counter is enough.
 */
let probingSize = 0;

/**
 * Reports one finished ioctl to the observer, with its errno only when it really failed: not an
 * expected E2BIG, and not an error thrown before the ioctl was made (a buffer of the wrong length).
 * Returns the error to throw (converted to KvmError).
 */
function finish(ioctl: string, start: bigint, error?: unknown): unknown {
  const obs = currentObserver();
  const k = error === undefined ? undefined : toKvmError(error);
  const failed = k instanceof KvmError && !(probingSize > 0 && k.code === 'E2BIG') ? k.code : undefined;
  obs?.onIoctl(ioctl, Number(process.hrtime.bigint() - start) / 1e9, failed);
  return k;
}

const now = () => (currentObserver() ? process.hrtime.bigint() : 0n);

/** Runs a native ioctl, reporting it to the observer and converting its errors to KvmError. */
export function kvmCall<T>(ioctl: string, fn: () => T): T {
  const start = now();
  let r: T;
  try {
    r = fn();
  } catch (e) {
    throw finish(ioctl, start, e);
  }
  finish(ioctl, start);
  return r;
}

export async function kvmCallAsync<T>(ioctl: string, fn: () => Promise<T>): Promise<T> {
  const start = now();
  let r: T;
  try {
    r = await fn();
  } catch (e) {
    throw finish(ioctl, start, e);
  }
  finish(ioctl, start);
  return r;
}

/**
 * E2BIG size negotiation. `attempt(capacity)` runs the ioctl with that capacity. When the kernel
 * wrote the required size back we grow to it and retry once; when it did not (CPUID) we double,
 * up to `max`.
 */
export function negotiate<T>(ioctl: string, initial: number, max: number, attempt: (capacity: number) => T): T {
  let capacity = initial;
  for (;;) {
    const probing = capacity < max;
    let e: unknown;
    if (probing) probingSize++;
    try {
      return attempt(capacity);
    } catch (x) {
      e = x;
    } finally {
      if (probing) probingSize--;
    }
    if (!(e instanceof KvmError) || e.code !== 'E2BIG' || !probing) throw e;
    const next = e.required !== undefined && e.required > capacity ? e.required : Math.min(capacity * 2, max);
    currentObserver()?.onNegotiationRetry(ioctl);
    if (e.required !== undefined) return attempt(next);
    capacity = next;
  }
}
