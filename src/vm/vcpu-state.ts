/**
 * Whole-vCPU state: read chosen sections in the save order, write several sections atomically in
 * the restore order, and nested state with validation. One place knows the orders; GetState/SetState,
 * snapshots and migration all go through here.
 *
 * Save order:    mp_state first (reading it may change CS/RIP), vcpu_events, regs, fpu, xsave,
 *                xcrs, sregs, sregs2, lapic, msrs, debugregs, cpuid2, tsc_khz.
 * Restore order: cpuid2 first, tsc_khz, sregs/sregs2 (EFER, APIC base), regs (before events:
 *                SET_REGS clears pending exceptions), fpu, xsave, xcrs, lapic (after sregs, before
 *                msrs: TSC deadline), msrs, vcpu_events, mp_state, debugregs. Nested state last, as
 *                the kernel selftests do, after sregs (EFER.SVME) and events (SMM).
 *
 * What this code relies on of the KVM ABI (read in the kernel: arch/x86/kvm/x86.c, vmx/nested.c,
 * svm/nested.c; Documentation/virt/kvm/api.rst 4.114/4.115 is stale):
 * - KVM_SET_MSRS stops at the first MSR it refuses and returns how many it set (a short count, no
 *   errno); some MSRs (e.g. 0x4b564d06) refuse a plain write-back of their own value.
 * - sregs' EFER, APIC base and FS/GS bases are the same state as MSRs 0xc0000080, 0x1b, 0xc0000100/1
 *   (ALSO_WRITES below), checked differently by the two ioctls.
 * - In guest mode (nested), regs/sregs/msrs read from KVM are L2's; L1's state lives in the nested blob.
 * - KVM_SET_NESTED_STATE checks the flags and header first, then leaves nested mode and checks the
 *   rest (VMX: vmcs12 revision, controls, guest and host state): a refused SET can leave the vCPU changed.
 * - KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) is the largest blob (8320 VMX, 4224 SVM; 0 without
 *   nested support), and a 128-byte blob is real state (VMXON without a VMCS, SVM GIF), never "none".
 */
import { isDeepStrictEqual } from 'node:util';
import { snakeCase } from '../case';
import { invalidArgument, KvmError, VcpudError, type ErrorDetails, type Violation } from '../errors';
import { probedCaps, type HostCapabilities } from '../ffi/capabilities';
import { sectionGate, type Direction } from '../ffi/caps';
import { hasBit, maxPhysAddrBits, SVM_BIT, VMX_BIT } from '../ffi/cpuid-facts';
import { validateNestedState, validateNestedStructure } from '../ffi/nested';
import { msrName, SECTIONS, type MsrEntry, type SectionName, type SectionValues } from '../ffi/sections';
import { batchAllocator, BYTE_SECTIONS, type BatchEncoding, type ByteSection, type MsrResult, type RepeatedRead, type Vcpu } from '../ffi/vcpu';
import type { ManagedVcpu, StateAccessOptions } from './managed-vcpu';

export type StateValues = Partial<SectionValues>;

/**
 * Sections to write: decoded values, or for the struct sections and cpuid2 (BYTE_SECTIONS) also the
 * bytes their SET ioctl takes (SetState builds those from its request: convert/state-bytes.ts).
 */
export type StateInput = { [N in SectionName]?: SectionValues[N] | (N extends ByteSection ? Buffer : never) };

export const SAVE_ORDER: readonly SectionName[] = [
  'mp_state',
  'vcpu_events',
  'regs',
  'fpu',
  'xsave',
  'xcrs',
  'sregs',
  'sregs2',
  'lapic',
  'msrs',
  'debugregs',
  'cpuid2',
  'tsc_khz',
];

export const RESTORE_ORDER: readonly SectionName[] = [
  'cpuid2',
  'tsc_khz',
  'sregs',
  'sregs2',
  'regs',
  'fpu',
  'xsave',
  'xcrs',
  'lapic',
  'msrs',
  'vcpu_events',
  'mp_state',
  'debugregs',
];

export interface ReadResult {
  values: StateValues;
  /** MSRs of the requested list the kernel refused to read (skipped, the rest were read). */
  msrsUnreadable: number[];
}

