/**
 * Dirty logging and page frames, the mechanism under live migration:
 * - what harvesting the dirty log costs per GiB of guest memory: KVM_GET_DIRTY_LOG (which also
 *   re-protects) against manual protect (GET, then KVM_CLEAR_DIRTY_LOG of the chunks), idle and
 *   with dirty64 writing; and what starting the log costs on populated memory in each mode;
 * - packPages and applyFrames throughput (random pages, and zero pages) against a memcpy of the
 *   same bytes out of the same guest memory (GuestMemory.read: the floor for any copy out of it).
 * Reported only (the issue sets no target on these). Run alone: npx tsc -p tsconfig.json && node dist/bench/dirty-log.js
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { dirtyBitmapBytes, type DirtyLogMode } from '../src/ffi/dirty-log';
import { Kvm } from '../src/ffi/kvm';
import { native, type NativeGuestMemory } from '../src/ffi/native';
import type { ManagedVm } from '../src/vm/managed-vm';
import { VmRegistry } from '../src/vm/registry';
import { countBits } from '../src/vm/snapshot-format';
import { DIRTY64, dirty64Control } from '../test/guests/guests';
import { MiB, fatal, guestBin, knob, median, ratioRow, table, type BenchResult, type BenchRow } from './floors';

const GUEST_MIB = Number(knob('BENCH_DIRTY_MIB', '1024', 'dirty-log: guest memory in MiB for the harvest figures'));
const FRAME_MIB = Number(knob('BENCH_FRAME_MIB', '256', 'dirty-log: memory packed and applied per round in MiB'));
const ROUNDS = Number(knob('BENCH_DIRTY_ROUNDS', '11', 'dirty-log: rounds per figure (medians)'));
const CLEAR_CHUNK = 1 << 15; // pages per KVM_CLEAR_DIRTY_LOG (128 MiB), as an engine clears before it sends
const OUT_BYTES = 4 * MiB; // one packPages output buffer: about what a socket write takes at once
const GiB = 1024 * MiB;
const PAGE = 4096;

const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function timeMs(fn: () => Promise<unknown> | unknown): Promise<number> {
  const t = nowMs();
  await fn();
  return nowMs() - t;
}

/** A VM of GUEST_MIB whose memory is all touched (non-zero), dirty64 loaded, paused. */
async function populatedVm(registry: VmRegistry): Promise<ManagedVm> {
  const vm = registry.create({ memoryBytes: GUEST_MIB * MiB, vcpuCount: 1 });
  const pattern = crypto.randomBytes(4 * MiB);
  for (let off = 4 * MiB; off < GUEST_MIB * MiB; off += pattern.length) vm.writeMemory(off, pattern);
  await vm.loadProgram(fs.readFileSync(guestBin('dirty64')), 0x1000);
  return vm;
}

interface HarvestFigures {
  startMs: number;
  idleMs: number;
  busyMs: number;
  /** Of busyMs, the KVM_CLEAR_DIRTY_LOG calls (manual modes). */
  busyClearMs: number;
  busyPages: number;
}

/** Start cost, then harvest cost (GET, or GET + CLEAR in chunks) idle and while dirty64 writes. */
async function harvestFigures(registry: VmRegistry, mode: DirtyLogMode): Promise<HarvestFigures> {
  const vm = await populatedVm(registry);
  const pages = (GUEST_MIB * MiB) / PAGE;
  const bm = Buffer.alloc(dirtyBitmapBytes(GUEST_MIB * MiB));
  let clearMs = 0;
  const harvest = async () => {
    await vm.vm.harvestDirtyLog(0, bm);
    const t = nowMs();
    if (mode !== 'get') for (let first = 0; first < pages; first += CLEAR_CHUNK) await vm.vm.clearDirtyLog(0, first, Math.min(CLEAR_CHUNK, pages - first), bm);
    clearMs = nowMs() - t;
  };
  const startMs = await timeMs(() => vm.vm.startDirtyLog(0, mode));
  await harvest(); // initially-set: the first harvest hands over (and protects) everything
  const idle: number[] = [];
  for (let i = 0; i < ROUNDS; i++) idle.push(await timeMs(harvest));
  // dirty64 unpaced over 64 MiB: as fast as this host lets a vCPU write.
  vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: 64 * MiB, rangePages: (64 * MiB) / PAGE, burstPages: 64 }));
  await vm.resumeAll();
  const busy: number[] = [];
  const busyClear: number[] = [];
  const dirtied: number[] = [];
  for (let i = 0; i < ROUNDS; i++) {
    await sleep(50);
    busy.push(await timeMs(harvest));
    busyClear.push(clearMs);
    dirtied.push(countBits(bm, bm.length * 8));
  }
  await vm.pauseAll();
  registry.destroyAll();
  const perGiB = (ms: number) => ms / (GUEST_MIB / 1024);
  return {
    startMs: perGiB(startMs),
    idleMs: perGiB(median(idle)),
    busyMs: perGiB(median(busy)),
    busyClearMs: perGiB(median(busyClear)),
    busyPages: median(dirtied),
  };
}

