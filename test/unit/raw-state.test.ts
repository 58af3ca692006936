/**
 * src/server/convert/raw-state: GetState's response written from the kernel's struct bytes is the same,
 * byte for byte and decoded field for field, as the general path writes (decode the structs, stateToProto,
 * the wire encoder), over fuzzed kernel bytes of every section: random bytes, and bytes drawn from boundary
 * values (0, 1, 0x7f, 0x80, 0xff) so every u64 crosses the varint length steps and every flag byte is
 * 0, 1 and neither. msrs come both as kvm_msrs bytes and as decoded entries.
 */
import { randomBytes, randomInt } from 'node:crypto';
import type * as protoLoader from '@grpc/proto-loader';
import * as S from '../../src/ffi/sections';
import { BYTE_SECTIONS, type ByteSection } from '../../src/ffi/vcpu';
import { stateToProto } from '../../src/server/convert';
import { getStateResponseEncoder, ResponseSlabs } from '../../src/server/convert/raw-state';
import { vcpudPackageDefinition } from '../../src/api/proto';
import { wireSerializer } from '../../src/server/wire-encoder';
import { randomValue } from '../support/random-state';

const definition = vcpudPackageDefinition();
const getState = (definition['vcpud.v1.VcpuStateService'] as protoLoader.ServiceDefinition).GetState;
const decode = (b: Buffer) => getState.responseDeserialize(b) as object;
const general = wireSerializer(definition, 'vcpud.v1.GetStateResponse');
const fromBytes = getStateResponseEncoder(definition);

const BOUNDARY = [0x00, 0x01, 0x7f, 0x80, 0xff];

/**
 * Kernel bytes of a byte section: random, all one boundary byte, or each byte a random boundary value.
 * cpuid2: 0-60 entries and up to 4 spare ones after them (capacity the kernel did not fill).
 */
function sectionBytes(section: ByteSection, round: number): Buffer {
  const entries = randomInt(0, 61);
  const size = section === 'cpuid2' ? S.cpuid2Size(entries + randomInt(0, 5)) : S.SECTIONS[section].size;
  const b = fill(size, round);
  if (section === 'cpuid2') b.writeUInt32LE(entries, 0);
  return b;
}

function fill(size: number, round: number): Buffer {
  const kind = round % 4;
  if (kind === 0) return randomBytes(size);
  if (kind === 1) return Buffer.alloc(size, BOUNDARY[(round >> 2) % BOUNDARY.length]);
  const b = Buffer.from(Array.from({ length: size }, () => BOUNDARY[randomInt(BOUNDARY.length)]));
  if (kind === 3) b.writeUInt32LE(randomInt(0, S.KVM_MAX_XCRS + 2), 0); // xcrs: around the 16-entry cap
  return b;
}

const isByteSection = (s: S.SectionName): s is ByteSection => (BYTE_SECTIONS as readonly string[]).includes(s);

/** The same vCPU state both ways: byte sections as bytes for the new path, decoded for the general one. */
function fuzzedState(round: number, sections: readonly S.SectionName[]) {
  const bytes: Record<string, unknown> = {};
  const decoded: Record<string, unknown> = {};
  for (const s of sections) {
    if (isByteSection(s)) {
      const b = sectionBytes(s, round);
      bytes[s] = b;
      decoded[s] = S.SECTIONS[s].decode(Buffer.from(b));
    } else {
      const v =
        s === 'mp_state'
          ? { mpState: BOUNDARY[round % BOUNDARY.length] }
          : s === 'tsc_khz'
            ? [0, 1, 0xffffffff, randomInt(2 ** 32 - 1)][round % 4]
            : randomValue(s);
      // msrs as a read of every MSR gives them: the kernel's kvm_msrs (in 3 of 4 rounds; with unreadable
      // indices, odd rounds, the encoder writes them from their entries).
      bytes[s] = s === 'msrs' && round % 4 !== 3 ? S.SECTIONS.msrs.encode(v as S.MsrEntry[]) : v;
      decoded[s] = v;
    }
  }
  return { bytes, decoded };
}

function expectSame(round: number, sections: readonly S.SectionName[]): void {
  const { bytes, decoded } = fuzzedState(round, sections);
  const extras = { msrsUnreadable: round % 2 ? [0x10, 0xc0000103, 0xffffffff] : [] };
  const implicitlyPaused = round % 3 === 0;
  const expected = general({ state: stateToProto(decoded as Partial<S.SectionValues>, extras), implicitlyPaused });
  const actual = fromBytes(bytes, extras, implicitlyPaused);
  expect(decode(actual)).toEqual(decode(expected));
  expect(actual.equals(expected)).toBe(true);
}

