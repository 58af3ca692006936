/**
 * Page frames (native/page_frames.h) between two GuestMemory objects, no KVM needed: what
 * applyFrames writes equals what packPages read, for random, zero and sparse selections and any
 * output size; every corruption is caught by the check that should catch it, before any byte of
 * that frame lands.
 */
import crypto from 'node:crypto';
import { native, type NativeGuestMemory } from '../../src/ffi/native';
import { applyFrames, PAGE_FRAME_FORMAT, PAGE_FRAME_VERSION } from '../../src/ffi/page-frames';

const PAGE = 4096;
const PAGES = 2048; // 8 MiB
const H = PAGE_FRAME_FORMAT.headerBytes;

function bitmapOf(pages: number[]): Buffer {
  const bm = Buffer.alloc(PAGES / 8);
  for (const p of pages) bm[p >> 3] |= 1 << (p & 7);
  return bm;
}

/** Source memory: even pages random, pages ≡ 1 mod 4 zero, the rest one non-zero byte at the end. */
function source(): NativeGuestMemory {
  const m = new native.GuestMemory(PAGES * PAGE);
  for (let p = 0; p < PAGES; p++) {
    if (p % 2 === 0) m.write(p * PAGE, crypto.randomBytes(PAGE));
    else if (p % 4 === 3) m.write(p * PAGE + PAGE - 1, Buffer.from([p & 0xff || 1]));
  }
  return m;
}

/** Packs everything `bitmap` selects through an `outBytes` buffer and applies each batch to `dst`. */
async function transfer(src: NativeGuestMemory, dst: NativeGuestMemory, bitmap: Buffer, outBytes: number, framePages?: number) {
  const out = Buffer.alloc(outBytes);
  let page = 0;
  let seq = 100n;
  const totals = { pages: 0, zeroPages: 0, frames: 0, calls: 0 };
  while (page < PAGES) {
    const r = await src.packPages(bitmap, page, out, { seq, framePages });
    expect(r.bytes).toBeGreaterThan(0);
    const a = await applyFrames(dst, out.subarray(0, r.bytes));
    expect(a).toMatchObject({ consumed: r.bytes, pages: r.pages, zeroPages: r.zeroPages, frames: r.frames, lastSeq: seq + BigInt(r.frames - 1) });
    totals.pages += r.pages;
    totals.zeroPages += r.zeroPages;
    totals.frames += r.frames;
    totals.calls++;
    seq += BigInt(r.frames);
    page = r.nextPage;
    if (totals.calls > PAGES) throw new Error('packPages makes no progress');
  }
  return totals;
}

function expectSamePages(a: NativeGuestMemory, b: NativeGuestMemory, pages: number[]) {
  const x = Buffer.alloc(PAGE);
  const y = Buffer.alloc(PAGE);
  for (const p of pages) {
    a.read(p * PAGE, x);
    b.read(p * PAGE, y);
    if (!x.equals(y)) throw new Error(`page ${p} differs`);
  }
}

