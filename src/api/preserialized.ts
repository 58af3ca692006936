/**
 * Messages handed to grpc-js already in their wire form, for the bulk `bytes` fields of the snapshot
 * streams: proto-loader's serializer would copy every megabyte into a new buffer (protobufjs's
 * fromObject and encode) before grpc-js copies it once more into its frame. A method whose serializer
 * is wrapped by passPreserialized sends a Preserialized value's bytes as they are; other values go
 * through the method's own serializer.
 */
import type * as grpc from '@grpc/grpc-js';

/** A message's protobuf encoding, sent as is. */
export class Preserialized {
  constructor(readonly bytes: Buffer) {}
}

/** A method serializer that passes Preserialized values through and serializes the rest with `serialize`. */
export function passPreserialized<T>(serialize: (value: T) => Buffer): (value: T | Preserialized) => Buffer {
  return (value) => (value instanceof Preserialized ? value.bytes : serialize(value));
}

/**
 * Generated handlers `H` whose unary method `M` may answer with Preserialized bytes: for a method whose
 * definition's serializer is wrapped by passPreserialized, so the handler's reply type says what it sends.
 */
export type AnsweringPreserialized<H, M extends keyof H> = Omit<H, M> & {
  [K in M]: H[K] extends grpc.handleUnaryCall<infer Req, infer Res> ? grpc.handleUnaryCall<Req, Res | Preserialized> : never;
};

const LENGTH_DELIMITED = 2;

/** Bytes before a length-delimited field's contents, at most: a one-byte tag (field < 16) and a 32-bit length. */
export const BYTES_FIELD_HEADROOM = 6;

/**
 * A message of one `bytes` field (number < 16) holding `framed`'s bytes from `headroom` on, encoded in
 * place: the tag and the length go into the free bytes just before the contents (no copy).
 */
export function bytesFieldMessage(field: number, framed: Buffer, headroom: number): Preserialized {
  if (field < 1 || field > 15 || headroom < BYTES_FIELD_HEADROOM)
    throw new RangeError(`bytesFieldMessage: field ${field} or headroom ${headroom} out of range`);
  const length = framed.length - headroom;
  let varintBytes = 1;
  for (let l = length >>> 7; l > 0; l >>>= 7) varintBytes++;
  let at = headroom - varintBytes - 1;
  const start = at;
  framed[at++] = (field << 3) | LENGTH_DELIMITED;
  let l = length;
  while (l > 0x7f) {
    framed[at++] = (l & 0x7f) | 0x80;
    l >>>= 7;
  }
  framed[at] = l;
  return new Preserialized(framed.subarray(start));
}
