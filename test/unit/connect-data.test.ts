/**
 * The source's data connection to the destination (migration-service.ts connectData): a migration
 * cancelled before it connects opens no connection, and one cancelled while connecting stops.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { VcpudError } from '../../src/errors';
import { connectData, type DestinationTarget } from '../../src/server/services/migration-service';

describe('connectData', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-connect-data-'));
  const sock = path.join(dir, 'data.sock');
  let server: net.Server;
  let accepted = 0;
  const dest: DestinationTarget = { target: `unix:${path.join(dir, 'api.sock')}`, creds: grpc.credentials.createInsecure(), options: {} };

  beforeAll(async () => {
    server = net.createServer((s) => {
      accepted++;
      s.destroy();
    });
    await new Promise<void>((r) => server.listen(sock, r));
  });
  afterAll(async () => {
    await new Promise((r) => server.close(r));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('connects to a unix data endpoint', async () => {
    const s = await connectData(`unix:${sock}`, dest, 5000, new AbortController().signal);
    s.destroy();
  });

  test('a signal aborted before the call rejects with its reason and opens no connection', async () => {
    const before = accepted;
    const abort = new AbortController();
    const reason = new VcpudError('cancelled', 'the client cancelled the migration');
    abort.abort(reason);
    await expect(connectData(`unix:${sock}`, dest, 5000, abort.signal)).rejects.toBe(reason);
    await new Promise((r) => setTimeout(r, 50)); // a connection made anyway would have been accepted by now
    expect(accepted).toBe(before);
  });
});
