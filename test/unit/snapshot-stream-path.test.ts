/**
 * The snapshot streams' data path without KVM: guest-memory page copies to and from lists of
 * Buffers (the native addon), messages encoded in place for grpc-js (checked against proto-loader's
 * own decoding), and the bulk heap setting's nesting.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { bulkStreams, withBulkHeap } from '../../src/bulk-heap';
import { native } from '../../src/ffi/native';
import { BYTES_FIELD_HEADROOM, bytesFieldMessage, passPreserialized, Preserialized } from '../../src/api/preserialized';
import { vcpudProto } from '../../src/api/proto';
import { crc32c } from '../../src/vm/snapshot-format';

const PAGE = 4096;

describe('GuestMemory page copies to and from Buffer lists', () => {
  const pages = 64;
  // every third page left out: runs of two pages with holes between them
  const bitmap = Buffer.alloc(pages / 8);
  for (let i = 0; i < pages; i++) if (i % 3 !== 2) bitmap[i >> 3] |= 1 << (i & 7);
  const selected = [...Array(pages).keys()].filter((i) => i % 3 !== 2);
  /** Uneven pieces that add up to `total` (cut inside pages and across runs). */
  const piecesOf = (total: number) => {
    const out: Buffer[] = [];
    for (let left = total, n = 1; left > 0; n = (n * 7 + 3) % 9001) {
      const size = Math.min(left, 1000 + n);
      out.push(Buffer.alloc(size));
      left -= size;
    }
    return out;
  };

  it('copyPages fills the pieces in order with the selected pages; writePages puts them back; both give their CRC-32C', async () => {
    const src = new native.GuestMemory(pages * PAGE);
    const content = crypto.randomBytes(pages * PAGE);
    src.write(0, content);
    const packed = Buffer.concat(selected.map((i) => content.subarray(i * PAGE, (i + 1) * PAGE)));
    const pieces = piecesOf(packed.length);
    expect(await src.copyPages(0, pages, bitmap, pieces)).toBe(crc32c(packed));
    expect(Buffer.concat(pieces).equals(packed)).toBe(true);

    const dst = new native.GuestMemory(pages * PAGE);
    expect(await dst.writePages(0, pages, bitmap, pieces)).toBe(crc32c(packed));
    const back = Buffer.alloc(pages * PAGE);
    dst.read(0, back);
    for (let i = 0; i < pages; i++) {
      const want = selected.includes(i) ? content.subarray(i * PAGE, (i + 1) * PAGE) : Buffer.alloc(PAGE);
      expect({ page: i, same: back.subarray(i * PAGE, (i + 1) * PAGE).equals(want) }).toEqual({ page: i, same: true });
    }
    // one Buffer is a list of one; an offset inside the memory selects from there
    const one = Buffer.alloc(2 * PAGE);
    expect(await src.copyPages(8 * PAGE, 2, Buffer.from([3]), one)).toBe(crc32c(content.subarray(8 * PAGE, 10 * PAGE)));
    src.release();
    dst.release();
  });

  it('writePages with `exclusive` fills fresh anonymous pages without a fault each, the same bytes and CRC-32C as without', async () => {
    // The process's minor faults: a copy into fresh memory faults each page in (MADV_POPULATE_WRITE
    // counts them too); UFFDIO_COPY allocates them with their data and counts none.
    const minorFaults = () => Number(fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ')[7]);
    const many = 4096; // 16 MiB: far more faults than the rest of this process makes meanwhile
    const manyBitmap = Buffer.alloc(many / 8, 0xff);
    manyBitmap[3] = 0x5a; // holes: several runs
    const picked = [...Array(many).keys()].filter((i) => manyBitmap[i >> 3] & (1 << (i & 7)));
    const content = crypto.randomBytes(picked.length * PAGE);
    // 1 MiB messages less a record header: pages cut across pieces, as a stream restore receives them
    const pieces: Buffer[] = [];
    for (let at = 0; at < content.length; at += 1048570) pieces.push(content.subarray(at, at + 1048570));
    const filled = async (exclusive: boolean) => {
      const mem = new native.GuestMemory(many * PAGE);
      mem.write(PAGE, Buffer.alloc(8, 7)); // one selected page already present: written in place
      const before = minorFaults();
      const crc = await mem.writePages(0, many, manyBitmap, pieces, exclusive);
      const faults = minorFaults() - before;
      const back = Buffer.alloc(many * PAGE);
      mem.read(0, back);
      mem.release();
      const packed = Buffer.concat(picked.map((i) => back.subarray(i * PAGE, (i + 1) * PAGE)));
      const holesZero = [...Array(many).keys()].filter((i) => !picked.includes(i)).every((i) => back.subarray(i * PAGE, (i + 1) * PAGE).every((b) => b === 0));
      return { crc, faults, same: packed.equals(content), holesZero };
    };
    const plain = await filled(false);
    const exclusive = await filled(true);
    expect(plain).toMatchObject({ crc: crc32c(content), same: true, holesZero: true });
    expect(exclusive).toMatchObject({ crc: crc32c(content), same: true, holesZero: true });
    expect(plain.faults).toBeGreaterThanOrEqual(picked.length - 1);
    expect(exclusive.faults).toBeLessThan(picked.length / 4);
  });

  it('refuses pieces that do not add up to the pages, and elements that are not Buffers', () => {
    const mem = new native.GuestMemory(pages * PAGE);
    const total = selected.length * PAGE;
    expect(() => mem.writePages(0, pages, bitmap, [Buffer.alloc(total - 1)])).toThrow(/buffers hold \d+ bytes, the pages are \d+/);
    expect(() => mem.copyPages(0, pages, bitmap, [Buffer.alloc(total), Buffer.alloc(1)])).toThrow(/buffers hold/);
    expect(() => mem.writePages(0, pages, bitmap, [Buffer.alloc(total), 'x' as unknown as Buffer])).toThrow(/element 1 of the buffer list is not a Buffer/);
    expect(() => mem.writePages(PAGE * (pages - 1), 2, Buffer.from([3]), Buffer.alloc(2 * PAGE))).toThrow(/outside/);
    mem.release();
  });
});