export interface StateContext {
  caps: HostCapabilities;
  /** The vCPU's VM has the in-kernel irqchip (needed for lapic). */
  irqchip: boolean;
}

/** The sections that can be read here, in save order (the default for "all"). */
export function readableSections(ctx: StateContext): SectionName[] {
  return SAVE_ORDER.filter((s) => ctx.caps.sections[s].readable && (s !== 'lapic' || ctx.irqchip));
}

/**
 * The section gate (ffi/caps.ts sectionGate, the one Vcpu applies on its VM's fd), asked of the host's
 * probed capabilities for every section of a request before any is touched: a write refused halfway
 * would need a rollback for nothing.
 */
function checkSupported(ctx: StateContext, s: SectionName, direction: Direction): void {
  const refusal = sectionGate(s, direction, probedCaps(ctx.caps), ctx.irqchip);
  if (refusal) throw refusal;
}

/** Reads one section. MSRs: the kernel stops at the first refused index; we skip it and go on. */
function readSection(vcpu: Vcpu, s: SectionName, msrIndices: number[], unreadable: number[]): unknown {
  switch (s) {
    case 'regs':
      return vcpu.getRegs();
    case 'sregs':
      return vcpu.getSregs();
    case 'sregs2':
      return vcpu.getSregs2();
    case 'fpu':
      return vcpu.getFpu();
    case 'xsave':
      return vcpu.getXsave();
    case 'xcrs':
      return vcpu.getXcrs();
    case 'lapic':
      return vcpu.getLapic();
    case 'vcpu_events':
      return vcpu.getVcpuEvents();
    case 'debugregs':
      return vcpu.getDebugregs();
    case 'mp_state':
      return { mpState: vcpu.getMpState() };
    case 'cpuid2':
      return vcpu.getCpuid2();
    case 'tsc_khz':
      return vcpu.getTscKhz();
    case 'msrs':
      return readMsrsSkipping(vcpu, msrIndices, unreadable);
  }
}

/** Reads `indices`, skipping (and listing in `unreadable`) each one the kernel refuses. `first`: the read of all of them, done already. */
function readMsrsSkipping(vcpu: Vcpu, indices: number[], unreadable: number[], first?: MsrResult): MsrEntry[] {
  const entries: MsrEntry[] = [];
  let rest = indices;
  let r = first;
  while (rest.length > 0) {
    r ??= vcpu.getMsrs(rest);
    entries.push(...r.entries);
    if (r.firstRefused === undefined) break;
    unreadable.push(r.firstRefused);
    rest = rest.slice(r.processed + 1);
    r = undefined;
  }
  return entries;
}

function writeSection(vcpu: Vcpu, s: SectionName, value: unknown): void {
  if (Buffer.isBuffer(value) && isByteSection(s)) return vcpu.setSectionBytes(s, value);
  switch (s) {
    case 'regs':
      return vcpu.setRegs(value as SectionValues['regs']);
    case 'sregs':
      return vcpu.setSregs(value as SectionValues['sregs']);
    case 'sregs2':
      return vcpu.setSregs2(value as SectionValues['sregs2']);
    case 'fpu':
      return vcpu.setFpu(value as SectionValues['fpu']);
    case 'xsave':
      return vcpu.setXsave(value as Buffer);
    case 'xcrs':
      return vcpu.setXcrs(value as SectionValues['xcrs']);
    case 'lapic':
      return vcpu.setLapic(value as Buffer);
    case 'vcpu_events':
      return vcpu.setVcpuEvents(value as SectionValues['vcpu_events']);
    case 'debugregs':
      return vcpu.setDebugregs(value as SectionValues['debugregs']);
    case 'mp_state':
      return vcpu.setMpState((value as SectionValues['mp_state']).mpState);
    case 'cpuid2':
      return vcpu.setCpuid2(value as SectionValues['cpuid2']);
    case 'tsc_khz':
      return vcpu.setTscKhz(value as number);
    case 'msrs': {
      const entries = value as MsrEntry[];
      const r = vcpu.setMsrs(entries);
      // KVM_SET_MSRS stops at the first MSR it refuses and reports how many it set: a failure.
      if (r.firstRefused !== undefined) throw msrRefused(entries, r.processed);
      return;
    }
  }
}

