/**
 * The snapshot format's building blocks (CRC-32C, preamble, record headers, payloads), the
 * compatibility check and the MSR refusal policy (the snapshot directory and the atomic file sink:
 * snapshot-store.test.ts). No KVM needed (the native addon provides the CRC).
 */
import crypto from 'node:crypto';
import type { VcpudError } from '../../src/errors';
import type { HostCapabilities } from '../../src/ffi/capabilities';
import { native } from '../../src/ffi/native';
import { SECTION_NAMES, type CpuidEntry2, type SectionName } from '../../src/ffi/sections';
import { compatibilityViolations, cpuidViolations } from '../../src/vm/snapshot-compat';
import {
  bitmapRuns,
  crc32c,
  decodeNamed,
  decodePreamble,
  decodeRecordHeader,
  encodeNamed,
  encodePreamble,
  encodeRecordHeader,
  pagePad,
  RECORD_HEADER_SIZE,
  RecordKind,
  type SnapshotHeader,
} from '../../src/vm/snapshot-format';
import { SELF_REFUSING_MSRS, writeStateWithMsrPolicy } from '../../src/vm/snapshot-restore';

const kindOf = (fn: () => unknown) => {
  try {
    fn();
  } catch (e) {
    return { kind: (e as VcpudError).kind, message: (e as Error).message };
  }
  throw new Error('expected an error');
};

describe('CRC-32C', () => {
  test('the check value of "123456789" is 0xe3069283 (hardware and table paths)', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(native.crc32c(Buffer.from('123456789'), 0, true)).toBe(0xe3069283);
    expect(crc32c(Buffer.alloc(0))).toBe(0);
  });

  test('both paths agree on every length and alignment, and checksums continue across pieces', () => {
    for (const len of [1, 7, 8, 9, 255, 767, 768, 769, 8191, 24575, 24576, 24577, 100_003, 1 << 20]) {
      const b = crypto.randomBytes(len + 5).subarray(len % 5);
      const hw = native.crc32c(b);
      expect(native.crc32c(b, 0, true)).toBe(hw);
      const cut = Math.floor(len / 3);
      expect(crc32c(b.subarray(cut), crc32c(b.subarray(0, cut)))).toBe(hw);
    }
  });

  test('the fused copy checksums what it copies, on every length and alignment, continuing a seed', () => {
    for (const len of [0, 1, 7, 8, 9, 767, 768, 769, 4096, 8191, 24577, 100_003]) {
      const src = crypto.randomBytes(len + 5).subarray(len % 5, (len % 5) + len);
      const into = Buffer.alloc(len + 16, 0xa5);
      const dst = into.subarray(3, 3 + len);
      expect(native.crc32c(src, 0x1234, false, dst)).toBe(native.crc32c(src, 0x1234));
      expect(dst.equals(src)).toBe(true);
      expect(into.subarray(0, 3).every((x) => x === 0xa5) && into.subarray(3 + len).every((x) => x === 0xa5)).toBe(true); // nothing outside
    }
    expect(() => native.crc32c(Buffer.alloc(8), 0, false, Buffer.alloc(7))).toThrow(/copyInto must hold the buffer/);
  });
});

