/**
 * vCPU scope: one method per state ioctl, decoded into named fields, raw bytes for the sections
 * whose layout is versioned (xsave, lapic, nested state) so they round-trip exactly.
 *
 * These calls are synchronous and thin, like rust-vmm's kvm-ioctls: on a vCPU that is not inside
 * KVM_RUN each is a few microseconds, less than a hop to the thread pool would cost. The only way
 * they could block is a vCPU inside KVM_RUN (KVM holds the vCPU mutex), which src/vm rules out by
 * pausing first. Every ioctl also has a Promise twin in the addon (`fnAsync`) for callers that
 * cannot give that guarantee.
 */
import { KvmError, notFound, VcpudError } from '../errors';
import { LEGACY_XSAVE_SIZE, nestedStateMaxSize, requireNestedState, sectionGate, xsaveSize, type Direction } from './caps';
import { FdHandle } from './fd-handle';
import { kvmCall, native, toKvmError, type BatchFailure, type NativePreparedBatch, type NativeVcpuRunner } from './native';
import { currentObserver, type IoctlObserver } from './observe';
import {
  SECTIONS,
  type CpuidEntry2,
  type Debugregs,
  type Fpu,
  type MsrEntry,
  type Regs,
  type SectionName,
  type Sregs,
  type Sregs2,
  type VcpuEvents,
  type Xcrs,
} from './sections';
import { sregsAnsweredBySregs2 } from './sregs-from-sregs2';
import type { Vm } from './vm';

/** Outcome of KVM_GET/SET_MSRS: the kernel stops at the first MSR it refuses. */
export interface MsrResult {
  entries: MsrEntry[];
  processed: number;
  /** Index of the first MSR the kernel refused, when processed < requested. */
  firstRefused?: number;
  /** A batch read's kvm_msrs as the kernel filled it (planRead): the first `processed` entries hold values. */
  bytes?: Buffer;
}

export const NESTED_HEADER_SIZE = 128;
const LAPIC_SIZE = 1024;

interface Codec<T> {
  decode(buf: Buffer): T;
  encode(value: T, base?: Buffer): Buffer;
}

export class Vcpu {
  private readonly handle: FdHandle;
  private runner?: NativeVcpuRunner;

  constructor(
    readonly vm: Vm,
    readonly id: number,
    fd: number,
  ) {
    this.handle = new FdHandle(fd, () => notFound(`vCPU ${id} is closed: its VM was deleted`, 'VM_NOT_FOUND'));
  }

  /** The vCPU fd; throws once the vCPU is closed (the number may belong to another VM by then). */
  get fd(): number {
    return this.handle.get();
  }

  /** A section's bytes as the kernel wrote them, undecoded, for the sections that have a byte form. */
  getSectionBytes(section: ByteSection): Buffer {
    return section === 'cpuid2' ? this.getCpuid2Bytes() : this.getStructBytes(section);
  }