interface Throughput {
  packGiBs: number;
  applyGiBs: number;
  floorGiBs: number;
  zeroPackGiBs: number;
  zeroApplyGiBs: number;
}

/** Packs all of `src` (every page selected) through one OUT_BYTES buffer, applying each batch to `dst`; ms spent in each. */
async function packApplyAll(src: NativeGuestMemory, dst: NativeGuestMemory, bitmap: Buffer, out: Buffer): Promise<{ packMs: number; applyMs: number }> {
  let packMs = 0;
  let applyMs = 0;
  const pages = src.size / PAGE;
  let seq = 0n;
  for (let page = 0; page < pages; ) {
    let t = nowMs();
    const r = await src.packPages(bitmap, page, out, { seq });
    packMs += nowMs() - t;
    t = nowMs();
    await dst.applyFrames(out.subarray(0, r.bytes));
    applyMs += nowMs() - t;
    seq += BigInt(r.frames);
    page = r.nextPage;
  }
  return { packMs, applyMs };
}

async function frameThroughput(): Promise<Throughput> {
  const bytes = FRAME_MIB * MiB;
  const src = new native.GuestMemory(bytes);
  const dst = new native.GuestMemory(bytes);
  const zeroSrc = new native.GuestMemory(bytes);
  const zeroDst = new native.GuestMemory(bytes);
  try {
    const chunk = crypto.randomBytes(4 * MiB);
    for (let off = 0; off < bytes; off += chunk.length) src.write(off, chunk);
    const all = Buffer.alloc(bytes / PAGE / 8, 0xff);
    const out = Buffer.alloc(OUT_BYTES);
    const pack: number[] = [];
    const apply: number[] = [];
    const zeroPack: number[] = [];
    const zeroApply: number[] = [];
    const floor: number[] = [];
    // Interleaved, so the load of a shared host weighs on the floor and the figures alike.
    for (let i = 0; i < ROUNDS; i++) {
      // Floor: the same bytes copied out of the same guest memory into the same buffer (a memcpy).
      floor.push(
        await timeMs(() => {
          for (let off = 0; off < bytes; off += OUT_BYTES) src.read(off, out);
        }),
      );
      const r = await packApplyAll(src, dst, all, out);
      pack.push(r.packMs);
      apply.push(r.applyMs);
      const z = await packApplyAll(zeroSrc, zeroDst, all, out);
      zeroPack.push(z.packMs);
      zeroApply.push(z.applyMs);
    }
    const gibs = (ms: number) => bytes / GiB / (ms / 1000);
    return {
      packGiBs: gibs(median(pack)),
      applyGiBs: gibs(median(apply)),
      floorGiBs: gibs(median(floor)),
      zeroPackGiBs: gibs(median(zeroPack)),
      zeroApplyGiBs: gibs(median(zeroApply)),
    };
  } finally {
    for (const m of [src, dst, zeroSrc, zeroDst]) m.release();
  }
}