describe('preamble and record headers', () => {
  test('the preamble round-trips; other bytes are not a snapshot; a newer version is refused', () => {
    expect(decodePreamble(encodePreamble())).toBe(2);
    expect(decodePreamble(encodePreamble(1))).toBe(1); // version 1 files are still read
    expect(kindOf(() => decodePreamble(Buffer.from('GIF89a..........')))).toMatchObject({ kind: 'invalid_argument', message: /not a vcpud snapshot/ });
    expect(kindOf(() => decodePreamble(encodePreamble(3)))).toMatchObject({ kind: 'failed_precondition', message: /version 3 is not supported/ });
    const flipped = encodePreamble();
    flipped[9] ^= 1;
    expect(kindOf(() => decodePreamble(flipped))).toMatchObject({ kind: 'data_loss', message: /checksum mismatch in the preamble/ });
    expect(kindOf(() => decodePreamble(Buffer.alloc(3)))).toMatchObject({ kind: 'data_loss', message: /truncated/ });
  });

  test('a record header round-trips and any flipped bit is caught, naming the chunk', () => {
    const h = { kind: RecordKind.MemoryData, seq: 7, pad: 4000, payloadCrc: 0xdeadbeef, payloadLength: 4 << 20, aux: 0x1000000, aux2: 1024 };
    const b = encodeRecordHeader(h);
    expect(b.length).toBe(RECORD_HEADER_SIZE);
    expect(decodeRecordHeader(b, 0x5000, 7)).toEqual({ ...h, offset: 0x5000 });
    for (let bit = 0; bit < RECORD_HEADER_SIZE * 8; bit += 13) {
      const bad = Buffer.from(b);
      bad[bit >> 3] ^= 1 << (bit & 7);
      expect(kindOf(() => decodeRecordHeader(bad, 0x5000, 7))).toMatchObject({ kind: 'data_loss', message: /chunk 7/ });
    }
    expect(kindOf(() => decodeRecordHeader(b, 0x5000, 8))).toMatchObject({
      kind: 'data_loss',
      message: /carries chunk number 7: a chunk is missing or repeated/,
    });
  });

  test('named payloads, bitmap runs and page padding', () => {
    expect(decodeNamed(encodeNamed('irqchip.2', Buffer.from([1, 2, 3])))).toEqual({ name: 'irqchip.2', data: Buffer.from([1, 2, 3]) });
    expect(bitmapRuns(Buffer.from([0b1110_0111, 0b1000_0001]), 16)).toEqual([
      [0, 3],
      [5, 4],
      [15, 1],
    ]);
    for (const at of [0, 16, 4048, 4096, 12345]) expect((at + RECORD_HEADER_SIZE + pagePad(at)) % 4096).toBe(0);
  });
});

// ---------------------------------------------------------------------------------------------

const leaf = (fn: number, index: number, regs: Partial<CpuidEntry2> = {}): CpuidEntry2 => ({
  function: fn,
  index,
  flags: 0,
  eax: 0,
  ebx: 0,
  ecx: 0,
  edx: 0,
  ...regs,
});

function hostCaps(over: Partial<HostCapabilities> = {}): HostCapabilities {
  const sections = Object.fromEntries(SECTION_NAMES.map((s) => [s, { readable: true, writable: true }])) as HostCapabilities['sections'];
  return {
    kvmPath: '/dev/kvm',
    apiVersion: 12,
    kernelRelease: '6.1',
    kvmModule: 'kvm_amd',
    vendor: 'amd',
    caps: { KVM_CAP_IRQCHIP: 1 },
    vcpuMmapSize: 12288,
    xsaveSize: 4096,
    maxPhysAddrBits: 48,
    msrIndexList: [0x10, 0x174, 0xc0000080],
    nested: { maxSize: 0, cpuidVmx: false, cpuidSvm: false, supported: false, reason: 'no nested here' },
    sections,
    ...over,
  };
}

function header(over: (h: SnapshotHeader) => void = () => {}): SnapshotHeader {
  const sections = (['regs', 'sregs', 'xsave', 'msrs', 'lapic'] as SectionName[]).map((name) => ({ name, size: name === 'xsave' ? 4096 : 64 }));
  const h: SnapshotHeader = {
    format: 'vcpud-snapshot',
    formatVersion: 1,
    createdAt: new Date(0).toISOString(),
    producer: { name: 'vcpud', version: '0.1.0' },
    source: {
      hostname: 'a',
      kernelRelease: '6.1',
      kvmModule: 'kvm_amd',
      vendor: 'amd',
      kvmApiVersion: 12,
      nestedMaxSize: 0,
      xsaveSize: 4096,
      maxPhysAddrBits: 48,
      msrIndexList: [0x10, 0x174],
      caps: {},
    },
    vm: {
      id: 'x',
      name: 'n',
      memoryBytes: 1 << 21,
      vcpuCount: 1,
      irqchip: true,
      exposeNested: false,
      cpuid: [leaf(1, 0, { ecx: 0x8000_0001 | (1 << 27), edx: 0x100 }), leaf(0x80000008, 0, { eax: 40 })],
      memory: [{ slot: 0, guestPhysAddr: 0, size: 1 << 21 }],
    },
    vcpus: [{ id: 0, runState: 'running', sections, nestedSize: 0, msrsUnreadable: [] }],
    vmState: [],
    memoryLayout: { pageSize: 4096, chunkPages: 1024 },
  };
  over(h);
  return h;
}
const supported = [leaf(1, 0, { ecx: 0x8000_0001, edx: 0x100 }), leaf(0x80000008, 0, { eax: 48 })];