  // ---- fixed-size sections ----
  /**
   * A fixed-size section's struct as the kernel wrote it, undecoded (GetState encodes its response from
   * these bytes; the typed getters below decode them).
   */
  getStructBytes(section: StructSection): Buffer {
    const r = STRUCT_IOCTLS[section];
    this.requireSection(section, 'read');
    return this.getRaw(r.ioctl, r.get, native.sizes[r.size]);
  }
  /**
   * A fixed-size section's struct written as given, with the typed setter's ioctl and gate (the typed
   * setters encode into it; SetState builds the bytes straight from its request: convert/state-bytes.ts).
   */
  setStructBytes(section: StructSection, bytes: Buffer): void {
    const w = STRUCT_IOCTLS[section];
    if (w.gatedWrite) this.requireSection(section, 'write');
    this.setRaw(w.setIoctl, w.set, bytes, native.sizes[w.size]);
  }
  /** A section written from its kernel bytes (kvm_cpuid2 for cpuid2: a header and `nent` entries). */
  setSectionBytes(section: ByteSection, bytes: Buffer): void {
    if (section !== 'cpuid2') return this.setStructBytes(section, bytes);
    this.requireSection('cpuid2', 'write');
    kvmCall('KVM_SET_CPUID2', () => native.setCpuid2(this.fd, bytes));
  }
  getRegs(): Regs {
    return SECTIONS.regs.decode(this.getStructBytes('regs'));
  }
  setRegs(value: Regs): void {
    this.setStructBytes('regs', SECTIONS.regs.encode(value));
  }
  getSregs(): Sregs {
    return SECTIONS.sregs.decode(this.getStructBytes('sregs'));
  }
  setSregs(value: Sregs): void {
    this.setStructBytes('sregs', SECTIONS.sregs.encode(value));
  }
  /** KVM_GET_SREGS2 (KVM_CAP_SREGS2): adds the PDPTRs PAE guests need restored exactly. */
  getSregs2(): Sregs2 {
    return SECTIONS.sregs2.decode(this.getStructBytes('sregs2'));
  }
  setSregs2(value: Sregs2): void {
    this.setStructBytes('sregs2', SECTIONS.sregs2.encode(value));
  }
  getFpu(): Fpu {
    return SECTIONS.fpu.decode(this.getStructBytes('fpu'));
  }
  setFpu(value: Fpu): void {
    this.setStructBytes('fpu', SECTIONS.fpu.encode(value));
  }
  getXcrs(): Xcrs {
    return SECTIONS.xcrs.decode(this.getStructBytes('xcrs'));
  }
  setXcrs(value: Xcrs): void {
    this.setStructBytes('xcrs', SECTIONS.xcrs.encode(value));
  }
  getVcpuEvents(): VcpuEvents {
    return SECTIONS.vcpu_events.decode(this.getStructBytes('vcpu_events'));
  }
  setVcpuEvents(value: VcpuEvents): void {
    this.setStructBytes('vcpu_events', SECTIONS.vcpu_events.encode(value));
  }
  getDebugregs(): Debugregs {
    return SECTIONS.debugregs.decode(this.getStructBytes('debugregs'));
  }
  setDebugregs(value: Debugregs): void {
    this.setStructBytes('debugregs', SECTIONS.debugregs.encode(value));
  }
  getMpState(): number {
    this.requireSection('mp_state', 'read');
    return this.getDecoded('KVM_GET_MP_STATE', native.getMpState, native.sizes.kvm_mp_state, SECTIONS.mp_state).mpState;
  }
  setMpState(value: number): void {
    this.requireSection('mp_state', 'write');
    this.setEncoded('KVM_SET_MP_STATE', native.setMpState, SECTIONS.mp_state, { mpState: value });
  }

  // ---- raw sections (versioned layouts) ----
  /** The in-kernel LAPIC's 1024-byte register page; needs KVM_CREATE_IRQCHIP. */
  getLapic(): Buffer {
    this.requireSection('lapic', 'read');
    return this.getRaw('KVM_GET_LAPIC', native.getLapic, LAPIC_SIZE);
  }
  setLapic(value: Buffer): void {
    this.requireSection('lapic', 'write');
    this.setRaw('KVM_SET_LAPIC', native.setLapic, value, LAPIC_SIZE);
  }
  /** XSAVE area: KVM_GET_XSAVE2 at the KVM_CAP_XSAVE2 size when available, else the 4 KiB legacy call. */
  getXsave(): Buffer {
    this.requireSection('xsave', 'read');
    const size = this.xsaveSize();
    if (this.vm.checkExtension('XSAVE2') > 0) return this.getRaw('KVM_GET_XSAVE2', (fd, b) => native.getXsave2(fd, b, size), size);
    return this.getRaw('KVM_GET_XSAVE', native.getXsave, LEGACY_XSAVE_SIZE);
  }
  setXsave(value: Buffer): void {
    this.requireSection('xsave', 'write');
    const size = this.xsaveSize();
    this.setRaw('KVM_SET_XSAVE', (fd, b) => native.setXsave(fd, b, size), value, size);
  }
  xsaveSize(): number {
    return xsaveSize(this.vm);
  }

