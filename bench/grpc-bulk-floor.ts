/**
 * The grpc-js bulk floor: a trivial grpc-js server in its own process that streams N messages of one
 * size to the caller (server streaming) or takes them (client streaming), over a Unix socket, and the
 * matching client calls in this process. Messages are pre-serialized (a protobuf `bytes` field 2, as
 * CreateSnapshotResponse.data and RestoreSnapshotStreamRequest.data) and handed to grpc-js as they
 * are: what is measured is grpc-js + HTTP/2 + the socket, at grpc-js's default settings.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { ROOT } from './floors';

const BULK_SERVER = `
const grpc = require('@grpc/grpc-js');
const id = (x) => x;
const def = (name, requestStream, responseStream) => ({ path: '/bench.Bulk/' + name, requestStream, responseStream,
  requestSerialize: id, requestDeserialize: id, responseSerialize: id, responseDeserialize: id });
const s = new grpc.Server();
s.addService({ Down: def('Down', false, true), Up: def('Up', true, false) }, {
  // request: u32 message count, u32 payload bytes per message. Writes with backpressure.
  Down: (call) => {
    const count = call.request.readUInt32LE(0);
    const payload = call.request.readUInt32LE(4);
    // A message of one bytes field 2 (as CreateSnapshotResponse.data): tag, length, payload.
    const head = require('protobufjs/minimal').Writer.create().uint32(0x12).uint32(payload).finish();
    const body = Buffer.concat([head, Buffer.alloc(payload, 0x5a)]);
    let sent = 0;
    const pump = () => {
      while (sent < count) {
        sent++;
        if (!call.write(body)) return call.once('drain', pump);
      }
      call.end();
    };
    pump();
  },
  // Counts the bytes it receives; answers with the count (u64 LE).
  Up: (call, cb) => {
    let bytes = 0;
    call.on('data', (m) => (bytes += m.length));
    call.on('end', () => { const r = Buffer.alloc(8); r.writeBigUInt64LE(BigInt(bytes)); cb(null, r); });
  },
});
s.bindAsync('unix:' + process.argv[1], grpc.ServerCredentials.createInsecure(), () => console.log('ready'));
`;

const id = (x: Buffer) => x;

export interface BulkFloor {
  pid: number;
  /** Receives `count` messages of `payload` bytes; resolves to the bytes received (message bodies). */
  down(count: number, payload: number): Promise<number>;
  /** Sends `messages` (pre-serialized bodies) with backpressure; resolves to the bytes the server counted. */
  up(messages: Buffer[]): Promise<number>;
  stop(): Promise<void>;
}

export async function startBulkFloor(channelOptions: grpc.ChannelOptions = {}): Promise<BulkFloor> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-bulk-'));
  const sock = path.join(dir, 'b.sock');
  const proc = spawn(process.execPath, ['-e', BULK_SERVER, sock], { stdio: ['ignore', 'pipe', 'inherit'], cwd: ROOT });
  await new Promise((resolve, reject) => {
    proc.stdout!.once('data', resolve);
    proc.once('exit', (code) => reject(new Error(`the grpc-js bulk server exited with ${code}`)));
  });
  const client = new grpc.Client(`unix:${sock}`, grpc.credentials.createInsecure(), channelOptions);
  return {
    pid: proc.pid!,
    down(count, payload) {
      return new Promise((resolve, reject) => {
        const req = Buffer.alloc(8);
        req.writeUInt32LE(count, 0);
        req.writeUInt32LE(payload, 4);
        let bytes = 0;
        const s = client.makeServerStreamRequest('/bench.Bulk/Down', id, id, req);
        s.on('data', (m: Buffer) => (bytes += m.length));
        s.on('error', reject);
        s.on('end', () => resolve(bytes));
      });
    },
    up(messages) {
      return new Promise((resolve, reject) => {
        const s = client.makeClientStreamRequest('/bench.Bulk/Up', id, id, (err, res) =>
          err ? reject(err) : resolve(Number((res as Buffer).readBigUInt64LE(0))),
        );
        let i = 0;
        const pump = () => {
          while (i < messages.length) if (!s.write(messages[i++])) return void s.once('drain', pump);
          s.end();
        };
        pump();
      });
    },
    async stop() {
      client.close();
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = new Promise((r) => proc.once('exit', r));
        proc.kill();
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}
