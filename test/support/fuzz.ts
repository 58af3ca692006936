/**
 * A seeded request fuzzer for vcpud: every run is reproducible from its seed. It mutates nested-state
 * blobs (both formats, boundary sizes, every flag combination, PA values at and around the limits)
 * and regs / sregs / MSRs / events, and sends oversized messages and wrong types.
 */
import { status } from '@grpc/grpc-js';
import { GOLDEN, F } from './nested-blobs';

/** mulberry32: small, fast, and good enough to spread inputs; the seed is the whole state. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  u64(): bigint {
    return (BigInt(this.int(2 ** 32)) << 32n) | BigInt(this.int(2 ** 32));
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i++) b[i] = this.int(256);
    return b;
  }
}

const ALL_FLAGS = [0, F.GUEST_MODE, F.RUN_PENDING, F.EVMCS, F.MTF_PENDING, F.GIF_SET, 0x10, 0x200, 0x8000];

/** Interesting 64-bit values: zero, all ones, page boundaries, around 2^36/2^48/2^52 (MAXPHYADDR). */
export function interestingU64(r: Rng): bigint {
  const bases = [0n, 1n, 0xfffn, 0x1000n, 0x1001n, 1n << 36n, 1n << 48n, 1n << 52n, 1n << 63n, (1n << 64n) - 1n];
  const b = r.pick(bases);
  const delta = BigInt(r.int(3)) - 1n;
  const v = b + delta * (r.chance(0.5) ? 1n : 0x1000n);
  return v < 0n ? 0n : v >= 1n << 64n ? (1n << 64n) - 1n : v;
}

/** A mutated nested-state blob, from one of the golden blobs of both formats. */
export function mutateNested(r: Rng): Buffer {
  const golden = Object.values(GOLDEN);
  return mutateBlob(r, r.pick(golden)());
}

/**
 * 1-4 random edits of a blob's header (flags, format, size, PA fields, VMX smm/header flags), byte
 * flips, truncation or extension, or random bytes instead. `blob` may be changed in place.
 */
export function mutateBlob(r: Rng, blob: Buffer): Buffer {
  const ops = 1 + r.int(4);
  for (let i = 0; i < ops; i++) {
    const op = r.int(8);
    if (op <= 3 && blob.length < 24) continue; // header edits need a header (truncation may have cut it)
    switch (op) {
      case 0: // every flag combination over time
        blob.writeUInt16LE(
          ALL_FLAGS.filter(() => r.chance(0.3)).reduce((a, b) => a | b, 0),
          0,
        );
        break;
      case 1:
        blob.writeUInt16LE(r.pick([0, 1, 2, 0xffff]), 2);
        break;
      case 2: // size field at boundaries, sometimes lying about the buffer
        blob.writeUInt32LE(r.pick([0, 127, 128, 129, 4224, 4223, 8320, 8321, 0xffffffff, blob.length]), 4);
        break;
      case 3: // PA fields of both header formats
        blob.writeBigUInt64LE(interestingU64(r), r.pick([8, 16]));
        break;
      case 4: // flip bytes anywhere
        for (let k = 0; k < 1 + r.int(8); k++) if (blob.length) blob[r.int(blob.length)] ^= 1 << r.int(8);
        break;
      case 5: // truncate or extend
        blob = r.chance(0.5) ? blob.subarray(0, r.int(blob.length + 1)) : Buffer.concat([blob, r.bytes(r.int(256))]);
        break;
      case 6: // smm and header flags (VMX)
        if (blob.length >= 32) {
          blob.writeUInt16LE(r.int(8), 24);
          blob.writeUInt32LE(r.pick([0, 1, 2, 0x80000000]), 28);
        }
        break;
      case 7:
        blob = r.bytes(r.pick([0, 1, 8, 127, 128, 4224, 8320]));
        break;
    }
  }
  return blob;
}