  // ---- variable-length sections ----
  /** KVM_GET_MSRS for any index list. A refused index ends the read there (partial result). */
  getMsrs(indices: number[]): MsrResult {
    const buf = msrRequest(indices);
    const processed = kvmCall('KVM_GET_MSRS', () => native.getMsrs(this.fd, buf));
    return msrResult(SECTIONS.msrs.decode(buf), processed, indices);
  }
  /** KVM_SET_MSRS: `processed` < entries.length means the kernel refused entries[processed]. */
  setMsrs(entries: MsrEntry[]): MsrResult {
    const buf = SECTIONS.msrs.encode(entries);
    const processed = kvmCall('KVM_SET_MSRS', () => native.setMsrs(this.fd, buf));
    return msrResult(
      entries,
      processed,
      entries.map((e) => e.index),
    );
  }
  /**
   * KVM_GET_CPUID2, its nent the entries filled (older kernels leave the caller's count on success:
   * the addon trims the blank entries, TrimCpuid2 in native/kvm_ioctls.cc says why).
   */
  getCpuid2(capacity = 256): CpuidEntry2[] {
    return SECTIONS.cpuid2.decode(this.getCpuid2Bytes(capacity));
  }
  /** KVM_GET_CPUID2's kvm_cpuid2, undecoded (spare capacity after the entries). */
  getCpuid2Bytes(capacity = 256): Buffer {
    this.requireSection('cpuid2', 'read');
    const buf = cpuid2Buffer(capacity);
    kvmCall('KVM_GET_CPUID2', () => native.getCpuid2(this.fd, buf));
    return buf;
  }
  setCpuid2(entries: CpuidEntry2[]): void {
    this.setSectionBytes('cpuid2', SECTIONS.cpuid2.encode(entries));
  }
  getTscKhz(): number {
    this.requireSection('tsc_khz', 'read');
    return kvmCall('KVM_GET_TSC_KHZ', () => native.getTscKhz(this.fd));
  }
  /** Setting the guest TSC frequency needs KVM_CAP_TSC_CONTROL (TSC scaling in hardware). */
  setTscKhz(khz: number): void {
    this.requireSection('tsc_khz', 'write');
    kvmCall('KVM_SET_TSC_KHZ', () => native.setTscKhz(this.fd, khz));
  }

  // ---- many sections in one native call ----
  /**
   * How `section` is read in a batch (readBatch): its ioctl, buffer, and how the result becomes the
   * value getSectionBytes (struct sections, cpuid2) or the typed getter (mp_state, xsave, lapic,
   * tsc_khz) returns; msrs yield getMsrs' MsrResult. Capabilities are checked here, before any ioctl.
   * The buffers come from `alloc` (a batch's reads share a few allocations: batchAllocator).
   */
  planRead(section: SectionName, msrIndices: number[], alloc: ZeroedAlloc = zeroed): PlannedRead {
    if (section !== 'msrs') this.requireSection(section, 'read');
    switch (section) {
      case 'mp_state': {
        const buf = alloc(native.sizes.kvm_mp_state);
        return { ioctl: 'KVM_GET_MP_STATE', buf, done: () => SECTIONS.mp_state.decode(buf) };
      }
      case 'lapic':
        return fillRead('KVM_GET_LAPIC', alloc(LAPIC_SIZE));
      case 'xsave':
        return this.vm.checkExtension('XSAVE2') > 0 ? fillRead('KVM_GET_XSAVE2', alloc(this.xsaveSize())) : fillRead('KVM_GET_XSAVE', alloc(LEGACY_XSAVE_SIZE));
      case 'msrs': {
        const buf = msrRequest(msrIndices);
        return { ioctl: 'KVM_GET_MSRS', buf, done: (processed) => new BatchMsrResult(buf, processed, msrIndices) };
      }
      case 'cpuid2': {
        const buf = cpuid2Buffer(256, alloc);
        return fillRead('KVM_GET_CPUID2', buf);
      }
      case 'tsc_khz':
        return { ioctl: 'KVM_GET_TSC_KHZ', done: (khz) => khz };
      default: {
        const r = STRUCT_IOCTLS[section];
        return fillRead(r.ioctl, alloc(native.sizes[r.size]));
      }
    }
  }