/** Reads `sections` (all readable ones when empty) from a vCPU that is out of KVM_RUN. */
export function readState(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], msrIndices?: number[]): ReadResult {
  return readStateAs(vcpu, ctx, sections, msrIndices, false) as ReadResult;
}

/**
 * A read whose fixed-size struct sections are the kernel's bytes, undecoded (Buffers); msrs too (its
 * kvm_msrs) when the kernel read every MSR asked for, else its entries.
 */
export interface BytesReadResult {
  values: { [N in SectionName]?: SectionValues[N] | (N extends ByteSection | 'msrs' ? Buffer : never) };
  msrsUnreadable: number[];
}

/**
 * readState, except that the fixed-size struct sections and cpuid2 (BYTE_SECTIONS) are left as the bytes
 * the kernel wrote: GetState encodes its response from them without decoding (src/server/convert/raw-state.ts).
 */
export function readStateBytes(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], msrIndices?: number[]): BytesReadResult {
  const read = planBytesRead(vcpu, ctx, sections, msrIndices ?? ctx.caps.msrIndexList);
  const alloc = batchAllocator();
  return read.values(vcpu.readBatch(read.batched.map((s) => vcpu.planRead(s, read.indices, alloc))));
}

/** The sections a bytes read covers, in save order, and how a batch's results become its values. */
interface BytesReadPlan {
  indices: number[];
  /** The sections read, in save order. */
  order: SectionName[];
  /** The sections read in the batch (an empty MSR list needs no ioctl). */
  batched: SectionName[];
  values(results: unknown[]): BytesReadResult;
}

function planBytesRead(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], indices: number[]): BytesReadPlan {
  const wanted = wantedForRead(ctx, sections);
  const order = SAVE_ORDER.filter((s) => wanted.includes(s));
  const batched = order.filter((s) => s !== 'msrs' || indices.length > 0);
  const msrsAt = batched.indexOf('msrs');
  return {
    indices,
    order,
    batched,
    values(results) {
      const values: Record<string, unknown> = {};
      const msrsUnreadable: number[] = [];
      let i = 0;
      for (const s of order) {
        const r = s === 'msrs' && msrsAt < 0 ? undefined : results[i++];
        values[s] = s === 'msrs' ? msrsValue(vcpu, indices, msrsUnreadable, r as MsrResult | undefined) : r;
      }
      return { values, msrsUnreadable };
    },
  };
}

/** Every MSR read in the batch: the kernel's kvm_msrs bytes (GetState encodes them as they are); else the entries read, skipping refused ones. */
function msrsValue(vcpu: Vcpu, indices: number[], unreadable: number[], first: MsrResult | undefined): MsrEntry[] | Buffer {
  if (first?.bytes && first.firstRefused === undefined) return first.bytes;
  return readMsrsSkipping(vcpu, indices, unreadable, first);
}

/** Distinct (sections, MSR list) reads kept per vCPU by reusedRead; GetState callers ask for a few. */
const MAX_REUSED_READS = 16;
const reusedReads = new WeakMap<Vcpu, Map<string, ReusedRead>>();

/**
 * A read of (sections, MSR list) kept per vCPU on reused buffers: GetState's hot path, where building
 * the plans and buffers of 13 reads cost more than reading them. Its values are views of those buffers,
 * valid until the next read of the same vCPU: the caller uses them before it lets go of the vCPU's lock.
 */
export class ReusedRead {
  constructor(
    private readonly plan: BytesReadPlan,
    readonly batch: RepeatedRead,
  ) {}

  /** The sections read, in save order (an msrs with no MSRs to read is among them, without an input in batch.inputs). */
  get sections(): readonly SectionName[] {
    return this.plan.order;
  }

  /** Reads the sections: readStateBytes' result. */
  read(): BytesReadResult {
    return this.plan.values(this.batch.run());
  }

  /**
   * Reads the sections and writes `encoding`'s output (a program over batch.inputs, made once per read
   * by the caller) into `dest` from `pos`: its end; or, when it was not written (no room in `dest`,
   * or MSRs the kernel refused, which are then read around as readStateBytes does), the read's result.
   */
  readEncoded(encoding: BatchEncoding, dest: Buffer, pos: number): number | BytesReadResult {
    return this.batch.runEncoded(encoding, dest, pos) ?? this.lastRead();
  }