/** The rate dirty64 reaches when asked for `mibs` MiB/s (0: unpaced), over one second. */
async function dirty64Rate(registry: VmRegistry, mibs: number): Promise<number> {
  const vm = registry.create({ memoryBytes: 512 * MiB, vcpuCount: 1 });
  await vm.loadProgram(fs.readFileSync(guestBin('dirty64')), 0x1000);
  const tscKhz = vm.vcpu(0).vcpu.getTscKhz();
  vm.writeMemory(
    DIRTY64.control,
    dirty64Control({ rangeStart: 64 * MiB, rangePages: (256 * MiB) / PAGE, bytesPerSecond: mibs * MiB, tscKhz, burstPages: mibs ? undefined : 64 }),
  );
  const written = () => vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0);
  await vm.resumeAll();
  await sleep(200);
  const c0 = written();
  const t0 = nowMs();
  await sleep(1000);
  const pages = Number(written() - c0);
  const s = (nowMs() - t0) / 1000;
  registry.destroyAll();
  return (pages * PAGE) / MiB / s;
}

export async function measureDirtyLog(): Promise<BenchResult> {
  const kvm = Kvm.open();
  const maxBytes = Math.max(GUEST_MIB, 512) * MiB;
  const registry = new VmRegistry(kvm, { maxVms: 1, maxVcpusPerVm: 1, maxMemoryPerVmBytes: maxBytes, maxMemoryTotalBytes: maxBytes });
  const modes: DirtyLogMode[] = ['get', 'manual', 'manual-initially-set'];
  const h: Record<string, HarvestFigures> = {};
  const rates: [number, number][] = [];
  try {
    for (const m of modes) h[m] = await harvestFigures(registry, m);
    for (const mibs of [64, 0]) rates.push([mibs, await dirty64Rate(registry, mibs)]);
  } finally {
    registry.destroyAll();
    kvm.close();
  }
  const t = await frameThroughput();
  const rows: BenchRow[] = [
    ratioRow('dirty-log harvest per GiB, idle: GET+CLEAR vs GET_DIRTY_LOG', h.manual.idleMs, h.get.idleMs, 'ms/GiB', 'KVM_GET_DIRTY_LOG'),
    ratioRow('dirty-log harvest per GiB, guest writing: GET+CLEAR vs GET_DIRTY_LOG', h.manual.busyMs, h.get.busyMs, 'ms/GiB', 'KVM_GET_DIRTY_LOG'),
    ratioRow('packPages, random pages', t.packGiBs, t.floorGiBs, 'GiB/s', 'memcpy out of guest memory'),
    ratioRow('applyFrames, random pages', t.applyGiBs, t.floorGiBs, 'GiB/s', 'memcpy out of guest memory'),
  ];
  const detail = [
    `harvest: a ${GUEST_MIB} MiB guest, every page touched; ms per GiB of guest memory, medians of ${ROUNDS}; manual modes clear in ${CLEAR_CHUNK}-page chunks;`,
    `"writing": dirty64 unpaced over 64 MiB, harvested every 50 ms\n`,
    table(
      ['mode', 'start log', 'harvest idle', 'harvest writing', 'of which CLEAR', 'pages dirty per harvest'],
      modes.map((m) => [m, h[m].startMs, h[m].idleMs, h[m].busyMs, h[m].busyClearMs, h[m].busyPages]),
    ),
    `\npage frames: ${FRAME_MIB} MiB, every page selected, ${OUT_BYTES / MiB} MiB output buffer, medians of ${ROUNDS}; GiB/s of guest memory covered\n`,
    table(
      ['operation', 'random pages GiB/s', 'ratio to memcpy', 'zero pages GiB/s'],
      [
        ['memcpy out of guest memory (GuestMemory.read, floor)', t.floorGiBs, 1, '-'],
        ['packPages (zero check, copy, CRC-32C)', t.packGiBs, t.packGiBs / t.floorGiBs, t.zeroPackGiBs],
        ['applyFrames (verify, copy)', t.applyGiBs, t.applyGiBs / t.floorGiBs, t.zeroApplyGiBs],
      ],
    ),
    `\ndirty64 (test/guests), asked for a rate, measured over 1 s\n`,
    table(
      ['asked', 'reached MiB/s'],
      rates.map(([asked, got]) => [asked ? `${asked} MiB/s` : 'unpaced (64-page bursts)', got]),
    ),
  ].join('\n');
  return { rows, detail };
}

async function main(): Promise<void> {
  console.log((await measureDirtyLog()).detail);
}

if (require.main === module) main().catch(fatal);