  /**
   * Runs the planned reads in order with one native call (no JS<->native transition per ioctl) and
   * returns each one's value. Every ioctl is reported to the metrics observer with its own duration
   * and errno, as single calls are; the first failure stops the batch and throws its KvmError, the
   * same error the single call would throw. Synchronous like the single calls, with no Promise twin:
   * its callers read a vCPU that src/vm has paused.
   */
  readBatch(plans: PlannedRead[]): unknown[] {
    const batch = new BatchShape(plans, () => this.xsaveSize());
    batch.settle(native.getBatch(this.fd, batch.ops, batch.bufs, batch.out, batch.xsave, batch.derived?.from));
    return batch.values();
  }

  /**
   * The reads of `sections` prepared to run again and again (GetState reads the same sections each
   * call): plans, ops, buffers and results are built and checked once, the buffers zeroed before each
   * run as fresh ones would be. A run's values are views of those buffers, valid until the next run.
   */
  repeatedRead(sections: readonly SectionName[], msrIndices: number[]): RepeatedRead {
    const buffers = new BatchBuffers();
    const plans = sections.map((s) => this.planRead(s, msrIndices, buffers.alloc));
    return new RepeatedRead(() => this.fd, sections, new BatchShape(plans, () => this.xsaveSize()), buffers);
  }

  // ---- nested state ----
  /** KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) on the VM: the largest blob this host produces. */
  nestedStateMaxSize(): number {
    return nestedStateMaxSize(this.vm);
  }

  /**
   * KVM_GET_NESTED_STATE. Always declares the full capability size (6.1 SVM writes 4224 bytes into
   * smaller buffers in guest mode); on E2BIG grows to the size the kernel wrote back and retries
   * once; returns exactly `size` bytes. A 128-byte result is real state, not "none".
   */
  getNestedState(): Buffer {
    const max = this.requireNestedState('KVM_GET_NESTED_STATE');
    const attempt = (cap: number): Buffer => {
      const buf = Buffer.alloc(cap);
      kvmCall('KVM_GET_NESTED_STATE', () => native.getNestedState(this.fd, buf, max));
      return buf.subarray(0, buf.readUInt32LE(4));
    };
    try {
      return attempt(max);
    } catch (e) {
      if (!(e instanceof KvmError) || e.code !== 'E2BIG' || !e.required || e.required <= max) throw e;
      return attempt(e.required);
    }
  }

  /**
   * The one nested-state gate (ffi/caps.ts requireNestedState), asked of this VM: its KVM_CAP_NESTED_STATE
   * size, or UnsupportedError naming the capability when it is 0. src/vm asks it before validating a blob
   * against that size; Get/SetNestedState ask it before their ioctl.
   */
  requireNestedState(ioctl: 'KVM_GET_NESTED_STATE' | 'KVM_SET_NESTED_STATE'): number {
    return requireNestedState(this.vm, ioctl);
  }

  /** KVM_SET_NESTED_STATE with the caller's bytes, unchanged. Validation is the caller's job. */
  setNestedState(blob: Buffer): void {
    this.requireNestedState('KVM_SET_NESTED_STATE');
    kvmCall('KVM_SET_NESTED_STATE', () => native.setNestedState(this.fd, blob));
  }

  // ---- running ----
  /**
   * The run thread for this vCPU; `onEvent` fires (coalesced) when runner.drain() has news. The
   * vCPU owns it: close() stops the thread before the fd goes.
   */
  createRunner(onEvent: () => void): NativeVcpuRunner {
    if (this.runner) throw new VcpudError('internal', `vCPU ${this.id} already has a run thread`);
    const size = this.vm.kvm.vcpuMmapSize();
    this.runner = kvmCall('mmap(kvm_run)', () => new native.VcpuRunner(this.fd, size, onEvent));
    return this.runner;
  }