  /** The last run's result (its buffers as that run left them). */
  lastRead(): BytesReadResult {
    return this.plan.values(this.batch.values());
  }
}

/** The kept read of `sections` (all readable ones when empty) on `vcpu`, made on first use; undefined when the vCPU keeps too many already. */
export function reusedRead(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], msrIndices?: number[]): ReusedRead | undefined {
  const key = `${sections.join(',')}|${msrIndices ? msrIndices.join(',') : 'host'}`;
  let reads = reusedReads.get(vcpu);
  if (!reads) reusedReads.set(vcpu, (reads = new Map()));
  let read = reads.get(key);
  if (!read) {
    if (reads.size >= MAX_REUSED_READS) return undefined;
    const plan = planBytesRead(vcpu, ctx, sections, msrIndices ?? ctx.caps.msrIndexList);
    read = new ReusedRead(plan, vcpu.repeatedRead(plan.batched, plan.indices));
    reads.set(key, read);
  }
  return read;
}

/** readStateBytes through the vCPU's kept read (reusedRead), when it has one to spare. */
export function readStateBytesReused(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], msrIndices?: number[]): BytesReadResult {
  return reusedRead(vcpu, ctx, sections, msrIndices)?.read() ?? readStateBytes(vcpu, ctx, sections, msrIndices);
}

/** The sections a read asks for (all readable ones when empty), each checked as supported. */
function wantedForRead(ctx: StateContext, sections: SectionName[]): SectionName[] {
  const wanted = sections.length ? sections : readableSections(ctx);
  checkReadable(ctx, wanted);
  return wanted;
}

/** The read gate of a read of `sections` (the error the read would throw), without reading. */
export function checkReadable(ctx: StateContext, sections: readonly SectionName[]): void {
  for (const s of sections) checkSupported(ctx, s, 'read');
}

/**
 * readStateBytes one ioctl call at a time, as before batching: kept as the reference the batch path
 * is tested against (test/kvm/read-batch.test.ts) and measured against (bench/getstate-stages.ts).
 */
export function readStateBytesPerSection(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], msrIndices?: number[]): BytesReadResult {
  return readStateAs(vcpu, ctx, sections, msrIndices, true);
}

function readStateAs(vcpu: Vcpu, ctx: StateContext, sections: SectionName[], msrIndices: number[] | undefined, asBytes: boolean): BytesReadResult {
  const wanted = wantedForRead(ctx, sections);
  const values: Record<string, unknown> = {};
  const msrsUnreadable: number[] = [];
  for (const s of SAVE_ORDER) {
    if (!wanted.includes(s)) continue;
    values[s] = asBytes && isByteSection(s) ? vcpu.getSectionBytes(s) : readSection(vcpu, s, msrIndices ?? ctx.caps.msrIndexList, msrsUnreadable);
  }
  return { values, msrsUnreadable };
}

const BYTE_SECTION_SET: ReadonlySet<SectionName> = new Set(BYTE_SECTIONS);
const isByteSection = (s: SectionName): s is ByteSection => BYTE_SECTION_SET.has(s);

/**
 * Writes every section in `values`, in restore order, atomically: the current value of each
 * section is read before it is written, and on any failure every section already written (and the
 * failing one, which the kernel may have half-applied) is put back, newest first. The error names the
 * section.
 */
export function writeState(vcpu: Vcpu, ctx: StateContext, values: StateInput, asRequested: AsRequested = decoded): SectionName[] {
  const sections = sectionsToWrite(vcpu, ctx, values);
  const previous: [SectionName, unknown][] = [];
  for (const s of sections) {
    const msrIndices = s === 'msrs' ? (values.msrs ?? []).map((e) => e.index) : [];
    // The byte sections' previous values stay the kernel's bytes: decoded only if a rollback needs them.
    previous.push([s, isByteSection(s) ? vcpu.getSectionBytes(s) : readSection(vcpu, s, msrIndices, [])]);
    try {
      writeSection(vcpu, s, values[s]);
    } catch (e) {
      const rollback = restore(vcpu, previous);
      throw sectionFailure(s, e, decoded(s, previous[previous.length - 1][1]), asRequested(s, values[s]), rollback);
    }
  }
  return sections;
}

