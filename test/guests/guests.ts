/**
 * Metadata for the test guests in this directory (flat x86 binaries assembled
 * by scripts/build-guests.sh into test/guests/build/). The ABI they share is
 * described in README.md; GUEST_ABI encodes the same numbers for tests.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

/** Ports, addresses and start state every guest relies on. */
export const GUEST_ABI = {
  /** Guest-physical load address and real-mode entry (CS.selector=0, CS.base=0, RIP=0x1000). */
  loadAddress: 0x1000,
  /** RAM must start at GPA 0 and be at least this large. */
  minMemoryBytes: 2 * 1024 * 1024,
  /** Register holding the 0-based vCPU index at entry. */
  vcpuIndexRegister: 'rsi',
  /** OUT of one byte: console output. */
  serialPort: 0x3f8,
  /** IN from here should return 0x20 (transmitter empty) if a guest polls it. */
  serialLsrPort: 0x3fd,
  /** 32-bit OUT: a value reported to the host. */
  debugPort: 0x500,
  /** 32-bit OUT: the guest is done; the value is its result code. */
  donePort: 0x501,
  /** Long-mode page tables: PML4, PDPT, 4 PDs (identity map of 0..4 GiB, 2 MiB pages). */
  pml4Address: 0x2000,
  pdptAddress: 0x3000,
  pdAddress: 0x4000,
  /** counter64 mirrors RBX of vCPU i at counterBase + 8*i. */
  counterBase: 0x9000,
  /** vCPU i's stack is [stackBase + i*stackSize, stackBase + (i+1)*stackSize). */
  stackBase: 0x10000,
  stackSize: 0x1000,
  maxVcpus: 64,
  /** unhandled64 writes 4 bytes (0xdeadbeef) here: mapped, not RAM, so an MMIO exit. */
  mmioAddress: 0xd000_0000,
} as const;

export type GuestName = 'real16' | 'prot32' | 'long64' | 'counter64' | 'unhandled64' | 'dirty64';

export interface GuestInfo {
  name: GuestName;
  /** Absolute path of the assembled flat binary. */
  file: string;
  loadAddress: number;
  entry: number;
  description: string;
}

/**
 * The build dir under the nearest ancestor holding the guest sources, so this
 * works from test/guests (ts-jest/swc) and from dist/test/guests (tsc output).
 * VCPUD_GUEST_DIR overrides where the .bin files are looked for.
 */
function findBuildDir(start: string): string {
  for (let dir = start; ; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'test', 'guests', 'real16.asm'))) return path.join(dir, 'test', 'guests', 'build');
    if (path.dirname(dir) === dir) return path.join(start, 'build'); // not in a checkout: next to this file
  }
}

export const GUEST_BUILD_DIR: string = process.env.VCPUD_GUEST_DIR ?? findBuildDir(__dirname);

function guest(name: GuestName, description: string): GuestInfo {
  return {
    name,
    file: path.join(GUEST_BUILD_DIR, `${name}.bin`),
    loadAddress: GUEST_ABI.loadAddress,
    entry: GUEST_ABI.loadAddress,
    description,
  };
}

export const GUESTS: Readonly<Record<GuestName, GuestInfo>> = {
  real16: guest('real16', 'Real mode: prints "real mode ok\\n", reports 16, done(0), HLT loop.'),
  prot32: guest('prot32', '32-bit protected mode: prints "protected mode ok\\n", reports 32, done(0), HLT loop.'),
  long64: guest('long64', '64-bit long mode: prints "long mode ok\\n", reports 64, done(0), HLT loop.'),
  counter64: guest(
    'counter64',
    'Long mode, counts forever in RBX: each iteration inc rbx, store to 0x9000+8*vcpu, print rbx in decimal + "\\n", OUT ebx to 0x500. Never halts.',
  ),
  unhandled64: guest(
    'unhandled64',
    'Long mode: prints "mmio next\\n", then writes 0xdeadbeef (4 bytes) to GPA 0xd0000000 (KVM_EXIT_MMIO); if resumed, done(1) and HLT loop.',
  ),
  dirty64: guest(
    'dirty64',
    'Long mode, one vCPU: writes a counter (RBX) into the pages of a range round robin, paced by rdtsc; parameters in the control block at 0x8000 (DIRTY64). No exits while it runs; done(0) at its limit.',
  ),
};

/** dirty64's control block (README.md): u64 words the host writes, and the one the guest writes. */
export const DIRTY64 = {
  control: 0x8000,
  rangeStart: 0x00,
  rangePages: 0x08,
  burstPages: 0x10,
  cyclesPerBurst: 0x18,
  limit: 0x20,
  /** Written by the guest: the last value written (RBX), after each page. */
  lastValue: 0x28,
  defaultRangeStart: 0x100000,
  defaultRangePages: 256,
} as const;

export interface Dirty64Params {
  rangeStart: number;
  rangePages: number;
  /** Target rate; omitted or 0: unpaced. Needs tscKhz. */
  bytesPerSecond?: number;
  tscKhz?: number;
  /** Pages per burst (default: enough for about 1024 bursts a second, at least 1). */
  burstPages?: number;
  /** done(0) once this many pages were written (0: never). */
  limit?: number;
}

/** The control block's bytes for these parameters (write them at DIRTY64.control). */
export function dirty64Control(p: Dirty64Params): Buffer {
  const b = Buffer.alloc(0x28);
  const pagesPerSecond = (p.bytesPerSecond ?? 0) / 4096;
  const burst = p.burstPages ?? Math.max(1, Math.round(pagesPerSecond / 1024));
  let cycles = 0n;
  if (pagesPerSecond > 0) {
    if (!p.tscKhz) throw new Error('dirty64Control: a paced rate needs tscKhz');
    cycles = BigInt(Math.max(1, Math.round((p.tscKhz * 1000 * burst) / pagesPerSecond)));
  }
  b.writeBigUInt64LE(BigInt(p.rangeStart), DIRTY64.rangeStart);
  b.writeBigUInt64LE(BigInt(p.rangePages), DIRTY64.rangePages);
  b.writeBigUInt64LE(BigInt(burst), DIRTY64.burstPages);
  b.writeBigUInt64LE(cycles, DIRTY64.cyclesPerBurst);
  b.writeBigUInt64LE(BigInt(p.limit ?? 0), DIRTY64.limit);
  return b;
}

/**
 * The value dirty64 leaves in page j of its range after writing 1..counter: the largest
 * k <= counter with (k-1) mod pages == j, or 0 when it has not reached page j yet.
 */
export function dirty64Expected(counter: bigint, pages: number, j: number): bigint {
  const n = BigInt(pages);
  const jj = BigInt(j);
  if (counter <= jj) return 0n;
  return ((counter - 1n - jj) / n) * n + jj + 1n;
}

export const GUEST_LIST: readonly GuestInfo[] = Object.values(GUESTS);

/** True when every guest binary exists (scripts/build-guests.sh has run). */
export function guestsBuilt(): boolean {
  return GUEST_LIST.every((g) => fs.existsSync(g.file));
}