  /** Stops the run thread (joined: it no longer uses the fd), then closes the fd. Idempotent. */
  close(): void {
    this.runner?.destroy();
    this.handle.close();
  }

  // ---- helpers ----
  /**
   * Throws the UnsupportedError naming the capability when this VM cannot use `section` in `direction`:
   * the one gate (ffi/caps.ts sectionGate), asked of this VM's fd. src/vm asks the same gate of the
   * probed host capabilities for every section of a request before touching any.
   */
  private requireSection(section: SectionName, direction: Direction): void {
    const refusal = sectionGate(section, direction, this.vm, this.vm.hasIrqchip);
    if (refusal) throw refusal;
  }

  private getRaw(ioctl: string, fn: (fd: number, b: Buffer) => void, size: number): Buffer {
    const buf = Buffer.alloc(size);
    kvmCall(ioctl, () => fn(this.fd, buf));
    return buf;
  }

  private setRaw(ioctl: string, fn: (fd: number, b: Buffer) => void, value: Buffer, size: number): void {
    if (value.length !== size) throw new VcpudError('invalid_argument', `${ioctl}: expected ${size} bytes, got ${value.length}`);
    kvmCall(ioctl, () => fn(this.fd, value));
  }

  private getDecoded<T>(ioctl: string, fn: (fd: number, b: Buffer) => void, size: number, codec: Codec<T>): T {
    return codec.decode(this.getRaw(ioctl, fn, size));
  }

  private setEncoded<T>(ioctl: string, fn: (fd: number, b: Buffer) => void, codec: Codec<T>, value: T): void {
    const buf = codec.encode(value);
    kvmCall(ioctl, () => fn(this.fd, buf));
  }
}

/** The sections whose GET ioctl fills one fixed-size struct. */
export const STRUCT_SECTIONS = ['regs', 'sregs', 'sregs2', 'fpu', 'xcrs', 'vcpu_events', 'debugregs'] as const;
export type StructSection = (typeof STRUCT_SECTIONS)[number];

/** The sections GetState takes as the kernel's bytes (getSectionBytes): the structs, and cpuid2's list. */
export const BYTE_SECTIONS = [...STRUCT_SECTIONS, 'cpuid2'] as const;
export type ByteSection = (typeof BYTE_SECTIONS)[number];

/** One section read of a batch (Vcpu.planRead): `done` turns the ioctl's return value into the section's value. */
export interface PlannedRead {
  ioctl: string;
  buf?: Buffer;
  done(ret: number): unknown;
}

/** A read whose value is the buffer the kernel filled. */
function fillRead(ioctl: string, buf: Buffer): PlannedRead {
  return { ioctl, buf, done: () => buf };
}

/** Where planRead takes its zero-filled buffers from. */
export type ZeroedAlloc = (size: number) => Buffer;
const zeroed: ZeroedAlloc = (size) => Buffer.alloc(size);

/**
 * A batch's reads as the addon runs them: the issued ones (a KVM_GET_SREGS that KVM_GET_SREGS2 and
 * KVM_GET_VCPU_EVENTS answer is left out and filled from them: sregs-from-sregs2.ts), their ops,
 * buffers and results, and what a run's results become.
 */
class BatchShape {
  readonly derived: ReturnType<typeof sregsAnsweredBySregs2>;
  readonly issued: PlannedRead[];
  readonly ops: Uint8Array;
  readonly bufs: (Buffer | undefined)[];
  /** out[2i]: issued read i's return value; out[2i+1]: its duration in seconds. */
  readonly out: Float64Array;
  readonly xsave: number;
  /** The observer's duration recorders for the issued ioctls, bound once per observer. */
  private bound: { observer: IoctlObserver; record: ((seconds: number) => void)[] } | undefined;

