/**
 * src/server/convert/state-bytes: SetState's request sections written straight into kernel structs are the
 * bytes the general path writes (stateFromProto over the decoded base, then the ffi's encoders), byte for
 * byte, and a bad request is refused with the same invalid_argument (message and every violation, in order).
 * Fuzzed both ways: the bases are random or boundary kernel bytes (flag bytes 0, 1 and neither, every
 * u64 across the varint steps); the requests are GetState's answer for other random values, as the wire
 * decodes it, then edited: absent sub-messages, empty and short repeated fields, out-of-range integers,
 * bad u64 strings, wrong types, wrong byte lengths, too many entries.
 */
import { randomBytes, randomInt } from 'node:crypto';
import * as S from '../../src/ffi/sections';
import { BYTE_SECTIONS, type ByteSection } from '../../src/ffi/vcpu';
import { stateFromProto, stateToProto } from '../../src/server/convert';
import { BASE_UNUSED, stateBytesFromProto, type BaseBytes } from '../../src/server/convert/state-bytes';
import { vcpudServiceDefinitions } from '../../src/server/service-definitions';
import type { VcpuState__Output } from '../../src/api/generated/vcpud/v1/VcpuState';
import { VcpudError } from '../../src/errors';
import { randomValue } from '../support/random-state';

const setState = vcpudServiceDefinitions().VcpuStateService.SetState;
/** A VcpuState as the server's handler receives it: through the wire and proto-loader. */
const overTheWire = (state: object) =>
  (setState.requestDeserialize(setState.requestSerialize({ vmId: 'x', vcpuId: 0, state })) as { state: VcpuState__Output }).state;

const BOUNDARY = [0x00, 0x01, 0x02, 0x7f, 0x80, 0xff];
const isByteSection = (s: S.SectionName): s is ByteSection => (BYTE_SECTIONS as readonly string[]).includes(s);

function baseBytes(section: ByteSection, round: number): Buffer {
  const entries = randomInt(0, 41);
  const size = section === 'cpuid2' ? S.cpuid2Size(entries + randomInt(0, 3)) : S.SECTIONS[section].size;
  const kind = round % 3;
  const b =
    kind === 0
      ? randomBytes(size)
      : kind === 1
        ? Buffer.alloc(size, BOUNDARY[(round >> 2) % BOUNDARY.length])
        : Buffer.from(Array.from({ length: size }, () => BOUNDARY[randomInt(BOUNDARY.length)]));
  if (section === 'cpuid2') b.writeUInt32LE(entries, 0);
  if (section === 'xcrs') b.writeUInt32LE(randomInt(0, S.KVM_MAX_XCRS + 1), 0);
  return b;
}

/** The same base both ways: kernel bytes for the new path, decoded for stateFromProto. */
function bases(round: number) {
  const bytes: Record<string, unknown> = {};
  const decoded: Record<string, unknown> = {};
  for (const s of S.SECTION_NAMES) {
    if (s === 'msrs') continue; // SetState reads no base for msrs
    if (isByteSection(s)) {
      const b = baseBytes(s, round);
      bytes[s] = b;
      decoded[s] = S.SECTIONS[s].decode(Buffer.from(b));
    } else bytes[s] = decoded[s] = s === 'mp_state' ? { mpState: 1 } : s === 'tsc_khz' ? 1000 : randomValue(s);
  }
  return { bytes: bytes as BaseBytes, decoded: decoded as Partial<S.SectionValues> };
}

type Obj = Record<string, any>;
const BAD_U64 = [
  '',
  '-1',
  '1.5',
  'abc',
  '18446744073709551616',
  '0x10',
  1.5,
  -1,
  2 ** 60,
  true,
  null,
  { low: 1, high: -1, unsigned: false },
  { low: 5, high: 7 },
];
const BAD_UINT = [-1, 256, 65536, 2 ** 32, 1.5, '7', null, true, 15, 16, 4, 3];
const BAD_BOOL = [0, 1, 'true', null];

/** One random edit somewhere in `o` (a request section), recursing into messages and lists. */
function edit(o: Obj, depth = 0): void {
  // An earlier edit may have put a string or bytes where a message or list element was.
  if (o === null || typeof o !== 'object' || o instanceof Uint8Array) return;
  const keys = Object.keys(o);
  if (!keys.length) return;
  const k = keys[randomInt(keys.length)];
  const v = o[k];
  const r = randomInt(100);
  if (Array.isArray(v)) {
    if (r < 20) o[k] = [];
    else if (r < 30) o[k] = v.slice(0, randomInt(v.length + 1));
    else if (r < 40) o[k] = [...v, ...v, ...v, ...v, ...v, ...v, ...v].slice(0, randomInt(300));
    else if (r < 45) o[k] = 'not a list';
    else if (v.length && typeof v[0] === 'object' && !(v[0] instanceof Uint8Array)) edit(v[randomInt(v.length)], depth + 1);
    else if (v.length) v[randomInt(v.length)] = r < 70 ? randomBytes(randomInt(14, 19)) : BAD_U64[randomInt(BAD_U64.length)];
  } else if (v !== null && typeof v === 'object' && !(v instanceof Uint8Array)) {
    if (r < 25) o[k] = null;
    else edit(v, depth + 1);
  } else if (v instanceof Uint8Array) o[k] = randomBytes(Math.max(0, v.length + randomInt(-2, 3)));
  else if (typeof v === 'string') o[k] = r < 50 ? BAD_U64[randomInt(BAD_U64.length)] : (randomBytes(8).readBigUInt64LE(0) >> BigInt(randomInt(64))).toString();
  else if (typeof v === 'number') o[k] = BAD_UINT[randomInt(BAD_UINT.length)];
  else if (typeof v === 'boolean') o[k] = r < 70 ? !v : BAD_BOOL[randomInt(BAD_BOOL.length)];
}

