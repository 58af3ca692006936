/**
 * `vcpuctl snapshot restore --in FILE`'s data path: the file goes out as RestoreSnapshotStream data
 * messages, each read straight into a buffer with room for the message header in front and sent
 * pre-serialized (the one copy left is grpc-js's own framing), and the buffer reused once the message
 * has left. Several messages are on their way while the next is read, so neither the disk nor this
 * process keeps the server waiting.
 */
import fs from 'node:fs';
import type * as grpc from '@grpc/grpc-js';
import { BYTES_FIELD_HEADROOM, bytesFieldMessage, type Preserialized } from '../../api/preserialized';

/** Bytes per RestoreSnapshotStream message. */
export const UPLOAD_CHUNK = 1 << 20;
/** Messages sent but not yet written out by grpc-js. */
const IN_FLIGHT = 8;
/** RestoreSnapshotStreamRequest.data's field number. */
const DATA_FIELD = 2;

/**
 * Writes a message; resolves once it has left, or when the write failed (the call's outcome, which
 * the caller awaits, says why).
 */
function written(stream: grpc.ClientWritableStream<Preserialized>, msg: Preserialized): Promise<boolean> {
  return new Promise((resolve) => stream.write(msg, (err: Error | null | undefined) => resolve(!err)));
}

/**
 * Sends bytes [0, size) of `fd` as data messages. `stop` settles when the call ended early (the
 * server answered or failed): the upload then stops. `onProgress` gets the bytes sent so far.
 */
export async function uploadFile(
  stream: grpc.ClientWritableStream<Preserialized>,
  fd: number,
  size: number,
  stop: Promise<unknown>,
  onProgress: (sent: number) => void,
): Promise<void> {
  const ended = stop.then(
    () => undefined,
    () => undefined,
  );
  const free: Buffer[] = [];
  const sending: Promise<Buffer | undefined>[] = [];
  for (let pos = 0; pos < size; ) {
    const framed = free.pop() ?? Buffer.allocUnsafe(BYTES_FIELD_HEADROOM + UPLOAD_CHUNK);
    const n = fs.readSync(fd, framed, BYTES_FIELD_HEADROOM, Math.min(UPLOAD_CHUNK, size - pos), pos);
    if (n === 0) break; // the file shrank: the server reports the truncated snapshot
    const msg = bytesFieldMessage(DATA_FIELD, framed.subarray(0, BYTES_FIELD_HEADROOM + n), BYTES_FIELD_HEADROOM);
    sending.push(written(stream, msg).then((ok) => (ok ? framed : undefined)));
    pos += n;
    onProgress(pos);
    if (sending.length < IN_FLIGHT) continue;
    const reusable = await Promise.race([sending.shift() as Promise<Buffer | undefined>, ended]);
    if (!reusable) return; // the call is over
    free.push(reusable);
  }
  await Promise.race([Promise.all(sending), ended]);
}