  constructor(
    readonly plans: PlannedRead[],
    xsaveSize: () => number,
  ) {
    this.derived = sregsAnsweredBySregs2(plans);
    const derivedAt = this.derived?.index;
    this.issued = derivedAt === undefined ? plans : plans.filter((_, i) => i !== derivedAt);
    this.ops = Uint8Array.from(this.issued, (p) => batchOp(p.ioctl));
    this.bufs = this.issued.map((p) => p.buf);
    this.out = new Float64Array(2 * this.issued.length);
    this.xsave = this.issued.some((p) => p.ioctl === 'KVM_GET_XSAVE2') ? xsaveSize() : 0;
  }

  /** Reports every ioctl that ran to the metrics observer, and throws the failing one's error. */
  settle(failure: BatchFailure | undefined): void {
    const n = this.issued.length;
    const obs = currentObserver();
    if (failure === undefined && obs?.durationRecorder) {
      if (this.bound?.observer !== obs) this.bound = { observer: obs, record: this.issued.map((p) => obs.durationRecorder!(p.ioctl)) };
      for (let i = 0; i < n; i++) this.bound.record[i](this.out[2 * i + 1]);
      return;
    }
    const failedAt = failure ? failure.batchIndex : n;
    const error = failure && toKvmError(failure);
    if (obs)
      for (let i = 0; i < Math.min(failedAt + 1, n); i++)
        obs.onIoctl(this.issued[i].ioctl, this.out[2 * i + 1], i === failedAt && error instanceof KvmError ? error.code : undefined);
    if (error) throw error;
  }

  /** Each read's value after a complete run, in the plans' order. */
  values(): unknown[] {
    const values = this.issued.map((p, i) => p.done(this.out[2 * i]));
    if (this.derived) values.splice(this.derived.index, 0, this.plans[this.derived.index].done(0));
    return values;
  }
}

/** How a caller encodes a repeated read's sections: a wire program over buffers among RepeatedRead.inputs. */
export interface BatchEncoding {
  program: Uint32Array;
  inputs: Buffer[];
}

/**
 * A batch of reads run again and again over the same buffers (Vcpu.repeatedRead), through a native
 * PreparedBatch that holds them. With a BatchEncoding, a run also writes the sections' message straight
 * from the kernel's bytes in the same native call (GetState's hot path: no values, no second call).
 */
export class RepeatedRead {
  /**
   * The bytes each section is encoded from after a run: its read's buffer (kvm_sregs filled from
   * sregs2 and vcpu_events when derived), and for tsc_khz its return value as a little-endian u32.
   */
  readonly inputs: ReadonlyMap<SectionName, Buffer>;
  private readonly returnsTo: (Buffer | undefined)[];
  /** The native batch, made again with the program when a caller first encodes with it. */
  private batch: NativePreparedBatch;
  private encoding: BatchEncoding | undefined;

  constructor(
    private readonly fd: () => number,
    sections: readonly SectionName[],
    private readonly shape: BatchShape,
    private readonly buffers: BatchBuffers,
  ) {
    const inputs = new Map<SectionName, Buffer>();
    sections.forEach((s, i) => {
      const buf = shape.plans[i].buf ?? Buffer.alloc(4);
      inputs.set(s, buf);
    });
    this.inputs = inputs;
    // Reads whose value is their return value (KVM_GET_TSC_KHZ) write it into their input.
    this.returnsTo = shape.issued.map((p) => (p.buf ? undefined : inputs.get(sections[shape.plans.indexOf(p)])));
    this.batch = this.prepare(undefined);
  }

  /** Runs the reads: each section's value, in the order asked. */
  run(): unknown[] {
    this.buffers.zero();
    this.shape.settle(this.batch.run(this.fd()) as BatchFailure | undefined);
    return this.shape.values();
  }