describe('GetState response from kernel bytes', () => {
  test('every section, fuzzed: the same bytes as the general path', () => {
    for (let round = 0; round < 200; round++) expectSame(round, S.SECTION_NAMES);
  });

  test('each byte section alone and random subsets of sections', () => {
    for (const s of BYTE_SECTIONS) for (let round = 0; round < 20; round++) expectSame(round, [s]);
    for (let round = 0; round < 100; round++)
      expectSame(
        round,
        S.SECTION_NAMES.filter(() => randomInt(2) === 1),
      );
    expectSame(0, []);
  });

  test('decoded values of the byte sections (callers without bytes) go through the converters', () => {
    const { decoded } = fuzzedState(0, S.SECTION_NAMES);
    const expected = general({ state: stateToProto(decoded as Partial<S.SectionValues>, {}), implicitlyPaused: false });
    expect(fromBytes(decoded, {}, false).equals(expected)).toBe(true);
  });

  test('msrs, from their entries and from kvm_msrs bytes: every named MSR, unnamed ones, u64 boundaries, with and without unreadable indices', () => {
    const DATA = [0n, 1n, 0x7fn, 0x80n, 0xffff_ffffn, 0x1_0000_0000n, 0x7fff_ffff_ffff_ffffn, 0x8000_0000_0000_0000n, 0xffff_ffff_ffff_ffffn];
    const named = [...S.MSR_NAMES.keys()];
    const unnamed = [0, 0x7f, 0x80, 0xffffffff, ...Array.from({ length: 8 }, () => randomInt(2 ** 32 - 1))].filter((i) => !S.MSR_NAMES.has(i));
    const indices = [...named, ...unnamed];
    const random64 = () => randomBytes(8).readBigUInt64LE(0);
    for (let round = 0; round < 40; round++) {
      const msrs = indices.map((index, i) => ({ index, reserved: 0, data: round % 2 ? DATA[(i + round) % DATA.length] : random64() }));
      for (const extras of [{}, { msrsUnreadable: [] }, { msrsUnreadable: [0x10, 0, 0xffffffff] }]) {
        const expected = general({ state: stateToProto({ msrs }, extras), implicitlyPaused: false });
        expect(fromBytes({ msrs }, extras, false).equals(expected)).toBe(true);
        expect(fromBytes({ msrs: S.SECTIONS.msrs.encode(msrs) }, extras, false).equals(expected)).toBe(true);
      }
    }
    // One buffer refilled with other MSRs (as a caller reusing it might): written from what it now lists.
    const reused = S.SECTIONS.msrs.encode(indices.map((index) => ({ index, data: 5n })));
    fromBytes({ msrs: reused }, {}, false);
    const other = indices.map((index, i) => ({ index: (index ^ (i % 2)) >>> 0, reserved: 0, data: BigInt(i) }));
    S.SECTIONS.msrs.encode(other).copy(reused);
    expect(fromBytes({ msrs: reused }, {}, false).equals(general({ state: stateToProto({ msrs: other }, {}), implicitlyPaused: false }))).toBe(true);
    const none = general({ state: stateToProto({ msrs: [] }, {}), implicitlyPaused: false });
    expect(fromBytes({ msrs: [] }, {}, false).equals(none)).toBe(true);
    expect(fromBytes({ msrs: S.SECTIONS.msrs.encode([]) }, {}, false).equals(none)).toBe(true);
  });

  test('bytes that do not hold what they describe are refused, not misread', () => {
    expect(() => fromBytes({ regs: Buffer.alloc(S.SECTIONS.regs.size - 8) }, {}, false)).toThrow(/regs is 136 bytes/);
    const cpuid = Buffer.alloc(S.cpuid2Size(3));
    cpuid.writeUInt32LE(4, 0);
    expect(() => fromBytes({ cpuid2: cpuid }, {}, false)).toThrow(/cpuid2 is 128 bytes/);
    expect(() => fromBytes({ xsave: Buffer.alloc(S.SECTIONS.xsave.size - 1) }, {}, false)).toThrow(/xsave is 4095 bytes/);
    const msrs = S.SECTIONS.msrs.encode([{ index: 0x10, data: 1n }]);
    msrs.writeUInt32LE(2, 0);
    expect(() => fromBytes({ msrs }, {}, false)).toThrow(/msrs is 24 bytes/);
  });
});

describe('response copies cut from slabs', () => {
  test('each copy holds its own bytes while later ones are cut, a full slab is left for a new one, large ones get their own', () => {
    const slabs = new ResponseSlabs(4096);
    const src = Buffer.alloc(1024);
    const copies: { copy: Buffer; bytes: Buffer }[] = [];
    for (let i = 0; i < 16; i++) {
      const n = 300 + randomInt(200); // at most slabBytes / 8
      const bytes = randomBytes(n);
      bytes.copy(src);
      src.fill(0xee, n); // bytes past n are not copied
      copies.push({ copy: slabs.copyOf(src, n), bytes });
    }
    for (const { copy, bytes } of copies) expect(copy.equals(bytes)).toBe(true);
    // 16 copies of 300-500 bytes do not fit one 4 KiB slab: at least two slabs were cut.
    const slabBuffers = new Set(copies.map((c) => c.copy.buffer));
    expect(slabBuffers.size).toBeGreaterThan(1);
    const large = slabs.copyOf(Buffer.alloc(1000, 7), 1000);
    expect(slabBuffers.has(large.buffer)).toBe(false);
    expect(large.equals(Buffer.alloc(1000, 7))).toBe(true);
    for (const { copy, bytes } of copies) expect(copy.equals(bytes)).toBe(true);
  });
});
