/**
 * Page frames on a stream (GuestMemory.sendFrames / receiveFrames, native/page_frames.h) over a
 * real unix socket between two GuestMemory objects, no KVM needed: the pages land as they left,
 * the reader takes the bytes it was handed first and never reads past the end frame, and every
 * failure (a flipped byte, a page beyond the memory, the peer closing, a silent peer, a cancel)
 * rejects with what it was. The zero-copy sender hands over the pages themselves: a page rewritten
 * in flight arrives rewritten, marked torn in a tearable frame, refused in any other.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { native, type NativeGuestMemory } from '../../src/ffi/native';
import { receiveFrames, widenSendBuffer } from '../../src/ffi/page-frames';

const PAGE = 4096;
const PAGES = 1024; // 4 MiB
const FRAME_PAGES = 64;

/** Even pages random, pages ≡ 1 mod 4 zero, the rest one non-zero byte. */
function source(): NativeGuestMemory {
  const m = new native.GuestMemory(PAGES * PAGE);
  for (let p = 0; p < PAGES; p++) {
    if (p % 2 === 0) m.write(p * PAGE, crypto.randomBytes(PAGE));
    else if (p % 4 === 3) m.write(p * PAGE + 100, Buffer.from([p & 0xff || 1]));
  }
  return m;
}

const fdOf = (s: net.Socket) => (s as unknown as { _handle: { fd: number } })._handle.fd;