  /**
   * Runs the reads and writes `encoding`'s output into `dest` from `pos`: its end, or undefined when it
   * was not written (no room in `dest`, or a list read that stopped short: KVM_GET_MSRS refused an MSR),
   * and values() then holds the run's values. `encoding` is made once per read by its caller.
   */
  runEncoded(encoding: BatchEncoding, dest: Buffer, pos: number): number | undefined {
    if (this.encoding !== encoding) this.batch = this.prepare(encoding);
    this.buffers.zero();
    const r = this.batch.run(this.fd(), dest, pos);
    this.shape.settle(typeof r === 'number' ? undefined : r);
    return typeof r === 'number' && r >= 0 ? r : undefined;
  }

  /** The last run's values (after a runEncoded that wrote nothing). */
  values(): unknown[] {
    return this.shape.values();
  }

  private prepare(encoding: BatchEncoding | undefined): NativePreparedBatch {
    const { ops, bufs, out, xsave, derived } = this.shape;
    this.encoding = encoding;
    return new native.PreparedBatch(ops, bufs, out, xsave, derived?.from, this.returnsTo, encoding?.program, encoding?.inputs);
  }
}

/**
 * Bytes of one shared allocation of batchAllocator: a GetState of every section needs ~17.5 KiB (cpuid2's
 * 10), with room for alignment. Not more: the allocation is external memory V8 counts towards its GC
 * triggers, and a 32 KiB chunk per call showed more full collections under load.
 */
const BATCH_CHUNK = 20 * 1024;

/**
 * Zero-filled buffers for the reads of one batch, carved (8-byte aligned) from a few shared allocations.
 * Why: every Buffer.alloc is an ArrayBuffer of its own (a calloc, a backing store, external-memory
 * accounting, later a finalization), and a GetState of every section took 12 of them. The buffers are
 * views that live as long as the read's values; a request larger than a chunk gets its own allocation.
 * zero() clears them all for another run of the same reads (Vcpu.repeatedRead).
 */
class BatchBuffers {
  private readonly allocations: Buffer[] = [];
  private chunk: Buffer | undefined;
  private used = 0;

  readonly alloc: ZeroedAlloc = (size) => {
    if (size > BATCH_CHUNK) return this.own(Buffer.alloc(size));
    if (this.chunk === undefined || this.used + size > this.chunk.length) {
      this.chunk = this.own(Buffer.alloc(BATCH_CHUNK));
      this.used = 0;
    }
    const buf = this.chunk.subarray(this.used, this.used + size);
    this.used += (size + 7) & ~7;
    return buf;
  };

  zero(): void {
    for (const a of this.allocations) a.fill(0);
  }

  private own(b: Buffer): Buffer {
    this.allocations.push(b);
    return b;
  }
}

export function batchAllocator(): ZeroedAlloc {
  return new BatchBuffers().alloc;
}

/** The addon's index of a GET ioctl in its batch table (native.batchOps). */
const BATCH_OPS: ReadonlyMap<string, number> = new Map(native.batchOps.map((name, i) => [name, i]));
function batchOp(ioctl: string): number {
  const op = BATCH_OPS.get(ioctl);
  if (op === undefined) throw new VcpudError('internal', `${ioctl} cannot be batched`);
  return op;
}

function cpuid2Buffer(capacity: number, alloc: ZeroedAlloc = zeroed): Buffer {
  return alloc(8 + capacity * native.sizes.kvm_cpuid_entry2);
}

type StructIoctl = (fd: number, b: Buffer) => void;

/**
 * How each struct section is read and written: its ioctls and its struct's size (the capability gate is
 * sectionGate's). `gatedWrite`: the setter asks the gate itself (the ones with a capability of their own).
 */
