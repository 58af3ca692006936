/**
 * The streamed snapshot's data path in-process on real KVM: a StreamSink that reuses its buffers once
 * they are sent produces the same bytes as the file snapshot of the same paused VM, and a stream read
 * back in pieces of any size (copied into guest memory on the pool, several chunks at once) reports
 * the first fault in stream order.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { probeCapabilities, type HostCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import type { ManagedVm } from '../../src/vm/managed-vm';
import { VmRegistry } from '../../src/vm/registry';
import { decodeRecordHeader, nextRecordOffset, PREAMBLE_SIZE, RECORD_HEADER_SIZE, RecordKind, type RecordHeader } from '../../src/vm/snapshot-format';
import { loadSnapshot, StreamSource } from '../../src/vm/snapshot-reader';
import { restoreSpec } from '../../src/vm/snapshot-restore';
import { captureSnapshot, holdAndPause, StreamSink, type HeldVm, type StreamSinkOptions } from '../../src/vm/snapshot-writer';
import { fileSink } from '../support/file-sink';
import { describeKvm } from '../support/kvm';

const MiB = 1 << 20;

/** The records of a snapshot, in order. */
function records(bytes: Buffer): RecordHeader[] {
  const out: RecordHeader[] = [];
  for (let at = PREAMBLE_SIZE, seq = 0; at < bytes.length; seq++) {
    const h = decodeRecordHeader(bytes.subarray(at, at + RECORD_HEADER_SIZE), at, seq);
    out.push(h);
    at = nextRecordOffset(h);
  }
  return out;
}

describeKvm('streamed snapshots in-process (real KVM)', () => {
  let kvm: Kvm;
  let caps: HostCapabilities;
  let registry: VmRegistry;
  let vm: ManagedVm;
  let held: HeldVm;
  let file: Buffer;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-snap-stream-'));

  beforeAll(async () => {
    kvm = Kvm.open();
    caps = probeCapabilities(kvm);
    registry = new VmRegistry(kvm, { maxVms: 4, maxVcpusPerVm: 4, maxMemoryPerVmBytes: 64 * MiB, maxMemoryTotalBytes: 256 * MiB });
    vm = registry.create({ memoryBytes: 32 * MiB, vcpuCount: 2 });
    // random pages with zero pages and zero runs between them
    const pattern = crypto.randomBytes(MiB);
    for (let gpa = 0; gpa < 32 * MiB; gpa += 3 * MiB) vm.writeMemory(gpa, pattern);
    for (let gpa = 4096; gpa < 32 * MiB; gpa += 7 * 4096) vm.writeMemory(gpa, pattern.subarray(0, 100));
    held = await holdAndPause(vm, 'test');
    const target = path.join(dir, 'file.snap');
    await captureSnapshot(vm, await fileSink(target), { caps, runStates: held.before });
    file = fs.readFileSync(target);
  });
  afterAll(() => {
    held?.release();
    registry.destroyAll();
    kvm.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /**
   * A stream capture whose consumer takes each chunk at once but lets it "leave" only later (like
   * grpc-js): the bytes are read when they leave, so a buffer the sink reused too early shows.
   */
  async function streamed(opts: StreamSinkOptions, releaseAfter: number): Promise<Buffer> {
    const out: Buffer[] = [];
    const taken: Promise<void>[] = [];
    const sink = new StreamSink(async (chunk, framed) => {
      expect(framed.length - chunk.length).toBe(opts.headroom ?? 0);
      expect(framed.subarray(opts.headroom ?? 0).equals(chunk)).toBe(true);
      const i = out.push(Buffer.alloc(0)) - 1;
      const left = new Promise<void>((resolve) =>
        setTimeout(() => {
          out[i] = Buffer.from(chunk);
          resolve();
        }, releaseAfter),
      );
      taken.push(left);
      if (opts.inFlight) await left; // inFlight: resolves once the bytes have left
    }, opts);
    await captureSnapshot(vm, sink, { caps, runStates: held.before });
    await Promise.all(taken);
    return Buffer.concat(out);
  }

  /** The same bytes from the first memory record on (header and clock differ between captures). */
  function expectSameAsFile(bytes: Buffer): void {
    expect(bytes.length).toBe(file.length);
    const memoryAt = records(file).find((h) => h.kind === RecordKind.MemoryMap)!.offset;
    expect(records(bytes).find((h) => h.kind === RecordKind.MemoryMap)!.offset).toBe(memoryAt);
    expect(bytes.subarray(memoryAt).equals(file.subarray(memoryAt))).toBe(true);
  }

  it('with buffers reused once sent, several in flight and headroom before each chunk: the file snapshot, byte for byte', async () => {
    expectSameAsFile(await streamed({ maxChunk: 256 * 1024, headroom: 6, inFlight: 3 }, 2));
  });

  it('one chunk at a time with fresh buffers (the default): the same bytes', async () => {
    expectSameAsFile(await streamed({ maxChunk: 100_000 }, 0));
  });

  it('read back in pieces of any size it restores memory; a corrupt chunk before a truncation is what is reported', async () => {
    const bytes = await streamed({ maxChunk: MiB, headroom: 6, inFlight: 8 }, 0);
    const check = (h: Parameters<typeof restoreSpec>[0]) => registry.checkSpec(restoreSpec(h));
    async function* pieces(b: Buffer, size: number) {
      for (let off = 0; off < b.length; off += size) yield b.subarray(off, off + size);
    }
    for (const size of [4093, 77_777, 3 * MiB]) {
      const loaded = await loadSnapshot(new StreamSource(pieces(bytes, size)), { check });
      const back = Buffer.alloc(32 * MiB);
      loaded.memory.read(0, back);
      expect(back.equals(vm.readMemory(0, 32 * MiB))).toBe(true);
      loaded.memory.release();
    }
    // a flipped byte in the second memory chunk's data, and the stream cut off inside the next
    // record's header: the checksum of that chunk is still being computed when the cut is found
    const data = records(bytes).filter((h) => h.kind === RecordKind.MemoryData && h.payloadLength > 0)[1];
    const bad = Buffer.from(bytes.subarray(0, nextRecordOffset(data) + 10));
    bad[data.offset + RECORD_HEADER_SIZE + data.pad + 10] ^= 0xff;
    await expect(loadSnapshot(new StreamSource(pieces(bad, 77_777)), { check })).rejects.toMatchObject({
      kind: 'data_loss',
      message: expect.stringContaining(`checksum mismatch in chunk ${data.seq}`),
    });
  });
});