/** A request: GetState's answer for random values of some sections, through the wire, then `edits` random edits. */
function request(sections: readonly S.SectionName[], edits: number): VcpuState__Output {
  // xsave at the legacy size, which every base (the host's size) holds.
  const value = (s: S.SectionName) => (s === 'mp_state' ? { mpState: randomInt(0, 10) } : s === 'xsave' ? randomBytes(S.SECTIONS.xsave.size) : randomValue(s));
  const values = Object.fromEntries(sections.map((s) => [s, value(s)]));
  const p = overTheWire(stateToProto(values as Partial<S.SectionValues>)) as unknown as Obj;
  const present = Object.keys(p).filter((k) => p[k] !== null);
  for (let i = 0; i < edits && present.length; i++) edit(p[present[randomInt(present.length)]]);
  return p as VcpuState__Output;
}

type Outcome = { ok: Record<string, unknown> } | { error: { kind: string; message: string; details: unknown } };

function outcome(fn: () => Record<string, unknown>): Outcome {
  try {
    return { ok: fn() };
  } catch (e) {
    if (!(e instanceof VcpudError)) throw e;
    return { error: { kind: e.kind, message: e.message, details: e.details } };
  }
}

/** The general path's result with its byte sections encoded as the ffi writes them. */
function generalBytes(p: VcpuState__Output, base: Partial<S.SectionValues>): Record<string, unknown> {
  const values = stateFromProto(p, base) as Record<string, unknown>;
  return Object.fromEntries(
    Object.entries(values).map(([s, v]) => [s, isByteSection(s as S.SectionName) ? S.SECTIONS[s as ByteSection].encode(v as never) : v]),
  );
}

function expectSame(p: VcpuState__Output, round: number, withBase = true): Outcome {
  const b = bases(round);
  const expected = outcome(() => generalBytes(p, withBase ? b.decoded : {}));
  const actual = outcome(() => stateBytesFromProto(p, withBase ? b.bytes : {}) as Record<string, unknown>);
  expect(actual).toEqual(expected);
  if ('ok' in actual && 'ok' in expected)
    for (const [s, v] of Object.entries(actual.ok)) if (Buffer.isBuffer(v)) expect(v.equals(expected.ok[s] as Buffer)).toBe(true);
  return actual;
}

describe('SetState request sections written straight into kernel structs', () => {
  test('unedited requests of every section over fuzzed bases: the same bytes', () => {
    for (let round = 0; round < 150; round++) {
      const r = expectSame(request(S.SECTION_NAMES, 0), round);
      expect('error' in r ? r.error.message : 'ok').toBe('ok');
    }
  });

  test('edited requests: the same bytes, or the same invalid_argument', () => {
    let refused = 0;
    for (let round = 0; round < 1500; round++) {
      const sections = round % 3 ? S.SECTION_NAMES.filter(() => randomInt(3) === 0) : S.SECTION_NAMES;
      if ('error' in expectSame(request(sections, 1 + randomInt(4)), round)) refused++;
    }
    // Both kinds of outcome were compared (the edits make some requests valid, most not).
    expect(refused).toBeGreaterThan(100);
    expect(refused).toBeLessThan(1500);
  });

  test('each byte section alone, edited, with and without a base', () => {
    for (const s of BYTE_SECTIONS)
      for (let round = 0; round < 60; round++) {
        expectSame(request([s], round % 4), round, true);
        expectSame(request([s], round % 4), round, false);
      }
  });

  test('the sections SetState reads no base for (BASE_UNUSED) come out the same with or without one', () => {
    for (const s of BASE_UNUSED)
      for (let round = 0; round < 200; round++) {
        const p = request([s], round % 4);
        const b = bases(round);
        const withBase = outcome(() => stateBytesFromProto(p, { [s]: s === 'msrs' ? randomValue('msrs') : b.bytes[s] }) as Record<string, unknown>);
        expect(withBase).toEqual(outcome(() => stateBytesFromProto(p, {}) as Record<string, unknown>));
      }
  });

  test('absent sub-messages and empty fixed-length lists take the base bytes; true keeps a non-zero flag byte', () => {
    const p = overTheWire(stateToProto({ sregs: randomValue('sregs'), vcpu_events: randomValue('vcpu_events'), fpu: randomValue('fpu') })) as unknown as Obj;
    p.sregs.cs = null;
    p.sregs.interruptBitmap = [];
    p.sregs.ds.present = true;
    p.vcpuEvents.exception = null;
    p.vcpuEvents.nmi.masked = true;
    p.fpu.xmm = [];
    const b = bases(1); // every base byte 0x01, 0x02, ... in turn
    for (let round = 0; round < BOUNDARY.length * 4; round++) expectSame(p as VcpuState__Output, round);
    const out = stateBytesFromProto(p as VcpuState__Output, b.bytes);
    expect(out.sregs!.subarray(0, 23).equals((b.bytes.sregs as Buffer).subarray(0, 23))).toBe(true); // cs, without its padding byte
  });
});