/**
 * A section's value as its request spelled it, for the error naming a refused write's changed fields (in
 * the order of its keys): SetState passes convert/state-bytes.ts's, whose keys are in the converters' order.
 */
export type AsRequested = (s: SectionName, value: unknown) => unknown;

/** A section's value decoded when it is given as kernel bytes (a byte section), else as it is. */
function decoded(s: SectionName, value: unknown): unknown {
  return Buffer.isBuffer(value) && isByteSection(s) ? SECTIONS[s].decode(value) : value;
}

/** The sections of `values` a write applies, in restore order, each checked (nothing written yet). */
function sectionsToWrite(vcpu: Vcpu, ctx: StateContext, values: StateInput): SectionName[] {
  // A section this host cannot write (e.g. tsc_khz without KVM_CAP_TSC_CONTROL) is accepted when it
  // asks for the value the vCPU already has, so GetState's output can always be sent back.
  const sections = RESTORE_ORDER.filter((s) => values[s] !== undefined && !unchangedButUnwritable(vcpu, ctx, s, values[s]));
  for (const s of sections) checkSupported(ctx, s, 'write');
  checkSharedMsrs(vcpu, values);
  return sections;
}

/**
 * writeState for a vCPU no one has seen yet, in a VM that is destroyed if this fails (a restore or a
 * migration's commit): the same sections, order and checks, but nothing is read back first, since
 * there is nothing to roll back to. Those reads were over half of a migration's restore, inside the
 * guest's paused window (BENCHMARKS.md, "switch-over fixed costs").
 */
export function writeFreshState(vcpu: Vcpu, ctx: StateContext, values: StateInput): SectionName[] {
  const sections = sectionsToWrite(vcpu, ctx, values);
  for (const s of sections) {
    try {
      writeSection(vcpu, s, values[s]);
    } catch (e) {
      throw sectionFailure(s, e, undefined, decoded(s, values[s]), [], 'the new vCPU is discarded');
    }
  }
  return sections;
}

// ---- the rollback model: what each section writes besides its own fields, and the undo that follows ----

type SregsLike = SectionValues['sregs'] | SectionValues['sregs2'];

/** One piece of vCPU state that two sections write: a field of `section` that is also MSR `msr`. */
interface SharedState {
  msr: number;
  /** The field's name in `section` (as the request spells it). */
  field: string;
  get(s: SregsLike): bigint;
  set(s: SregsLike, v: bigint): void;
}

/**
 * KVM keeps one copy of EFER, the APIC base and the FS/GS bases: KVM_SET_SREGS(2) writes them as
 * sregs fields and KVM_SET_MSRS as MSRs 0xc0000080, 0x1b, 0xc0000100/1, with different checks
 * (host-initiated MSR writes skip SET_SREGS's consistency checks, EFER.LME/LMA against CR0.PG and
 * CS.L; SET_SREGS takes non-canonical bases that KVM_SET_MSRS refuses). Everything below about
 * overlapping sections follows from this table:
 * - a request may set them only through sregs; in msrs they may only repeat the sregs value
 *   (checkSharedMsrs), or the vCPU could be left in a state one of the two ioctls refuses to restore;
 * - the undo runs newest first (restore), since a section's saved value was read after the earlier
 *   sections were written;
 * - an MSR that sregs also writes is put back through KVM_SET_SREGS (restoreMsrs), which takes back
 *   any value it or a guest put there.
 */
const SREGS_SHARED: readonly SharedState[] = [
  { msr: 0xc0000080, field: 'efer', get: (s) => s.efer, set: (s, v) => void (s.efer = v) },
  { msr: 0x1b, field: 'apic_base', get: (s) => s.apicBase, set: (s, v) => void (s.apicBase = v) },
  { msr: 0xc0000100, field: 'fs.base', get: (s) => s.fs.base, set: (s, v) => void (s.fs.base = v) },
  { msr: 0xc0000101, field: 'gs.base', get: (s) => s.gs.base, set: (s, v) => void (s.gs.base = v) },
];

