/**
 * The migration data plane's wire format: a sequence of envelopes on one connection (a unix socket
 * or TLS over TCP). Each envelope is a 16-byte header (magic, type, payload length, CRC-32C of the
 * payload) and its payload. Page payloads are frames of page-codec.ts, which carry their own
 * checksums; control payloads are small JSON objects; STATE is a run of snapshot-format records.
 *
 * Source -> destination: HELLO, then per pass either PAGES envelopes (TLS) or PAGES_STREAM followed
 * by bare page frames up to an end frame (a unix socket: written and read natively, straight from
 * and into guest memory), then PASS_END; then STATE, COMMIT.
 * Destination -> source: HELLO_OK, PASS_ACK per PASS_END (all its pages are in guest memory),
 * COMMITTED, or ERROR at any point.
 */
import { crc32c } from '../snapshot-format';

/** 2: PAGES_STREAM. 3: page frames version 2 (tearable frames, torn pages in PASS_ACK). */
export const PROTOCOL_VERSION = 3;
export const ENVELOPE_HEADER_SIZE = 16;
const MAGIC = 0x47494d56; // "VMIG" little endian
/** Largest payload either side accepts (page envelopes are at most a few MiB). */
export const MAX_ENVELOPE_PAYLOAD = 32 * 1024 * 1024;

export enum EnvelopeType {
  Hello = 1,
  HelloOk = 2,
  Pages = 3,
  PassEnd = 4,
  PassAck = 5,
  State = 6,
  Commit = 7,
  Committed = 8,
  Error = 9,
  /** No payload: page frames follow on the connection itself, up to an end frame (native/page_frames.h). */
  PagesStream = 10,
}

export interface Hello {
  version: number;
  migrationId: string;
  token: string;
}
export interface PassEnd {
  pass: number;
}
export interface PassAck {
  pass: number;
  pagesApplied: number;
  /**
   * Pages torn in flight so far and not yet sent again (native/page_frames.h): the guest rewrote
   * them after the harvest that selected them, so the next pass carries them anyway.
   */
  tornPages: number;
}
export interface Commit {
  /** Resume the vCPUs that were running at the switch-over. */
  run: boolean;
}
export interface Committed {
  vmId: string;
  restoreMs: number;
  resumeMs: number;
  notes: string[];
  /** The committed VM as the destination's API describes it (absent from an older destination). */
  vm?: unknown;
}
export interface WireError {
  message: string;
  kind: string;
  reason?: string;
}

export function envelopeHeader(type: EnvelopeType, payload: Buffer, checksum = true): Buffer {
  return writeEnvelopeHeader(Buffer.alloc(ENVELOPE_HEADER_SIZE), type, payload, checksum);
}

/** Writes the header of an envelope of `payload` into the first ENVELOPE_HEADER_SIZE bytes of `h`; returns `h`. */
export function writeEnvelopeHeader(h: Buffer, type: EnvelopeType, payload: Buffer, checksum = true): Buffer {
  h.writeUInt32LE(MAGIC, 0);
  h.writeUInt32LE(type, 4);
  h.writeUInt32LE(payload.length, 8);
  h.writeUInt32LE(checksum ? crc32c(payload) : 0, 12);
  return h;
}

export function jsonEnvelope(type: EnvelopeType, body: object): Buffer {
  const payload = Buffer.from(JSON.stringify(body));
  return Buffer.concat([envelopeHeader(type, payload), payload]);
}

export interface EnvelopeHead {
  type: EnvelopeType;
  length: number;
  crc: number;
}

/** Decodes and checks an envelope header; a bad one means the peer is not a vcpud of this version. */
export function decodeEnvelopeHeader(b: Buffer): EnvelopeHead {
  if (b.readUInt32LE(0) !== MAGIC) throw new Error('bad envelope magic: the peer does not speak the vcpud migration protocol');
  const type = b.readUInt32LE(4) as EnvelopeType;
  const length = b.readUInt32LE(8);
  if (!(type in EnvelopeType)) throw new Error(`unknown envelope type ${type}`);
  if (length > MAX_ENVELOPE_PAYLOAD) throw new Error(`envelope of ${length} bytes is over the ${MAX_ENVELOPE_PAYLOAD}-byte limit`);
  return { type, length, crc: b.readUInt32LE(12) };
}

/** The checked payload of a control envelope as JSON. */
export function decodeJson<T>(head: EnvelopeHead, payload: Buffer): T {
  if (crc32c(payload) !== head.crc) throw new Error(`checksum mismatch in a ${EnvelopeType[head.type]} envelope`);
  return JSON.parse(payload.toString('utf8')) as T;
}
