/**
 * The migration Channel over a real TLS connection on 127.0.0.1 (no KVM needed): the receiver reads
 * in place (Node decrypts into the waiting read's buffer or the channel's inbox, never into a new
 * Buffer per chunk), whatever the chunking: envelopes written in pieces of a few bytes (also over
 * plain TCP, read through 'data' chunks), a burst read only after it filled the inbox past its limit
 * (reads paused, then resumed), an ERROR envelope left unread at the close. Page frames corrupted
 * in transit still fail applyFrames' CRC check before any page lands. */
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { native } from '../../src/ffi/native';
import { applyFrames } from '../../src/ffi/page-frames';
import { Channel } from '../../src/vm/migration/channel';
import { ENVELOPE_HEADER_SIZE, envelopeHeader, EnvelopeType, jsonEnvelope, type EnvelopeHead } from '../../src/vm/migration/protocol';
import { issueClients, MIGRATOR } from '../support/mtls';
import { makePki, type Pki } from '../support/pki';

const MiB = 1024 * 1024;
const STALL_MS = 10_000;

let dir: string;
let pki: Pki;

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-channel-tls-'));
  pki = makePki(path.join(dir, 'pki'));
  issueClients(pki, MIGRATOR);
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A connected mTLS pair: the server's socket (as a migration destination accepts it) and the client's. */
async function tlsPair(): Promise<{ server: tls.TLSSocket; client: tls.TLSSocket; close(): void }> {
  let accepted!: (s: tls.TLSSocket) => void;
  const serverSide = new Promise<tls.TLSSocket>((r) => (accepted = r));
  const srv = tls.createServer(
    { key: pki.pem('server.key'), cert: pki.pem('server.crt'), ca: pki.pem('ca.crt'), requestCert: true, rejectUnauthorized: true },
    (s) => accepted(s),
  );
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  const client = tls.connect({
    host: '127.0.0.1',
    port,
    ca: pki.pem('ca.crt'),
    cert: pki.pem(`${MIGRATOR}.crt`),
    key: pki.pem(`${MIGRATOR}.key`),
    servername: 'localhost',
  });
  await new Promise((r) => client.once('secureConnect', r));
  const server = await serverSide;
  return {
    server,
    client,
    close() {
      client.destroy();
      server.destroy();
      srv.close();
    },
  };
}

/** Writes `bytes` in pieces of 1 to `maxPiece` bytes, each its own write (a TLS record; the next waits for the previous). */
async function writeInPieces(s: net.Socket, bytes: Buffer, maxPiece: number): Promise<number> {
  let pieces = 0;
  for (let off = 0; off < bytes.length; pieces++) {
    const n = Math.min(bytes.length - off, 1 + crypto.randomInt(maxPiece));
    await new Promise<void>((resolve, reject) => s.write(bytes.subarray(off, off + n), (e) => (e ? reject(e) : resolve())));
    off += n;
  }
  return pieces;
}

const envelope = (type: EnvelopeType, payload: Buffer) => Buffer.concat([envelopeHeader(type, payload), payload]);

/**
 * Sends PAGES envelopes of assorted sizes (one empty) and a PASS_END from `sender` in pieces of
 * 1-3000 bytes, and reads them with a Channel on `receiver`, each payload into a lent buffer:
 * every envelope must arrive whole, where the caller lent. Counts the 'data' chunks the socket emitted.
 */
async function receiveInPieces(receiver: net.Socket, sender: net.Socket): Promise<{ dataChunks: number; pieces: number; bytes: number }> {
  const ch = new Channel(receiver, STALL_MS, 'the source');
  let dataChunks = 0;
  receiver.on('data', () => dataChunks++); // a socket read in place emits none
  const payloads = [crypto.randomBytes(MiB + 5), crypto.randomBytes(7), Buffer.alloc(0), crypto.randomBytes(300_000)];
  const stream = Buffer.concat([...payloads.map((p) => envelope(EnvelopeType.Pages, p)), jsonEnvelope(EnvelopeType.PassEnd, { pass: 1 })]);
  const writing = writeInPieces(sender, stream, 3000);
  const lent = Buffer.alloc(2 * MiB);
  let lentFor: EnvelopeHead | undefined;
  for (const p of payloads) {
    const { head, payload } = await ch.next('test', (h) => ((lentFor = h), lent));
    expect(head).toMatchObject({ type: EnvelopeType.Pages, length: p.length });
    expect(payload.equals(p)).toBe(true);
    if (p.length) {
      expect(lentFor).toBe(head);
      expect(payload.buffer).toBe(lent.buffer); // gathered where the caller asked
    }
  }
  expect(await ch.expectJson(EnvelopeType.PassEnd, 'test')).toEqual({ pass: 1 });
  const pieces = await writing;
  expect(ch.bytesIn).toBe(stream.length);
  return { dataChunks, pieces, bytes: stream.length };
}