/** Which state each section writes besides its own fields (sections not listed write only their own). */
export const ALSO_WRITES: Readonly<Partial<Record<SectionName, readonly SharedState[]>>> = {
  sregs: SREGS_SHARED,
  sregs2: SREGS_SHARED,
};

/** MSR index -> the sregs field that is the same state. */
const MSR_IN_SREGS: ReadonlyMap<number, SharedState> = new Map(SREGS_SHARED.map((f) => [f.msr, f]));

/** Shared MSRs in a request's msrs must repeat the sregs value (the request's, else the vCPU's). */
function checkSharedMsrs(vcpu: Vcpu, values: StateInput): void {
  const violations: Violation[] = [];
  let sregs: SregsLike | undefined;
  (values.msrs ?? []).forEach((e, i) => {
    const shared = MSR_IN_SREGS.get(e.index);
    if (!shared) return;
    sregs ??= values.sregs ? (decoded('sregs', values.sregs) as SregsLike) : values.sregs2 ? (decoded('sregs2', values.sregs2) as SregsLike) : vcpu.getSregs();
    const current = shared.get(sregs);
    if (current !== e.data)
      violations.push({
        rule: 'msrs.sregs_field',
        field: `state.msrs.entries[${i}]`,
        message: `MSR 0x${e.index.toString(16)} (${msrName(e.index)}) is sregs.${shared.field}: set it there (0x${e.data.toString(16)} differs from 0x${current.toString(16)})`,
      });
  });
  if (violations.length) throw invalidArgument(violations.map((v) => v.message).join('; '), violations);
}

function unchangedButUnwritable(vcpu: Vcpu, ctx: StateContext, s: SectionName, value: unknown): boolean {
  if (ctx.caps.sections[s].writable || !ctx.caps.sections[s].readable) return false;
  return isDeepStrictEqual(readSection(vcpu, s, [], []), decoded(s, value));
}

/**
 * Undoes the writes newest first. Each saved value was read just before its own write, so after the
 * writes before it; where sections share state (ALSO_WRITES), undoing oldest first would put the
 * shared state back to the intermediate value a later section saw (the 100,000-request fuzz soak found
 * apic_base left at the refused request's value).
 */
function restore(vcpu: Vcpu, previous: [SectionName, unknown][]): string[] {
  const failures: string[] = [];
  for (const [s, v] of [...previous].reverse()) {
    try {
      if (s === 'msrs') restoreMsrs(vcpu, v as MsrEntry[]);
      // Written from its decoded value, as the section's typed setter encodes it (reserved bytes zero).
      else writeSection(vcpu, s, decoded(s, v));
    } catch (e) {
      failures.push(`${s}: ${(e as Error).message}`);
    }
  }
  return failures;
}

/**
 * Puts back the saved MSRs that now differ, each through the section that owns it: only changed ones,
 * since an MSR the failed set never reached may hold a value KVM_SET_MSRS refuses though another ioctl
 * accepted it (EFER with reserved bits via SET_SREGS), and writing it back unchanged would fail the
 * rollback for nothing; the shared ones through KVM_SET_SREGS, for the same reason.
 */
function restoreMsrs(vcpu: Vcpu, saved: MsrEntry[]): void {
  const now = new Map(vcpu.getMsrs(saved.map((e) => e.index)).entries.map((e) => [e.index, e.data]));
  const changed = saved.filter((e) => now.get(e.index) !== e.data);
  const viaSregs = changed.filter((e) => MSR_IN_SREGS.has(e.index));
  if (viaSregs.length) {
    const sregs = vcpu.getSregs();
    for (const e of viaSregs) MSR_IN_SREGS.get(e.index)!.set(sregs, e.data);
    vcpu.setSregs(sregs);
  }
  writeSection(
    vcpu,
    'msrs',
    changed.filter((e) => !MSR_IN_SREGS.has(e.index)),
  );
}