describe('page frames', () => {
  const mems: NativeGuestMemory[] = [];
  const mem = (m: NativeGuestMemory) => (mems.push(m), m);
  afterEach(() => {
    for (const m of mems.splice(0)) m.release();
  });

  it('states its version once, from native', () => {
    expect(PAGE_FRAME_VERSION).toBe(2);
    expect(PAGE_FRAME_FORMAT.maxFrameBytes).toBe(H + PAGE_FRAME_FORMAT.maxFramePages * (8 + 4 + PAGE));
  });

  it.each([
    ['every page, a 1 MiB buffer', () => Array.from({ length: PAGES }, (_, i) => i), 1 << 20, undefined],
    ['every page, a buffer of one page frame', () => Array.from({ length: PAGES }, (_, i) => i), H + 8 + 4 + PAGE, undefined],
    [
      'sparse pages, odd buffer and frame sizes',
      () => Array.from({ length: PAGES }, (_, i) => i).filter((i) => i % 7 === 3 || i % 64 === 63),
      3 * PAGE + 1000,
      5,
    ],
    ['zero pages only, an 8 KiB buffer', () => Array.from({ length: PAGES / 4 }, (_, i) => 4 * i + 1), 2 * PAGE, undefined],
    ['the last page only', () => [PAGES - 1], 1 << 20, 1024],
  ] as const)('round trip: %s', async (_name, pagesOf, outBytes, framePages) => {
    const src = mem(source());
    const dst = mem(new native.GuestMemory(PAGES * PAGE));
    dst.write(5 * PAGE, Buffer.alloc(PAGE, 0xee)); // a zero page arriving over stale bytes must clear them
    const pages = pagesOf();
    const t = await transfer(src, dst, bitmapOf(pages), outBytes, framePages);
    expect(t.pages).toBe(pages.length);
    expect(t.zeroPages).toBe(pages.filter((p) => p % 4 === 1).length);
    expectSamePages(src, dst, pages);
    // Pages not selected were not touched.
    const unselected = Array.from({ length: PAGES }, (_, i) => i).filter((i) => !pages.includes(i) && i !== 5);
    const z = Buffer.alloc(PAGE);
    for (const p of unselected.slice(0, 64)) {
      dst.read(p * PAGE, z);
      expect(z.every((b) => b === 0)).toBe(true);
    }
  });

  it('an empty selection packs nothing and is done', async () => {
    const src = mem(source());
    const r = await src.packPages(bitmapOf([]), 0, Buffer.alloc(1 << 16), { seq: 0 });
    expect(r).toEqual({ nextPage: PAGES, bytes: 0, pages: 0, zeroPages: 0, frames: 0 });
  });

  it('refuses arguments that do not fit', async () => {
    const src = mem(source());
    expect(() => src.packPages(Buffer.alloc(10), 0, Buffer.alloc(1 << 16), { seq: 0 })).toThrow(/bitmap shorter/);
    expect(() => src.packPages(bitmapOf([1]), 0, Buffer.alloc(PAGE), { seq: 0 })).toThrow(/a frame of one page needs/);
    expect(() => src.packPages(bitmapOf([1]), PAGES + 1, Buffer.alloc(1 << 16), { seq: 0 })).toThrow(/beyond/);
    expect(() => src.packPages(bitmapOf([1]), 0, Buffer.alloc(1 << 16), { seq: 0, framePages: 5000 })).toThrow(/framePages/);
    expect(() => src.packPages(bitmapOf([1]), 0, Buffer.alloc(1 << 16), { seq: -1 })).toThrow(/seq/);
  });

  /** Three frames of 4 pages (pages 8..19: random, zero and sparse ones) packed from a fresh source. */
  async function threeFrames() {
    const src = mem(source());
    const out = Buffer.alloc(1 << 20);
    const r = await src.packPages(bitmapOf(Array.from({ length: 12 }, (_, i) => 8 + i)), 0, out, { seq: 7, framePages: 4 });
    expect(r.frames).toBe(3);
    const frames = out.subarray(0, r.bytes);
    const ends: number[] = [];
    for (let off = 0; off < frames.length; ) {
      off += H + 8 * frames.readUInt32LE(off + 16) + (4 + PAGE) * frames.readUInt32LE(off + 20);
      ends.push(off);
    }
    return { src, frames: Buffer.from(frames), ends };
  }

  /** Recomputes the CRCs of the frame at `off` after a deliberate edit, so a later check is reached. */
  function reseal(buf: Buffer, off: number) {
    const tableEnd = off + H + 8 * buf.readUInt32LE(off + 16) + 4 * buf.readUInt32LE(off + 20);
    buf.writeUInt32LE(native.crc32c(buf.subarray(off + H, tableEnd), native.crc32c(buf.subarray(off, off + 24))), off + 24);
    buf.writeUInt32LE(native.crc32c(buf.subarray(off, off + 28)), off + 28);
  }

  /** Marks the frame at `off` tearable (native/page_frames.h), its CRCs resealed. */
  function tearable(buf: Buffer, off: number) {
    buf.writeUInt16LE(2, off + 6);
    reseal(buf, off);
  }

  it.each([
    ['a flipped payload bit', 'crc', (b: Buffer, o: number) => (b[o + H + 4 * 8 + 3 * 4 + 100] ^= 0x10)],
    ['a flipped page CRC bit', 'table_crc', (b: Buffer, o: number) => (b[o + H + 4 * 8 + 1] ^= 0x10)],
    ['a flipped page-table bit', 'table_crc', (b: Buffer, o: number) => (b[o + H + 1] ^= 0x01)],
    ['a flipped page-table bit in a tearable frame', 'table_crc', (b: Buffer, o: number) => (tearable(b, o), (b[o + H + 1] ^= 0x01))],
    ['a flipped header bit', 'header_crc', (b: Buffer, o: number) => (b[o + 9] ^= 0x80)],
    ['a bad magic', 'magic', (b: Buffer, o: number) => b.writeUInt32LE(0x12345678, o)],
    ['another version', 'version', (b: Buffer, o: number) => (b.writeUInt16LE(1, o + 4), reseal(b, o))],
    ['an unknown flag', 'flags', (b: Buffer, o: number) => (b.writeUInt16LE(4, o + 6), reseal(b, o))],
    ['the end flag in a buffer', 'flags', (b: Buffer, o: number) => (b.writeUInt16LE(1, o + 6), reseal(b, o))],
    ['a page number beyond the memory', 'page_number', (b: Buffer, o: number) => (b.writeUInt32LE(PAGES, o + H + 8), reseal(b, o))],
    ['a zero flag the header does not count', 'page_count', (b: Buffer, o: number) => ((b[o + H + 7] ^= 0x80), reseal(b, o))],
    ['a page count of 0', 'page_count', (b: Buffer, o: number) => (b.writeUInt32LE(0, o + 16), reseal(b, o))],
  ] as const)('%s in the second frame is caught (%s) with its seq; the first frame is applied, the second not', async (_name, check, corrupt) => {
    const { src, frames, ends } = await threeFrames();
    corrupt(frames, ends[0]);
    const dst = mem(new native.GuestMemory(PAGES * PAGE));
    const err = await applyFrames(dst, frames).catch((e) => e);
    expect(err).toMatchObject({ kind: 'data_loss', details: { field: check, offset: String(ends[0]) } });
    if (check !== 'magic' && check !== 'header_crc') expect(err.details.chunk).toBe('8');
    expect(err.message).toContain(check);
    expectSamePages(src, dst, [8, 9, 10, 11]);
    const z = Buffer.alloc(PAGE);
    for (const p of [12, 14]) {
      dst.read(p * PAGE, z); // random pages of the rejected frame: not written
      expect(z.every((b) => b === 0)).toBe(true);
    }
  });

  it('a tearable frame: a page that fails its CRC is applied and marked torn, the others as usual; an intact copy clears the mark', async () => {
    const { src, frames, ends } = await threeFrames();
    const intact = Buffer.from(frames);
    tearable(frames, ends[0]);
    // Pages 12..15: 12 and 14 random, 13 zero, 15 one byte: three carry data. Page 14 (the second) as a rewrite in flight would leave it:
    frames[ends[0] + H + 4 * 8 + 3 * 4 + PAGE + 100] ^= 0x10;
    const dst = mem(new native.GuestMemory(PAGES * PAGE));
    const r = await applyFrames(dst, frames);
    expect(r).toMatchObject({ consumed: frames.length, frames: 3, tornPages: 1 });
    expect(dst.tornPages()).toEqual({ count: 1, first: 14 });
    expectSamePages(src, dst, [8, 9, 10, 11, 12, 13, 15, 16, 17, 18, 19]);
    // A frame carrying a page again without the tear clears its mark; the others stay.
    const again = await applyFrames(dst, intact.subarray(ends[0], ends[1]));
    expect(again.tornPages).toBe(0);
    expect(dst.tornPages()).toEqual({ count: 0 });
    expectSamePages(
      src,
      dst,
      Array.from({ length: 12 }, (_, i) => 8 + i),
    );
  });

  it('a truncated buffer applies the whole frames and reports where the incomplete one starts', async () => {
    const { src, frames, ends } = await threeFrames();
    const dst = mem(new native.GuestMemory(PAGES * PAGE));
    for (const cut of [0, 10, H, ends[0] + H - 1, ends[0] + H + 5, ends[1] - 1]) {
      const r = await applyFrames(dst, frames.subarray(0, cut));
      expect(r.consumed).toBe(cut < ends[0] ? 0 : ends[0]);
    }
    const rest = await applyFrames(dst, frames.subarray(ends[0]));
    expect(rest).toMatchObject({ consumed: frames.length - ends[0], frames: 2, lastSeq: 9n });
    expectSamePages(
      src,
      dst,
      Array.from({ length: 12 }, (_, i) => 8 + i),
    );
  });
});
