/**
 * How the migration Channel names a native stream call's failure (no KVM needed, a real Unix socket
 * pair): an errno of the connection itself (EPIPE, ECONNRESET, the peer's EOF) is the connection's,
 * UNAVAILABLE "the connection to ... failed"; any other errno (EIO, ENOMEM) is this side's, classified
 * by the one errno table (src/errors.ts) and named after what was being done, not blamed on the peer.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { VcpudError } from '../../src/errors';
import { Channel } from '../../src/vm/migration/channel';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-channel-errors-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function unixPair(): Promise<{ ours: net.Socket; theirs: net.Socket; close(): void }> {
  const sock = path.join(dir, `${Math.random().toString(36).slice(2)}.sock`);
  let accepted!: (s: net.Socket) => void;
  const theirs = new Promise<net.Socket>((r) => (accepted = r));
  const srv = net.createServer((s) => accepted(s));
  await new Promise<void>((r) => srv.listen(sock, r));
  const ours = net.connect(sock);
  await new Promise((r) => ours.once('connect', r));
  const t = await theirs;
  return {
    ours,
    theirs: t,
    close() {
      ours.destroy();
      t.destroy();
      srv.close();
    },
  };
}

const errno = (code: string, syscall: string, text: string) => Object.assign(new Error(`${syscall}: ${text}`), { code, syscall });

async function failure(send: boolean, e: Error): Promise<VcpudError> {
  const p = await unixPair();
  try {
    const ch = new Channel(p.ours, 5000, 'the destination unix:/x');
    const failing = () => Promise.reject(e);
    const r = send
      ? ch.sendStream('sending to the destination', failing)
      : ch.receiveStream('waiting for page frames', () => failing() as Promise<{ bytes: number; prefixUsed: number }>);
    return await r.then(
      () => {
        throw new Error('the stream call was expected to fail');
      },
      (err: VcpudError) => err,
    );
  } finally {
    p.close();
  }
}

describe('migration Channel: native stream failures', () => {
  it('an errno of this side (EIO from splice) is named for what was being done, classified by the errno table, not blamed on the connection', async () => {
    const err = await failure(true, errno('EIO', 'splice', 'Input/output error'));
    expect(err).toBeInstanceOf(VcpudError);
    expect({ kind: err.kind, reason: err.details?.reason, errno: err.details?.errno }).toEqual({ kind: 'kernel', reason: 'INTERNAL_ERROR', errno: 'EIO' });
    expect(err.message).toBe('sending to the destination: splice: Input/output error');
  });

  it('ENOMEM while receiving is the host running out, RESOURCE_EXHAUSTED', async () => {
    const err = await failure(false, errno('ENOMEM', 'readv', 'Cannot allocate memory'));
    expect({ kind: err.kind, reason: err.details?.reason }).toEqual({ kind: 'resource_exhausted', reason: 'HOST_RESOURCES_EXHAUSTED' });
    expect(err.message).toMatch(/^waiting for page frames: readv: /);
  });

  it.each(['EPIPE', 'ECONNRESET', 'EOF'])('%s is the connection failing: UNAVAILABLE naming the peer', async (code) => {
    const err = await failure(true, errno(code, 'splice', 'the peer went away'));
    expect(err.kind).toBe('unavailable');
    expect(err.message).toMatch(/^the connection to the destination unix:\/x failed: splice: the peer went away$/);
  });

  it('a VcpudError (a corrupt frame, guest memory typed by the caller) passes through as it is', async () => {
    const typed = new VcpudError('data_loss', 'frame 3: crc', { reason: 'MIGRATION_FAILED' });
    expect(await failure(false, typed)).toBe(typed);
  });
});
