/**
 * The switch-over's state on the data plane: the snapshot format's records (snapshot-format.ts),
 * one HEADER with the final run states, every vCPU's VCPU_STATE records (every section, nested state
 * included) and the VM_STATE records (irqchip, clock), each with its CRC-32C, as a snapshot file
 * carries them. Decoded into what restoreIntoNewVm takes.
 */
import { VcpudError } from '../../errors';
import {
  decodeNamed,
  decodeRecordHeader,
  encodeNamed,
  nextRecordOffset,
  payloadOffset,
  crc32c,
  RecordKind,
  RECORD_HEADER_SIZE,
  type SnapshotHeader,
} from '../snapshot-format';
import { encodeRecord, type CapturedState } from '../snapshot-writer';

export interface DecodedState {
  header: SnapshotHeader;
  vcpuState: Map<number, Map<string, Buffer>>;
  vmState: Map<string, Buffer>;
}

export function encodeState(s: CapturedState): Buffer {
  let seq = 0;
  const records = [encodeRecord(RecordKind.Header, seq++, Buffer.from(JSON.stringify(s.header)))];
  for (const v of s.vcpus) for (const [name, data] of v.records) records.push(encodeRecord(RecordKind.VcpuState, seq++, encodeNamed(name, data), v.meta.id));
  for (const [name, data] of s.vmState) records.push(encodeRecord(RecordKind.VmState, seq++, encodeNamed(name, data)));
  return Buffer.concat(records);
}

const bad = (message: string) => new VcpudError('data_loss', `migration state: ${message}`, { reason: 'MIGRATION_FAILED' });

/** Decodes and verifies (record checksums, every listed section present) the STATE payload. */
export function decodeState(buf: Buffer, expect: { memoryBytes: number; vcpuCount: number }): DecodedState {
  let header: SnapshotHeader | undefined;
  const vcpuState = new Map<number, Map<string, Buffer>>();
  const vmState = new Map<string, Buffer>();
  let offset = 0;
  for (let seq = 0; offset < buf.length; seq++) {
    if (buf.length - offset < RECORD_HEADER_SIZE) throw bad('a record header is cut short');
    const h = decodeRecordHeader(buf.subarray(offset, offset + RECORD_HEADER_SIZE), offset, seq);
    const at = payloadOffset(h);
    const payload = buf.subarray(at, at + h.payloadLength);
    if (payload.length !== h.payloadLength) throw bad(`record ${seq} is cut short`);
    if (crc32c(payload) !== h.payloadCrc) throw bad(`checksum mismatch in record ${seq}`);
    if (seq === 0) {
      if (h.kind !== RecordKind.Header) throw bad('the first record must be the header');
      header = JSON.parse(payload.toString('utf8')) as SnapshotHeader;
      if (header.vm?.memoryBytes !== expect.memoryBytes || header.vm?.vcpuCount !== expect.vcpuCount || header.vcpus?.length !== expect.vcpuCount)
        throw bad('the header does not describe the VM that was prepared');
      for (const v of header.vcpus) vcpuState.set(v.id, new Map());
    } else if (h.kind === RecordKind.VcpuState || h.kind === RecordKind.VmState) {
      const { name, data } = decodeNamed(payload);
      const into = h.kind === RecordKind.VmState ? vmState : vcpuState.get(h.aux);
      if (!into) throw bad(`state of vCPU ${h.aux}, which the header does not list`);
      if (into.has(name)) throw bad(`${name} appears twice`);
      into.set(name, data);
    } else {
      throw bad(`unexpected record kind ${h.kind}`);
    }
    offset = nextRecordOffset(h);
  }
  if (!header) throw bad('no header');
  for (const v of header.vcpus) {
    const have = vcpuState.get(v.id) as Map<string, Buffer>;
    for (const s of v.sections) if (!have.has(s.name)) throw bad(`vCPU ${v.id} section ${s.name} is missing`);
    if (v.nestedSize && !have.has('nested')) throw bad(`vCPU ${v.id} nested state is missing`);
  }
  for (const s of header.vmState ?? []) if (!vmState.has(s.name)) throw bad(`VM state ${s.name} is missing`);
  return { header, vcpuState, vmState };
}