/** KVM_SET_MSRS refused entries[position]: no errno (the ioctl returns a short count), but the MSR is known. */
function msrRefused(entries: MsrEntry[], position: number): VcpudError {
  const { index, data } = entries[position];
  const field = `state.msrs.entries[${position}]`;
  const msr = `MSR 0x${index.toString(16)} (${msrName(index)})`;
  return new VcpudError('invalid_argument', `KVM_SET_MSRS refused ${msr} = 0x${data.toString(16)}: ${position} of ${entries.length} were set`, {
    reason: 'KERNEL_REJECTED',
    ioctl: 'KVM_SET_MSRS',
    field,
    msr: { index, position },
    violations: [{ rule: 'msrs.kernel_refused', field, message: `${msr} = 0x${data.toString(16)} refused by KVM_SET_MSRS` }],
  });
}

/** The rule id of a kernel refusal by `ioctl`, e.g. kernel.set_sregs. */
const kernelRule = (ioctl: string) => `kernel.${ioctl.replace(/^KVM_/, '').toLowerCase()}`;

/** ffi paths whose proto field has another name (mp_state is set through `value` or `kvm_value`). */
const PROTO_PATHS: ReadonlyMap<string, string> = new Map([['state.mp_state.mp_state', 'state.mp_state']]);

/**
 * The request fields (proto paths under state.<section>) whose value differs from what the vCPU
 * held before the write: the kernel refused one of them. Raw sections (xsave, lapic) are one field.
 */
function changedFields(before: unknown, after: unknown, path: string): string[] {
  if (Array.isArray(after) && Array.isArray(before)) return after.flatMap((v, i) => changedFields(before[i], v, `${path}[${i}]`));
  if (after && before && typeof after === 'object' && typeof before === 'object' && !Buffer.isBuffer(after))
    return Object.entries(after).flatMap(([k, v]) => changedFields((before as Record<string, unknown>)[k], v, `${path}.${snakeCase(k)}`));
  return isDeepStrictEqual(before, after) ? [] : [PROTO_PATHS.get(path) ?? path];
}

/**
 * A section's ioctl refused the request's value: one BadRequest violation naming the field when
 * the request changed exactly one, else the section (listing what changed).
 */
function refusalViolation(section: SectionName, e: KvmError, before: unknown, requested: unknown): Violation {
  const changed = changedFields(before, requested, `state.${section}`);
  const field = changed.length === 1 ? changed[0] : `state.${section}`;
  const which = changed.length > 1 ? ` (one of the changed fields: ${changed.slice(0, 8).join(', ')}${changed.length > 8 ? ', ...' : ''})` : '';
  return { rule: kernelRule(e.ioctl), field, message: `${e.ioctl} refused the value with ${e.code}${which}` };
}

/**
 * The error of a failed section write, after the rollback: the failure's own kind and reason (a
 * KvmError is classified by classifyErrno; KERNEL_REJECTED refusals name the field), or
 * ROLLBACK_FAILED when putting the vCPU back failed too.
 */
function sectionFailure(
  section: SectionName,
  e: unknown,
  before: unknown,
  requested: unknown,
  rollbackFailures: string[],
  afterwards = 'every section already applied was restored',
): VcpudError {
  const restored = rollbackFailures.length ? `; rollback FAILED for ${rollbackFailures.join(', ')}` : `; ${afterwards}`;
  const message = `SetState failed at section ${section}: ${(e as Error).message}${restored}`;
  const details: ErrorDetails = { ...(e instanceof VcpudError ? e.details : {}), section };
  if (e instanceof KvmError && details.reason === 'KERNEL_REJECTED') {
    const violation = refusalViolation(section, e, before, requested);
    details.field = violation.field;
    details.violations = [violation];
  }
  if (rollbackFailures.length) return new VcpudError('internal', message, { ...details, reason: 'ROLLBACK_FAILED' }, { cause: e });
  return new VcpudError(e instanceof VcpudError ? e.kind : 'internal', message, details, { cause: e });
}

// ---- nested state ----

/**
 * Facts about the target vCPU that the nested-state rules need (read from the vCPU itself); `maxSize` is
 * the VM's KVM_CAP_NESTED_STATE size as the nested-state gate (Vcpu.requireNestedState) answered it.
 */
