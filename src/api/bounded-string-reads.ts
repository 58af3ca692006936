/**
 * protobufjs's Node reader (BufferReader) decodes a string field whose declared length runs past the
 * end of the message as the bytes that are there: `0a 05 61` reads as a field 1 of "a". Its other
 * readers, its own bytes fields and protobuf's other implementations refuse such a message (index
 * out of range). vcpud's messages carry ids and names, where a cut-short string would name something
 * else, so every message vcpud decodes goes through the same bounds check as a bytes field.
 */
import { BufferReader } from 'protobufjs';

interface ReaderState {
  buf: Buffer;
  pos: number;
  len: number;
  uint32(): number;
}

/** A string field, refused (RangeError, protobufjs's own wording) when it runs past the message. */
function boundedString(this: ReaderState): string {
  const length = this.uint32();
  if (this.pos + length > this.len) throw new RangeError(`index out of range: ${this.pos} + ${length} > ${this.len}`);
  return this.buf.toString('utf8', this.pos, (this.pos += length));
}

/** Installs the bounded string read on protobufjs's Node reader (once; idempotent). */
export function boundStringReads(): void {
  const proto = BufferReader.prototype as unknown as { string: unknown };
  if (typeof proto.string !== 'function')
    throw new Error('protobufjs internals changed (BufferReader.prototype.string is missing); update src/api/bounded-string-reads.ts');
  proto.string = boundedString;
}
