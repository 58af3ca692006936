/**
 * Reads of a connected socket straight into buffers the caller hands out: net.Socket's documented
 * `onread` option (a buffer source and a callback instead of a new Buffer per 'data' chunk), for
 * sockets made where the option cannot be passed (tls.Server's, tls.connect's over an existing
 * socket). It is set on the socket as the option would have set it, through the socket's own
 * symbols and its handle's useUserBuffer; a Node without them answers false and the caller keeps
 * to 'data' events.
 */
import type net from 'node:net';

export interface SocketReads {
  /** The buffer the next read lands in (any length > 0). */
  next(): Buffer;
  /** `n` bytes landed at the start of the buffer next() gave; false stops reading (as pause() does). */
  received(n: number): boolean;
}

type Hooked = net.Socket & Record<symbol, unknown> & { _handle?: { useUserBuffer?(b: Uint8Array): void } };

/** Symbols net.Socket keeps the onread option under (lib/net.js). */
const ONREAD_SYMBOLS = ['kBuffer', 'kBufferCb', 'kBufferGen'] as const;

export function readIntoBuffers(socket: net.Socket, reads: SocketReads): boolean {
  const s = socket as Hooked;
  const own = Object.getOwnPropertySymbols(s);
  const [kBuffer, kBufferCb, kBufferGen] = ONREAD_SYMBOLS.map((d) => own.find((sym) => sym.description === d));
  if (!kBuffer || !kBufferCb || !kBufferGen || s[kBuffer] || typeof s._handle?.useUserBuffer !== 'function') return false;
  const first = reads.next();
  s[kBuffer] = first;
  s[kBufferCb] = (n: number) => reads.received(n);
  s[kBufferGen] = () => reads.next();
  s._handle.useUserBuffer(first);
  return true;
}