describe('messages encoded in place', () => {
  const v1 = vcpudProto().vcpud.v1;
  const create = v1.SnapshotService.service.CreateSnapshot;
  const restore = v1.SnapshotService.service.RestoreSnapshotStream;

  it.each([0, 1, 127, 128, 16_383, 16_384, 1 << 20])(
    'a %d-byte data field decodes as CreateSnapshotResponse.data and RestoreSnapshotStreamRequest.data',
    (n) => {
      const data = crypto.randomBytes(n);
      const framed = Buffer.concat([Buffer.alloc(BYTES_FIELD_HEADROOM, 0xee), data]);
      const msg = bytesFieldMessage(2, framed, BYTES_FIELD_HEADROOM);
      expect(msg).toBeInstanceOf(Preserialized);
      expect(msg.bytes.buffer).toBe(framed.buffer); // in place: no copy
      for (const decoded of [create.responseDeserialize(msg.bytes), restore.requestDeserialize(msg.bytes)] as { data: Buffer }[])
        expect(decoded.data.equals(data)).toBe(true);
      // the bytes proto-loader itself produces
      expect(msg.bytes.equals(create.responseSerialize({ data }))).toBe(true);
    },
  );

  it('refuses a field number or headroom it cannot encode in place', () => {
    expect(() => bytesFieldMessage(16, Buffer.alloc(10), BYTES_FIELD_HEADROOM)).toThrow(RangeError);
    expect(() => bytesFieldMessage(2, Buffer.alloc(10), BYTES_FIELD_HEADROOM - 1)).toThrow(RangeError);
  });

  it('passPreserialized sends Preserialized bytes as they are and serializes anything else', () => {
    const serialize = passPreserialized(create.responseSerialize);
    const bytes = Buffer.from([1, 2, 3]);
    expect(serialize(new Preserialized(bytes))).toBe(bytes);
    const progress = { progress: { phase: 'SNAPSHOT_PHASE_MEMORY', memoryBytesDone: '4096', memoryBytesTotal: '8192', bytesWritten: '100' } };
    expect(serialize(progress as never).equals(create.responseSerialize(progress as never))).toBe(true);
  });
});

describe('withBulkHeap', () => {
  it('nests, and ends its setting after the last stream, also when one fails', async () => {
    expect(bulkStreams()).toBe(0);
    let inner = -1;
    await withBulkHeap(async () => {
      await expect(
        withBulkHeap(async () => {
          inner = bulkStreams();
          throw new Error('stream failed');
        }),
      ).rejects.toThrow('stream failed');
      expect(bulkStreams()).toBe(1);
    });
    expect(inner).toBe(2);
    expect(bulkStreams()).toBe(0);
  });
});