describe('compatibility check', () => {
  test('a snapshot of this host is compatible (dynamic CPUID bits such as OSXSAVE are not features)', () => {
    expect(compatibilityViolations(header(), hostCaps(), supported)).toEqual([]);
  });

  test('every incompatibility is listed, each with its rule', () => {
    const h = header((h) => {
      h.source.vendor = 'intel';
      h.source.kvmApiVersion = 11;
      h.source.msrIndexList.push(0x12345678);
      h.vm.cpuid[0].ecx |= 1 << 5; // VMX, which this host does not offer
      h.vm.cpuid.push(leaf(7, 0, { ebx: 0x20 }));
      h.vm.cpuid[1].eax = 52;
      h.vcpus[0].sections[2].size = 8192;
      h.vcpus[0].nestedSize = 8192;
      h.vm.memory = [{ slot: 0, guestPhysAddr: 0x100000, size: 1 << 21 }];
    });
    const caps = hostCaps({ caps: {} });
    caps.sections.lapic = { readable: true, writable: false, reason: 'no irqchip cap' };
    const v = compatibilityViolations(h, caps, supported);
    expect(v.map((x) => x.rule).sort()).toEqual(
      [
        'snapshot.vendor',
        'snapshot.kvm_api_version',
        'snapshot.memory_layout',
        'snapshot.irqchip',
        'snapshot.xsave_size',
        'snapshot.nested_state',
        'snapshot.section',
        'snapshot.msrs',
        'snapshot.cpuid',
        'snapshot.cpuid',
        'snapshot.max_phys_addr',
      ].sort(),
    );
    expect(v.find((x) => x.rule === 'snapshot.msrs')?.message).toMatch(/0x12345678/);
    expect(
      v
        .filter((x) => x.rule === 'snapshot.cpuid')
        .map((x) => x.field)
        .sort(),
    ).toEqual(['vm.cpuid[0x1.0].ecx', 'vm.cpuid[0x7.0].ebx']);
  });

  test('nested state larger than this host takes', () => {
    const h = header((h) => (h.vcpus[0].nestedSize = 8192));
    const caps = hostCaps({ nested: { maxSize: 4096, cpuidVmx: false, cpuidSvm: true, supported: true } });
    expect(compatibilityViolations(h, caps, supported).map((x) => x.rule)).toEqual(['snapshot.nested_state_size']);
  });

  test('cpuidViolations names the missing bits', () => {
    expect(cpuidViolations([leaf(0x80000001, 0, { ecx: 0b101 })], [leaf(0x80000001, 0, { ecx: 0b001 })])[0].message).toMatch(/bits 2 \(mask 0x4\)/);
  });
});

describe('MSRs that refuse their own value', () => {
  /** A vCPU whose KVM_SET_MSRS refuses `refuse` (only msrs is written in these tests). */
  function fakeVcpu(refuse: number) {
    const set: number[] = [];
    return {
      set,
      getMsrs: (indices: number[]) => ({ entries: indices.map((index) => ({ index, data: 0n })), processed: indices.length }),
      setMsrs: (entries: { index: number; data: bigint }[]) => {
        const i = entries.findIndex((e) => e.index === refuse);
        const ok = i < 0 ? entries : entries.slice(0, i);
        set.push(...ok.map((e) => e.index));
        return i < 0 ? { entries, processed: entries.length } : { entries: ok, processed: i, firstRefused: refuse };
      },
    };
  }
  const ctx = { caps: hostCaps(), irqchip: true };
  const msrs = [0x10, 0x4b564d06, 0x174].map((index) => ({ index, data: 5n }));

  test('a known one is skipped with a note naming it; the others are set', () => {
    expect(SELF_REFUSING_MSRS[0x4b564d06]).toBeDefined();
    const v = fakeVcpu(0x4b564d06);
    const notes: string[] = [];
    expect(writeStateWithMsrPolicy(v as never, ctx, { msrs }, notes, 'vCPU 0')).toEqual(['msrs']);
    expect(notes).toHaveLength(1);
    expect(notes[0]).toMatch(/vCPU 0: KVM_SET_MSRS refused MSR 0x4b564d06 .* skipped/);
    expect(v.set.slice(-2)).toEqual([0x10, 0x174]);
  });

  test('an unknown one fails the restore, naming the MSR', () => {
    const notes: string[] = [];
    const e = kindOf(() => writeStateWithMsrPolicy(fakeVcpu(0x174) as never, ctx, { msrs }, notes, 'vCPU 0'));
    expect(e.message).toMatch(/refused MSR 0x174/);
    expect(notes).toEqual([]);
  });
});