describe('page frames on a stream (unix socket)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-frame-stream-'));
  const cleanups: (() => void)[] = [];
  afterEach(() => {
    for (const c of cleanups.splice(0)) c();
  });
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  /** A connected pair: `writer` (a client) and `reader` (the server's end, never read by Node). */
  async function pair(): Promise<{ writer: net.Socket; reader: net.Socket }> {
    const at = path.join(dir, `s${cleanups.length}-${Math.random().toString(16).slice(2)}.sock`);
    const server = net.createServer({ pauseOnConnect: true });
    await new Promise<void>((r) => server.listen(at, r));
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    const writer = net.connect({ path: at });
    await new Promise((r) => writer.once('connect', r));
    const reader = await accepted;
    cleanups.push(() => {
      writer.destroy();
      reader.destroy();
      server.close();
    });
    return { writer, reader };
  }

  function mem(pages = PAGES): NativeGuestMemory {
    const m = new native.GuestMemory(pages * PAGE);
    cleanups.push(() => m.release());
    return m;
  }

  const all = () => Buffer.alloc(PAGES / 8, 0xff);
  const opts = (extra: object = {}) => ({ stallMs: 2000, cancel: Buffer.alloc(1), ...extra });

  /**
   * The whole stream of `src` (every page, then the end frame) as bytes: sendFrames into a socket
   * read here, in calls of `pagesPerCall` pages through a `stagingBytes` buffer (`extra`: more
   * sendFrames options).
   */
  async function streamBytes(src: NativeGuestMemory, pagesPerCall = PAGES, stagingBytes = 256 * 1024, extra: object = {}): Promise<Buffer> {
    const { writer, reader } = await pair();
    const chunks: Buffer[] = [];
    reader.on('data', (c: Buffer) => chunks.push(c));
    reader.resume();
    let sent = 0;
    let seq = 0;
    for (let page = 0; page < PAGES; ) {
      const toPage = Math.min(PAGES, page + pagesPerCall);
      const r = await src.sendFrames(fdOf(writer), all(), page, Buffer.alloc(stagingBytes), {
        seq,
        framePages: FRAME_PAGES,
        toPage,
        end: toPage === PAGES,
        ...opts(extra),
      });
      expect(r.nextPage).toBe(toPage);
      sent += r.bytes;
      seq += r.frames;
      page = toPage;
    }
    writer.end();
    await new Promise((res) => reader.once('end', res));
    const bytes = Buffer.concat(chunks);
    expect(bytes.length).toBe(sent);
    return bytes;
  }

  function expectSame(a: NativeGuestMemory, b: NativeGuestMemory): void {
    const x = Buffer.alloc(PAGES * PAGE);
    const y = Buffer.alloc(PAGES * PAGE);
    a.read(0, x);
    b.read(0, y);
    expect(x.equals(y)).toBe(true);
  }

  it('round trip sent in several calls, the reader starting with a prefix that ends inside a frame', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const whole = await streamBytes(src, 300, 100_000);
    const prefix = whole.subarray(0, 70_000); // past the first frame's header, inside its payload
    const dst = mem();
    const { writer, reader } = await pair();
    writer.write(whole.subarray(prefix.length));
    const r = await receiveFrames(dst, fdOf(reader), prefix, opts());
    expect(r).toMatchObject({ prefixUsed: prefix.length, bytes: whole.length - prefix.length, pages: PAGES, zeroPages: PAGES / 4 });
    expectSame(src, dst);
  });

  it('maxBytes: a call returns once that many bytes are written (nextPage where it stopped), the end frame only at the end', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const { writer, reader } = await pair();
    const chunks: Buffer[] = [];
    reader.on('data', (c: Buffer) => chunks.push(c));
    reader.resume();
    const send = (bitmap: Buffer, page: number, seq: number) =>
      src.sendFrames(fdOf(writer), bitmap, page, Buffer.alloc(100_000), { seq, framePages: FRAME_PAGES, maxBytes: 500_000, end: true, ...opts() });
    let calls = 0;
    for (let page = 0, seq = 0; page < PAGES; calls++) {
      const r = await send(all(), page, seq);
      expect(r.bytes).toBeLessThan(500_000 + 100_000 + 32);
      page = r.nextPage;
      seq += r.frames;
    }
    expect(calls).toBeGreaterThan(3);
    // A sparse selection (three pages) is one call, however far apart they are.
    const sparse = Buffer.alloc(PAGES / 8);
    for (const p of [0, PAGES / 2, PAGES - 1]) sparse[p >> 3] |= 1 << (p & 7);
    expect(await send(sparse, 0, 0)).toMatchObject({ nextPage: PAGES, pages: 3 });
    writer.end();
    await new Promise((res) => reader.once('end', res));
    const dst = mem();
    const r = await receiveFrames(dst, fdOf((await pair()).reader), Buffer.concat(chunks), opts());
    expect(r.pages).toBe(PAGES); // the first stream, up to its end frame
    expectSame(src, dst);
  });

  it('never reads past the end frame: bytes after it stay in the prefix (prefixUsed) or on the socket', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const whole = await streamBytes(src);
    const trailer = Buffer.from('NEXT ENVELOPE');
    const dst = mem();
    const { reader } = await pair();
    const r = await receiveFrames(dst, fdOf(reader), Buffer.concat([whole, trailer]), opts());
    expect(r).toMatchObject({ prefixUsed: whole.length, bytes: 0, pages: PAGES });
    expectSame(src, dst);
    // From the socket: the trailer is still there to read after the call.
    const dst2 = mem();
    const p = await pair();
    p.writer.write(Buffer.concat([whole, trailer]));
    const r2 = await receiveFrames(dst2, fdOf(p.reader), Buffer.alloc(0), opts());
    expect(r2).toMatchObject({ prefixUsed: 0, bytes: whole.length });
    const rest = await new Promise<Buffer>((res) => {
      p.reader.once('data', res);
      p.reader.resume();
    });
    expect(rest.toString()).toBe(trailer.toString());
    expectSame(src, dst2);
  });

  it('zero-copy: sent in several calls, the pages land as they left, none torn', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const whole = await streamBytes(src, 300, 32 + 12 * FRAME_PAGES, { zeroCopy: true, tearable: true });
    const dst = mem();
    const { writer, reader } = await pair();
    writer.write(whole);
    const r = await receiveFrames(dst, fdOf(reader), Buffer.alloc(0), opts());
    expect(r).toMatchObject({ bytes: whole.length, pages: PAGES, zeroPages: PAGES / 4, tornPages: 0 });
    expect(dst.tornPages()).toEqual({ count: 0 });
    expectSame(src, dst);
  });

  /** Sends pages 0, 2 and 4 (random) zero-copy into a socket nobody reads yet, then rewrites page 2. */
  async function rewrittenInFlight(tearable: boolean) {
    const src = source();
    cleanups.push(() => src.release());
    const { writer, reader } = await pair();
    const bitmap = Buffer.alloc(PAGES / 8);
    bitmap[0] = 0b10101;
    const r = await src.sendFrames(fdOf(writer), bitmap, 0, Buffer.alloc(4096), { seq: 0, end: true, zeroCopy: true, tearable, ...opts() });
    expect(r).toMatchObject({ pages: 3, frames: 1 });
    const rewritten = crypto.randomBytes(PAGE);
    src.write(2 * PAGE, rewritten);
    return { src, reader, writer, bitmap, rewritten };
  }

  it('zero-copy hands over the pages themselves: a page rewritten in flight arrives rewritten; in a tearable frame that page alone is marked torn until it comes again', async () => {
    const { src, reader, writer, bitmap, rewritten } = await rewrittenInFlight(true);
    const dst = mem();
    const r = await receiveFrames(dst, fdOf(reader), Buffer.alloc(0), opts());
    expect(r).toMatchObject({ pages: 3, tornPages: 1 });
    expect(dst.tornPages()).toEqual({ count: 1, first: 2 });
    const got = Buffer.alloc(PAGE);
    dst.read(2 * PAGE, got);
    expect(got.equals(rewritten)).toBe(true); // the receiver read the source's page, not a copy
    // The pages again, the guest not writing (tearable: false, as in the paused last pass): marks cleared.
    await src.sendFrames(fdOf(writer), bitmap, 0, Buffer.alloc(4096), { seq: 1, end: true, zeroCopy: true, ...opts() });
    expect(await receiveFrames(dst, fdOf(reader), Buffer.alloc(0), opts())).toMatchObject({ pages: 3, tornPages: 0 });
    expect(dst.tornPages()).toEqual({ count: 0 });
    const want = Buffer.alloc(PAGE);
    for (const p of [0, 2, 4]) {
      src.read(p * PAGE, want);
      dst.read(p * PAGE, got);
      expect(got.equals(want)).toBe(true);
    }
  });

  it('zero-copy, not tearable (the guest paused): a page rewritten in flight fails the CRC', async () => {
    const { reader } = await rewrittenInFlight(false);
    await expect(receiveFrames(mem(), fdOf(reader), Buffer.alloc(0), opts())).rejects.toMatchObject({ kind: 'data_loss', details: { field: 'crc' } });
  });

  it('zero-copy arguments: tearable needs zeroCopy; the staging buffer must hold a frame header and table', async () => {
    const src = mem();
    const { writer } = await pair();
    expect(() => src.sendFrames(fdOf(writer), all(), 0, Buffer.alloc(1 << 16), { seq: 0, tearable: true, ...opts() })).toThrow(/tearable needs opts.zeroCopy/);
    expect(() => src.sendFrames(fdOf(writer), all(), 0, Buffer.alloc(5000), { seq: 0, framePages: 1024, zeroCopy: true, ...opts() })).toThrow(
      /zero-copy frame's header, table and page CRCs need 12320/,
    );
  });

  it('widenSendBuffer: the kernel grants the size asked (up to net.core.wmem_max), doubled; bad arguments throw', async () => {
    const { writer } = await pair();
    const wmemMax = Number(fs.readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    expect(widenSendBuffer(fdOf(writer), 512 * 1024)).toBe(2 * Math.min(512 * 1024, wmemMax));
    expect(() => widenSendBuffer(fdOf(writer), 0)).toThrow(/bytes 1\.\.2\^31-1/);
    expect(() => widenSendBuffer(-1, 4096)).toThrow(/setSendBuffer: fd -1 is closed/);
    expect(() => widenSendBuffer(fs.openSync('/dev/null', 'r'), 4096)).toThrow(/setsockopt\(SO_SNDBUF\).*ENOTSOCK/);
  });

  it('a flipped payload byte fails the CRC (data_loss, check crc)', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const whole = Buffer.from(await streamBytes(src));
    whole[300_000] ^= 0x10;
    const { writer, reader } = await pair();
    writer.write(whole);
    await expect(receiveFrames(mem(), fdOf(reader), Buffer.alloc(0), opts())).rejects.toMatchObject({ kind: 'data_loss', details: { field: 'crc' } });
  });

  it('a page beyond the memory is refused before any of its frame is read (page_number); earlier frames landed', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const whole = await streamBytes(src);
    const small = mem(PAGES / 2);
    const { writer, reader } = await pair();
    writer.write(whole);
    await expect(receiveFrames(small, fdOf(reader), Buffer.alloc(0), opts())).rejects.toMatchObject({ kind: 'data_loss', details: { field: 'page_number' } });
    const x = Buffer.alloc(PAGE);
    const y = Buffer.alloc(PAGE);
    src.read(0, x);
    small.read(0, y);
    expect(y.equals(x)).toBe(true);
  });

  it('the peer closing mid-stream rejects EOF; a silent peer ETIMEDOUT after stallMs; cancel ECANCELED', async () => {
    const src = source();
    cleanups.push(() => src.release());
    const whole = await streamBytes(src);
    const a = await pair();
    a.writer.end(whole.subarray(0, 100_000));
    await expect(receiveFrames(mem(), fdOf(a.reader), Buffer.alloc(0), opts())).rejects.toMatchObject({ code: 'EOF' });
    const b = await pair();
    const t = Date.now();
    await expect(receiveFrames(mem(), fdOf(b.reader), Buffer.alloc(0), opts({ stallMs: 200 }))).rejects.toMatchObject({ code: 'ETIMEDOUT' });
    console.log(`a silent peer: ETIMEDOUT after ${Date.now() - t} ms (stallMs 200)`);
    const c = await pair();
    const cancel = Buffer.alloc(1);
    const pending = receiveFrames(mem(), fdOf(c.reader), Buffer.alloc(0), { stallMs: 60_000, cancel });
    setTimeout(() => (cancel[0] = 1), 50);
    await expect(pending).rejects.toMatchObject({ code: 'ECANCELED' });
    // The writer side: nobody reads, the socket fills, and the write gives up after stallMs.
    const d = await pair();
    await expect(src.sendFrames(fdOf(d.writer), all(), 0, Buffer.alloc(1 << 20), { seq: 0, ...opts({ stallMs: 200 }) })).rejects.toMatchObject({
      code: 'ETIMEDOUT',
    });
  });
});