const STRUCT_IOCTLS: {
  readonly [S in StructSection]: { ioctl: string; get: StructIoctl; setIoctl: string; set: StructIoctl; gatedWrite: boolean; size: keyof typeof native.sizes };
} = {
  regs: {
    ioctl: 'KVM_GET_REGS',
    get: (fd, b) => native.getRegs(fd, b),
    setIoctl: 'KVM_SET_REGS',
    set: (fd, b) => native.setRegs(fd, b),
    gatedWrite: false,
    size: 'kvm_regs',
  },
  sregs: {
    ioctl: 'KVM_GET_SREGS',
    get: (fd, b) => native.getSregs(fd, b),
    setIoctl: 'KVM_SET_SREGS',
    set: (fd, b) => native.setSregs(fd, b),
    gatedWrite: false,
    size: 'kvm_sregs',
  },
  sregs2: {
    ioctl: 'KVM_GET_SREGS2',
    get: (fd, b) => native.getSregs2(fd, b),
    setIoctl: 'KVM_SET_SREGS2',
    set: (fd, b) => native.setSregs2(fd, b),
    gatedWrite: true,
    size: 'kvm_sregs2',
  },
  fpu: {
    ioctl: 'KVM_GET_FPU',
    get: (fd, b) => native.getFpu(fd, b),
    setIoctl: 'KVM_SET_FPU',
    set: (fd, b) => native.setFpu(fd, b),
    gatedWrite: false,
    size: 'kvm_fpu',
  },
  xcrs: {
    ioctl: 'KVM_GET_XCRS',
    get: (fd, b) => native.getXcrs(fd, b),
    setIoctl: 'KVM_SET_XCRS',
    set: (fd, b) => native.setXcrs(fd, b),
    gatedWrite: true,
    size: 'kvm_xcrs',
  },
  vcpu_events: {
    ioctl: 'KVM_GET_VCPU_EVENTS',
    get: (fd, b) => native.getVcpuEvents(fd, b),
    setIoctl: 'KVM_SET_VCPU_EVENTS',
    set: (fd, b) => native.setVcpuEvents(fd, b),
    gatedWrite: true,
    size: 'kvm_vcpu_events',
  },
  debugregs: {
    ioctl: 'KVM_GET_DEBUGREGS',
    get: (fd, b) => native.getDebugregs(fd, b),
    setIoctl: 'KVM_SET_DEBUGREGS',
    set: (fd, b) => native.setDebugregs(fd, b),
    gatedWrite: true,
    size: 'kvm_debugregs',
  },
};

/**
 * A KVM_GET_MSRS request for `indices`: encoded once per index list (GetState asks for the host's list
 * every time), then copied, since the kernel writes the values into it.
 */
const msrRequests = new WeakMap<readonly number[], Buffer>();
function msrRequest(indices: number[]): Buffer {
  let template = msrRequests.get(indices);
  if (!template || !describes(template, indices)) {
    template = SECTIONS.msrs.encode(indices.map((index) => ({ index, data: 0n })));
    msrRequests.set(indices, template);
  }
  return Buffer.from(template);
}

/** The request holds exactly `indices` (an array the caller changed in place is encoded again). */
function describes(request: Buffer, indices: readonly number[]): boolean {
  const entry = native.sizes.kvm_msr_entry;
  if (request.readUInt32LE(0) !== indices.length) return false;
  for (let i = 0; i < indices.length; i++) if (request.readUInt32LE(8 + i * entry) !== indices[i]) return false;
  return true;
}

/** A batch's KVM_GET_MSRS: its bytes, decoded into entries only when they are asked for (GetState encodes the bytes). */
class BatchMsrResult implements MsrResult {
  readonly firstRefused?: number;
  private decoded?: MsrEntry[];

  constructor(
    readonly bytes: Buffer,
    readonly processed: number,
    indices: number[],
  ) {
    if (processed < indices.length) this.firstRefused = indices[processed];
  }

  get entries(): MsrEntry[] {
    this.decoded ??= SECTIONS.msrs.decode(this.bytes).slice(0, this.processed);
    return this.decoded;
  }
}

function msrResult(entries: MsrEntry[], processed: number, indices: number[]): MsrResult {
  const r: MsrResult = { entries: entries.slice(0, processed), processed };
  if (processed < indices.length) r.firstRefused = indices[processed];
  return r;
}