const GPRS = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'];
const SEGMENTS = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'];
const CRS = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'];
const MSRS = [
  0x10, 0x1b, 0x3a, 0x174, 0x175, 0x176, 0x1a0, 0x277, 0x6e0, 0xc0000080, 0xc0000081, 0xc0000082, 0xc0000100, 0xc0000101, 0xc0000102, 0xc0010117, 0x4b564d00,
  0x4b564d01, 0x4b564d06,
];

/** A random value of a proto uint64 field (the wire format has no malformed uint64 to send). */
function u64Field(r: Rng): string {
  return (r.chance(0.5) ? interestingU64(r) : r.u64()).toString();
}

/** A SetState request body derived from `current` (a GetState response state) with random edits. */
export function mutateState(r: Rng, current: Record<string, any>): Record<string, unknown> {
  const state: Record<string, unknown> = {};
  const kinds = 1 + r.int(3);
  for (let i = 0; i < kinds; i++) {
    switch (r.int(5)) {
      case 0: {
        const regs = { ...current.regs };
        for (let k = 0; k < 1 + r.int(4); k++) regs[r.pick(GPRS)] = u64Field(r);
        state.regs = regs;
        break;
      }
      case 1: {
        const sregs = JSON.parse(JSON.stringify(current.sregs));
        for (let k = 0; k < 1 + r.int(3); k++) {
          if (r.chance(0.5)) sregs[r.pick(CRS)] = u64Field(r);
          else {
            const seg = sregs[r.pick(SEGMENTS)];
            const f = r.pick(['base', 'limit', 'selector', 'type', 'dpl', 'present', 'l', 'db', 'g', 's']);
            seg[f] = f === 'base' ? u64Field(r) : typeof seg[f] === 'boolean' ? r.chance(0.5) : r.pick([0, 1, 3, 4, 15, 16, 255, 65535, 65536, 2 ** 32 - 1]);
          }
        }
        state.sregs = sregs;
        break;
      }
      case 2: {
        const n = 1 + r.int(4);
        state.msrs = { entries: Array.from({ length: n }, () => ({ index: r.chance(0.8) ? r.pick(MSRS) : r.int(2 ** 32), data: u64Field(r) })) };
        break;
      }
      case 3: {
        const ev = JSON.parse(JSON.stringify(current.vcpuEvents));
        const part = r.pick(['exception', 'interrupt', 'nmi', 'smi']);
        for (const k of Object.keys(ev[part] ?? {})) if (r.chance(0.4)) ev[part][k] = typeof ev[part][k] === 'boolean' ? r.chance(0.5) : r.int(300);
        if (r.chance(0.3)) ev.flags = r.int(64);
        state.vcpuEvents = ev;
        break;
      }
      case 4: {
        const d = { ...current.debugregs, dr7: u64Field(r), dr6: u64Field(r) };
        state.debugregs = d;
        break;
      }
    }
  }
  return state;
}

/**
 * Codes vcpud documents for bad input (README "Errors"): a fuzzed request answered with anything
 * else is a finding. Undecodable bytes are one of them: INVALID_ARGUMENT (src/server/undecodable-request.ts).
 */
export const DOCUMENTED_CODES: ReadonlySet<number> = new Set([
  status.INVALID_ARGUMENT,
  status.FAILED_PRECONDITION,
  status.NOT_FOUND,
  status.RESOURCE_EXHAUSTED,
]);

/** Answers counted by key (e.g. "set_nested:INVALID_ARGUMENT"), printed at the end of a run. */
export class Tally {
  readonly counts: Record<string, number> = {};
  count(key: string): void {
    this.counts[key] = (this.counts[key] ?? 0) + 1;
  }
  /** Keys sorted, for a stable line in logs and RELIABILITY.md. */
  toString(): string {
    return JSON.stringify(Object.fromEntries(Object.entries(this.counts).sort(([a], [b]) => a.localeCompare(b))));
  }
}