function nestedTarget(vcpu: Vcpu, caps: HostCapabilities, maxSize: number) {
  const cpuid = vcpu.getCpuid2();
  const sregs = vcpu.getSregs();
  const events = vcpu.getVcpuEvents();
  return {
    vendor: caps.vendor === 'intel' ? ('intel' as const) : ('amd' as const),
    maxSize,
    maxPhysAddrBits: maxPhysAddrBits(cpuid),
    guestHasVmx: hasBit(cpuid, VMX_BIT),
    guestHasSvm: hasBit(cpuid, SVM_BIT),
    efer: sregs.efer,
    cr0: sregs.cr0,
    inSmm: events.smi.smm !== 0,
    hostHasNpt: true,
  };
}

/** KVM_GET_NESTED_STATE behind the nested-state gate (UnsupportedError naming KVM_CAP_NESTED_STATE when the VM has none). */
export function readNested(vcpu: Vcpu): Buffer {
  return vcpu.getNestedState();
}

/**
 * KVM_SET_NESTED_STATE after validation (every violation listed). A refused SET can leave the vCPU
 * changed (the kernel leaves nested mode before its last checks), so the whole vCPU state, nested
 * included, is captured first and put back when the kernel refuses.
 *
 * The rollback puts nested state back FIRST, the reverse of the restore order, because here the
 * sections were read in the mode the vCPU was in, and the saved blob is what puts it back in that mode:
 * in guest mode the captured regs/sregs/msrs are L2's, and re-entering guest mode
 * (SET_NESTED_STATE with GUEST_MODE) loads L2's state from the blob's vmcs12/vmcb12. Written after
 * it, the captured sections land in the context they were read from and are the final word. Written
 * before it, they would go into L1's context (the refused SET left nested mode), and the re-entry
 * would then overwrite them. The checks that make the restore order put sregs and events first
 * (EFER.SVME, SMM) hold: the saved blob was read with those values, and the refused SET only left
 * nested mode.
 */
export function writeNested(vcpu: Vcpu, ctx: StateContext, blob: Buffer, opts: { skipValidation?: boolean } = {}): void {
  // The gate first: a VM without nested state is refused as such, not by the validator's size rule.
  const maxSize = vcpu.requireNestedState('KVM_SET_NESTED_STATE');
  // With validation skipped (test only) the kernel judges the blob, but only one it can read: the structural rules hold always.
  const violations = opts.skipValidation ? validateNestedStructure(blob) : validateNestedState(blob, nestedTarget(vcpu, ctx.caps, maxSize));
  if (violations.length)
    throw new VcpudError(
      'invalid_argument',
      `nested state rejected by ${violations.length} rule(s): ${violations.map((v) => `${v.rule} (${v.field}): ${v.message}`).join('; ')}`,
      { reason: 'INVALID_NESTED_STATE', violations },
    );
  const before = readState(vcpu, ctx, []);
  const nestedBefore = vcpu.getNestedState();
  try {
    vcpu.setNestedState(blob);
  } catch (e) {
    let restoreError = '';
    try {
      vcpu.setNestedState(nestedBefore);
      writeState(vcpu, ctx, before.values);
    } catch (r) {
      restoreError = `; restoring the previous state FAILED: ${(r as Error).message}`;
    }
    const details: ErrorDetails = { ...(e instanceof VcpudError ? e.details : {}), ioctl: 'KVM_SET_NESTED_STATE' };
    if (restoreError) details.reason = 'ROLLBACK_FAILED';
    else if (e instanceof KvmError && details.reason === 'KERNEL_REJECTED')
      details.violations = [{ rule: kernelRule(e.ioctl), field: 'raw', message: `${e.code} from ${e.ioctl}` }];
    const kind = restoreError ? 'internal' : e instanceof VcpudError ? e.kind : 'internal';
    throw new VcpudError(
      kind,
      `KVM_SET_NESTED_STATE refused the blob: ${(e as Error).message}${restoreError || '; the previous state was restored'}`,
      details,
      { cause: e },
    );
  }
}

/** Runs state work on a managed vCPU: paused around it when running, refused if asked. */
export function onVcpu<T>(m: ManagedVcpu, fn: (v: Vcpu) => T, opts: StateAccessOptions = {}): Promise<T> {
  return m.withState(() => fn(m.vcpu), opts);
}