describe('migration Channel over TLS', () => {
  it('reads in place: envelopes written in pieces of 1-3000 bytes arrive whole in the lent buffer, no data chunk emitted', async () => {
    const pair = await tlsPair();
    try {
      const { dataChunks, pieces, bytes } = await receiveInPieces(pair.server, pair.client);
      expect(dataChunks).toBe(0);
      console.log(`${bytes} bytes in ${pieces} TLS records of 1-3000 bytes: every envelope whole, ${dataChunks} 'data' chunks`);
    } finally {
      pair.close();
    }
  });

  it("a plain socket (read through 'data' chunks) gathers the same envelopes whole", async () => {
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
    const client = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1');
    const server = await accepted;
    try {
      const { dataChunks } = await receiveInPieces(server, client);
      expect(dataChunks).toBeGreaterThan(1);
    } finally {
      client.destroy();
      server.destroy();
      srv.close();
    }
  });

  it('a burst read only after it overfilled the inbox: reads pause (the rest waits in the kernel) and resume, every byte arrives in order', async () => {
    const pair = await tlsPair();
    try {
      const ch = new Channel(pair.server, STALL_MS, 'the source');
      const payloads = Array.from({ length: 6 }, () => crypto.randomBytes(4 * MiB));
      for (const p of payloads) pair.client.write(envelope(EnvelopeType.Pages, p));
      // Nothing is read until the inbox is past its limit: the socket pauses, the rest waits in the kernel.
      for (let i = 0; i < 200 && !pair.server.isPaused(); i++) await new Promise((r) => setTimeout(r, 10));
      expect(pair.server.isPaused()).toBe(true);
      const inbox = ch.bytesIn;
      expect(inbox).toBeLessThan(payloads.length * 4 * MiB);
      for (const p of payloads) {
        const { payload } = await ch.next('test');
        expect(payload.equals(p)).toBe(true);
      }
      expect(ch.bytesIn).toBe(payloads.length * (ENVELOPE_HEADER_SIZE + 4 * MiB));
      console.log(`${inbox} of ${ch.bytesIn} bytes taken before the socket paused`);
    } finally {
      pair.close();
    }
  });

  it("the peer's ERROR envelope, unread when it closes, is the error the next read throws", async () => {
    const pair = await tlsPair();
    try {
      const ch = new Channel(pair.server, STALL_MS, 'the source');
      const closed = new Promise((r) => pair.server.once('close', r));
      pair.client.end(Buffer.concat([jsonEnvelope(EnvelopeType.Error, { message: 'out of memory', kind: 'resource_exhausted' })]));
      await closed;
      await expect(ch.next('test')).rejects.toMatchObject({ kind: 'resource_exhausted', message: 'the source reported: out of memory' });
    } finally {
      pair.close();
    }
  });

  it('page frames with a byte corrupted in transit fail the CRC check; the page stays as it was; intact ones apply', async () => {
    const pair = await tlsPair();
    const pages = 64;
    const src = new native.GuestMemory(pages * 4096);
    const dst = new native.GuestMemory(pages * 4096);
    try {
      for (let p = 0; p < pages; p++) src.write(p * 4096, crypto.randomBytes(4096));
      const sender = new Channel(pair.client, STALL_MS, 'the destination');
      const receiver = new Channel(pair.server, STALL_MS, 'the source');
      const out = Buffer.alloc(ENVELOPE_HEADER_SIZE + 2 * MiB);
      const r = await src.packPages(Buffer.alloc(pages / 8, 0xff), 0, out.subarray(ENVELOPE_HEADER_SIZE), { seq: 1n, framePages: 16 });
      const frames = out.subarray(0, ENVELOPE_HEADER_SIZE + r.bytes);
      const intact = Buffer.from(frames);
      frames[frames.length - 100] ^= 0x01; // a byte of the last page of the last frame
      await sender.sendReusable(EnvelopeType.Pages, frames, false);
      await sender.sendReusable(EnvelopeType.Pages, intact, false);
      const lent = Buffer.alloc(2 * MiB);
      const corrupt = await receiver.next('test', () => lent);
      const before = Buffer.alloc(4096);
      dst.read((pages - 1) * 4096, before);
      await expect(applyFrames(dst, corrupt.payload)).rejects.toMatchObject({ kind: 'data_loss', details: { field: 'crc' } });
      const after = Buffer.alloc(4096);
      dst.read((pages - 1) * 4096, after);
      expect(after.equals(before)).toBe(true);
      const good = await receiver.next('test', () => lent);
      expect((await applyFrames(dst, good.payload)).pages).toBe(pages);
      const a = Buffer.alloc(pages * 4096);
      const b = Buffer.alloc(pages * 4096);
      src.read(0, a);
      dst.read(0, b);
      expect(b.equals(a)).toBe(true);
    } finally {
      pair.close();
      src.release();
      dst.release();
    }
  });
});
