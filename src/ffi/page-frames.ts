/**
 * Page frames: guest pages packed for a live migration's data plane (format and checks in
 * native/page_frames.h, its one description). NativeGuestMemory.packPages and applyFrames run on
 * the libuv pool; the caller moves the bytes (Node sockets) and orders frames by seq.
 */
import { VcpudError } from '../errors';
import { native, type ApplyResult, type NativeGuestMemory, type ReceiveResult, type StreamOptions } from './native';

export const PAGE_FRAME_FORMAT = native.pageFrameFormat;
/** The frame format version this build writes and reads. */
export const PAGE_FRAME_VERSION: number = PAGE_FRAME_FORMAT.version;
const { headerBytes, tableEntryBytes, pageCrcBytes, pageBytes } = PAGE_FRAME_FORMAT;
/** Bytes a frame of `pages` data pages takes: header, page table, page CRCs, payload. */
export const frameBytes = (pages: number): number => headerBytes + pages * (tableEntryBytes + pageCrcBytes + pageBytes);
/** The staging sendFrames needs with zeroCopy: a frame's header, page table and page CRCs (its pages stay where they are). */
export const zeroCopyStagingBytes = (framePages: number): number => headerBytes + framePages * (tableEntryBytes + pageCrcBytes);

interface FrameErrorShape {
  code?: string;
  check?: string;
  seq?: bigint;
  offset?: number;
  message: string;
}

/**
 * Asks for a send buffer of `bytes` on the socket frames are written to (sendFrames); returns the
 * size in effect. Node leaves stream sockets at the kernel's default (208 KiB here): on a unix
 * socket the sender then fills it in a moment and waits for the receiver, which takes turns with
 * it instead of running beside it (BENCHMARKS.md, "Live migration over a Unix socket: the send buffer").
 */
export function widenSendBuffer(fd: number, bytes: number): number {
  return native.setSendBuffer(fd, bytes);
}

/**
 * Verifies and applies the whole frames at the start of `buf`; stops at an incomplete trailing
 * frame (result.consumed). A corrupt frame rejects with a data_loss VcpudError naming the check
 * (magic, version, header_crc, flags, page_count, crc, page_number), the frame's seq and its
 * offset in `buf`; the frames before it were applied.
 */
export function applyFrames(memory: NativeGuestMemory, buf: Buffer): Promise<ApplyResult> {
  return memory.applyFrames(buf).catch(frameError);
}

/**
 * NativeGuestMemory.receiveFrames, a corrupt frame rejecting as applyFrames does (offset: in the
 * stream); its socket errors as they come (code ETIMEDOUT, ECANCELED, EOF or an errno name).
 */
export function receiveFrames(memory: NativeGuestMemory, fd: number, prefix: Buffer, opts: StreamOptions): Promise<ReceiveResult> {
  return memory.receiveFrames(fd, prefix, opts).catch(frameError);
}

function frameError(e: unknown): never {
  const f = e as FrameErrorShape;
  // Writing a page into guest memory faulted (SIGBUS, or EFAULT from the socket read into it): memory
  // kept in a file (--state-dir) whose filesystem is full; anonymous memory is OOM-killed instead.
  if (f?.code === 'MEMORY_FAULT' || f?.code === 'EFAULT')
    throw new VcpudError(
      'resource_exhausted',
      `guest memory could not take the incoming pages (${f.message}): the filesystem holding the guest memory file is probably full`,
      { reason: 'HOST_RESOURCES_EXHAUSTED', errno: f.code === 'EFAULT' ? 'EFAULT' : 'SIGBUS' },
      { cause: e },
    );
  if (f?.code !== 'EFRAME') throw e;
  throw new VcpudError('data_loss', f.message, { chunk: String(f.seq), offset: String(f.offset), field: f.check });
}
