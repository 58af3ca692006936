/**
 * Snapshots end to end, real vcpud processes on real KVM: counter64 snapshotted mid-run in one
 * vcpud and restored in a second continues its count with no value repeated or skipped (from a
 * file and from a stream); corrupt, truncated and incompatible snapshots are refused with nothing
 * created; names cannot leave the snapshot directory; kill -9 during CreateSnapshot leaves the
 * previous snapshot of that name intact.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { decodeRecordHeader, encodeRecordHeader, crc32c, PREAMBLE_SIZE, RECORD_HEADER_SIZE } from '../../src/vm/snapshot-format';
import { describeKvm } from '../support/kvm';
import {
  consoleCollector,
  counterLines,
  counterSnapshotFacts,
  counterVm,
  firstMemoryData,
  firstBreak,
  MiB,
  runStream,
  sha256,
  snapshotPair,
  uploadSnapshot,
  waitFor,
  type Client,
} from '../support/snapshot';
import { call, callError, startVcpud } from '../support/vcpud-process';

/** Rewrites the header record of a snapshot file (same length: the JSON is padded with spaces). */
export function rewriteHeader(file: string, edit: (h: Record<string, any>) => void): void {
  const buf = fs.readFileSync(file);
  const rec = decodeRecordHeader(buf.subarray(PREAMBLE_SIZE, PREAMBLE_SIZE + RECORD_HEADER_SIZE), PREAMBLE_SIZE, 0);
  const at = PREAMBLE_SIZE + RECORD_HEADER_SIZE + rec.pad;
  const header = JSON.parse(buf.subarray(at, at + rec.payloadLength).toString('utf8'));
  delete header.source.caps; // room for the edits
  edit(header);
  const json = Buffer.from(JSON.stringify(header));
  if (json.length > rec.payloadLength) throw new Error('edited header does not fit');
  const payload = Buffer.concat([json, Buffer.alloc(rec.payloadLength - json.length, 0x20)]);
  payload.copy(buf, at);
  encodeRecordHeader({ ...rec, payloadCrc: crc32c(payload) }).copy(buf, PREAMBLE_SIZE);
  fs.writeFileSync(file, buf);
}

function expectStatus(err: grpc.ServiceError, code: grpc.status, reason: string) {
  expect({ code: err.code, message: err.details }).toMatchObject({ code });
  const d = decodeStatusDetails(err.metadata);
  expect(d?.errorInfo?.reason).toBe(reason);
  return d!;
}

describeKvm('snapshots between two vcpud processes (real KVM)', () => {
  const pair = snapshotPair('vcpud-snapshots-');
  const { snapDir } = pair;
  let aVms: Client;
  let aSnap: Client;
  let bVms: Client;
  let bSnap: Client;
  beforeAll(() => void ({ aVms, aSnap, bVms, bSnap } = pair));

  const listVms = async (vms: Client) => (await call<{ vms: unknown[] }>(vms, 'ListVms', {})).vms;

  /** counter64 running in A until at least `lines` lines are out, then snapshotted (left paused). */
  async function snapshotMidRun(req: object, lines = 300) {
    const id = await counterVm(aVms);
    const src = consoleCollector(aVms, id);
    await call(aVms, 'RunVm', { vmId: id });
    await waitFor(() => counterLines(src.text()).length >= lines, `${lines} lines on the source console`);
    const progress: Record<string, any>[] = [];
    const data: Buffer[] = [];
    const r = await runStream(aSnap.CreateSnapshot({ vmId: id, leavePaused: true, ...req }), (m) => {
      if (m.progress) progress.push(m.progress);
      if (m.data) data.push(m.data);
    });
    expect(r.error).toBeUndefined();
    const done = r.messages.find((m) => m.done)?.done;
    expect(done).toBeDefined();
    // The vCPU is paused (its pending OUT completed): what the source printed is final.
    const vm = (await call<{ vm: Record<string, any> }>(aVms, 'GetVm', { vmId: id })).vm;
    expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_PAUSED');
    // The CI break "index 1994: 1994 then 1925" came from a fixed 200 ms wait here: the source stream
    // lagged, its text ended mid-line ("19") and the destination's first bytes ("25\n") finished another.
    const sourceText = await src.stopAtPause();
    return { id, sourceText, done, progress, bytes: Buffer.concat(data) };
  }

  /** Restores (already done by `restore`) and checks the two consoles form one consecutive count. */
  async function expectContinues(vmId: string, sourceText: string, snapshotFile: string) {
    const dst = consoleCollector(bVms, vmId);
    await waitFor(() => counterLines(dst.text()).length >= 500, '500 lines on the destination console');
    dst.stop();
    // The pause can fall mid-line ("12" of "123\n"): the destination finishes that line ("3\n").
    const values = counterLines(sourceText + dst.text());
    expect(values[0]).toBe(1);
    // A break (seen once in CI, never reproduced) comes with what each side printed around it and what the snapshot holds.
    const brk = firstBreak(values);
    const explained =
      brk &&
      `${brk}; the source alone: ${firstBreak(counterLines(sourceText)) ?? 'consecutive'}; source ends ${JSON.stringify(sourceText.slice(-60))}, ` +
        `destination starts ${JSON.stringify(dst.text().slice(0, 60))}; ${await counterSnapshotFacts(snapshotFile)}`;
    expect(explained).toBeUndefined();
    expect(values.length).toBeGreaterThan(counterLines(sourceText).length + 400);
  }

  it('counter64 snapshotted mid-run to a file continues in a second vcpud with no value repeated or skipped', async () => {
    const s = await snapshotMidRun({ name: 'counter/mid-run.snap' });
    expect(s.done).toMatchObject({ name: 'counter/mid-run.snap', vcpuCount: 1, memoryBytes: String(4 * MiB), formatVersion: 2 });
    expect(Number(s.done.memoryPagesStored)).toBeLessThan(64); // zero pages skipped
    expect(s.progress.map((p) => p.phase)).toEqual(expect.arrayContaining(['SNAPSHOT_PHASE_STATE', 'SNAPSHOT_PHASE_MEMORY', 'SNAPSHOT_PHASE_DONE']));
    expect(fs.statSync(path.join(snapDir, 'counter', 'mid-run.snap')).size).toBe(Number(s.done.sizeBytes));

    const r = await call<Record<string, any>>(bSnap, 'RestoreSnapshot', { name: 'counter/mid-run.snap', run: true });
    expect(r.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect(r.vm.memoryBytes).toBe(String(4 * MiB));
    expect(Number(r.stats.memoryBytesMapped) + Number(r.stats.memoryBytesCopied)).toBe(Number(s.done.memoryPagesStored) * 4096);
    await expectContinues(r.vm.id, s.sourceText, path.join(snapDir, 'counter', 'mid-run.snap'));

    const listed = await call<{ snapshots: Record<string, any>[] }>(bSnap, 'ListSnapshots', {});
    expect(listed.snapshots.find((x) => x.name === 'counter/mid-run.snap')).toMatchObject({ vmId: s.id, vcpuCount: 1, problem: '' });
  });

  it('streamed out of one vcpud (CreateSnapshot stream) and into another (RestoreSnapshotStream), paused until resumed', async () => {
    const s = await snapshotMidRun({ stream: true });
    expect(s.bytes.length).toBe(Number(s.done.sizeBytes));
    expect(s.done.name).toBe('');
    const r = await uploadSnapshot(bSnap, s.bytes, { vmName: 'moved' });
    expect(r.vm).toMatchObject({ name: 'moved' });
    expect(r.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_PAUSED');
    await call(bVms, 'ResumeVm', { vmId: r.vm.id });
    const file = path.join(snapDir, 'streamed-mid-run.snap');
    fs.writeFileSync(file, s.bytes);
    await expectContinues(r.vm.id, s.sourceText, file);
  });

  it('a flipped byte is refused with DATA_LOSS naming the chunk; a truncated file too; nothing is created', async () => {
    const s = await snapshotMidRun({ name: 'flip.snap' }, 10);
    const file = path.join(snapDir, 'flip.snap');
    const good = fs.readFileSync(file);

    // A byte of guest memory (the last memory data chunk holds the guest's pages near the end).
    const bad = Buffer.from(good);
    bad[0x1000 + 16 + 48 * 4 + 100] ^= 0x40; // somewhere past the header: whatever chunk it lands in is named
    fs.writeFileSync(path.join(snapDir, 'flip-any.snap'), bad);
    const e1 = await callError(bSnap, 'RestoreSnapshot', { name: 'flip-any.snap' });
    const d1 = expectStatus(e1, grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT');
    expect(e1.details).toMatch(/checksum mismatch in chunk \d+ \(/);
    expect(d1.errorInfo?.metadata.chunk).toMatch(/^\d+$/);

    // Exactly inside guest memory data: find the page holding counter64's code (guest-physical 0x1000).
    const code = fs.readFileSync(path.join(__dirname, '..', 'guests', 'build', 'counter64.bin')).subarray(0, 16);
    const at = good.indexOf(code);
    expect(at).toBeGreaterThan(0);
    const bad2 = Buffer.from(good);
    bad2[at + 10] ^= 1;
    fs.writeFileSync(path.join(snapDir, 'flip-mem.snap'), bad2);
    const e2 = await callError(bSnap, 'RestoreSnapshot', { name: 'flip-mem.snap' });
    expectStatus(e2, grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT');
    expect(e2.details).toMatch(/checksum mismatch in chunk \d+ \(memory data, guest-physical 0x0, offset 0x[0-9a-f]+\)/);
    // the same bytes streamed: the same verdict
    const e3 = await uploadSnapshot(bSnap, bad2).then(
      () => undefined,
      (e) => e as grpc.ServiceError,
    );
    expect({ code: e3?.code, details: e3?.details }).toMatchObject({ code: grpc.status.DATA_LOSS });
    expect(e3?.details).toMatch(/checksum mismatch in chunk \d+ \(memory data/);

    // A byte of the zero padding before the first memory data (outside every checksum): refused too,
    // from a file and from a stream, naming the byte.
    const padAt = firstMemoryData(good) - 1;
    expect(good[padAt]).toBe(0);
    const bad3 = Buffer.from(good);
    bad3[padAt] = 0x5a;
    fs.writeFileSync(path.join(snapDir, 'flip-pad.snap'), bad3);
    const padding = new RegExp(`chunk \\d+ \\(memory data.*\\): its padding holds a non-zero byte at offset 0x${padAt.toString(16)} `);
    const e4 = await callError(bSnap, 'RestoreSnapshot', { name: 'flip-pad.snap' });
    const d4 = expectStatus(e4, grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT');
    expect(e4.details).toMatch(padding);
    expect(d4.errorInfo?.metadata.offset).toBe(`0x${padAt.toString(16)}`);
    const e5 = await uploadSnapshot(bSnap, bad3).then(
      () => undefined,
      (e) => e as grpc.ServiceError,
    );
    expect({ code: e5?.code, details: e5?.details }).toMatchObject({ code: grpc.status.DATA_LOSS, details: expect.stringMatching(padding) });

    for (const cut of [10, 200, good.length - 3000, good.length - 1]) {
      fs.writeFileSync(path.join(snapDir, 'cut.snap'), good.subarray(0, cut));
      const e = await callError(bSnap, 'RestoreSnapshot', { name: 'cut.snap' });
      expectStatus(e, grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT');
      expect(e.details).toMatch(/truncated/);
    }
    expect(await listVms(bVms)).toEqual([]);
    // the intact file still restores
    const ok = await call<Record<string, any>>(bSnap, 'RestoreSnapshot', { name: 'flip.snap' });
    expect(ok.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_PAUSED');
    void s;
  });

  it('an incompatible snapshot is FAILED_PRECONDITION listing every incompatibility, and nothing is created', async () => {
    await snapshotMidRun({ name: 'foreign.snap' }, 10);
    const file = path.join(snapDir, 'foreign.snap');
    let vendor = '';
    rewriteHeader(file, (h) => {
      vendor = h.source.vendor === 'amd' ? 'intel' : 'amd';
      h.source.vendor = vendor;
      h.source.msrIndexList.push(0x12345678);
      const leaf7 = h.vm.cpuid.find((e: any) => e.function === 7 && e.index === 0);
      leaf7.ebx = 0xffffffff;
      h.vcpus[0].sections.find((s: any) => s.name === 'xsave').size = 1 << 20;
      h.vcpus[0].nestedSize = 1 << 30;
    });
    const e = await callError(bSnap, 'RestoreSnapshot', { name: 'foreign.snap' });
    const d = expectStatus(e, grpc.status.FAILED_PRECONDITION, 'SNAPSHOT_INCOMPATIBLE');
    const types = (d.preconditionFailure ?? []).map((v) => v.type);
    expect(types).toEqual(expect.arrayContaining(['snapshot.vendor', 'snapshot.msrs', 'snapshot.cpuid', 'snapshot.xsave_size']));
    expect(types.some((t) => t.startsWith('snapshot.nested_state'))).toBe(true);
    expect(e.details).toMatch(/0x12345678/);
    expect(d.badRequest).toBeUndefined();
    expect(await listVms(bVms)).toEqual([]);
  });

  it('snapshot names cannot leave the snapshot directory', async () => {
    const id = await counterVm(aVms);
    const outside = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-outside-'));
    fs.symlinkSync(outside, path.join(snapDir, 'escape'));
    fs.symlinkSync(path.join(outside, 'x.snap'), path.join(snapDir, 'link.snap'));
    try {
      for (const [name, rule] of [
        ['../x.snap', 'snapshot.name.traversal'],
        ['a/../../x.snap', 'snapshot.name.traversal'],
        [path.join(outside, 'x.snap'), 'snapshot.name.absolute'],
        ['escape/x.snap', 'snapshot.name.symlink'],
        ['link.snap', 'snapshot.name.symlink'],
        ['.hidden', 'snapshot.name.hidden'],
        ['', 'snapshot.name.required'],
      ]) {
        const r = await runStream(aSnap.CreateSnapshot({ vmId: id, name }));
        expect({ name, code: r.error?.code }).toEqual({ name, code: grpc.status.INVALID_ARGUMENT });
        expect(decodeStatusDetails(r.error!.metadata)?.badRequest?.[0].reason).toBe(rule);
        const e = await callError(aSnap, 'RestoreSnapshot', { name });
        expect({ name, code: e.code }).toEqual({ name, code: grpc.status.INVALID_ARGUMENT });
      }
      expect(fs.readdirSync(outside)).toEqual([]);
      // the VM was never touched: still CREATED, runnable
      const vm = (await call<{ vm: Record<string, any> }>(aVms, 'GetVm', { vmId: id })).vm;
      expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_CREATED');
      const nf = await callError(aSnap, 'RestoreSnapshot', { name: 'no/such.snap' });
      expectStatus(nf, grpc.status.NOT_FOUND, 'SNAPSHOT_NOT_FOUND');
    } finally {
      fs.rmSync(path.join(snapDir, 'escape'));
      fs.rmSync(path.join(snapDir, 'link.snap'));
      fs.rmSync(outside, { recursive: true, force: true });
    }
  });

  it('while a snapshot holds the VM, resuming it is refused; afterwards it runs as before', async () => {
    const id = await counterVm(aVms, { memory: 256 * MiB, fill: true });
    await call(aVms, 'RunVm', { vmId: id });
    const stream = aSnap.CreateSnapshot({ vmId: id, name: 'held.snap' });
    let resumeError: grpc.ServiceError | undefined;
    const done = runStream(stream, (m) => {
      if (m.progress?.phase === 'SNAPSHOT_PHASE_MEMORY' && !resumeError)
        void callError(aVms, 'ResumeVm', { vmId: id }).then(
          (e) => (resumeError ??= e),
          () => {},
        );
    });
    const r = await done;
    expect(r.error).toBeUndefined();
    await waitFor(() => resumeError !== undefined, 'the ResumeVm answer');
    expectStatus(resumeError!, grpc.status.FAILED_PRECONDITION, 'WRONG_RUN_STATE');
    expect(resumeError!.details).toMatch(/snapshot "held.snap" in progress/);
    const vm = (await call<{ vm: Record<string, any> }>(aVms, 'GetVm', { vmId: id })).vm;
    expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
  });
});

describeKvm('kill -9 of vcpud during CreateSnapshot', () => {
  const snapDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-kill-'));
  afterAll(() => fs.rmSync(snapDir, { recursive: true, force: true }));

  it('leaves the previous snapshot under that name intact and no partial file under the name', async () => {
    const d = await startVcpud(['--snapshot-dir', snapDir]);
    const vms = d.client('VmService');
    const snaps = d.client('SnapshotService');
    const id = await counterVm(vms, { memory: 256 * MiB, fill: true });
    await call(vms, 'RunVm', { vmId: id });
    const first = await runStream(snaps.CreateSnapshot({ vmId: id, name: 'big.snap' }));
    expect(first.error).toBeUndefined();
    const file = path.join(snapDir, 'big.snap');
    const before = sha256(file);
    const size = fs.statSync(file).size;
    expect(size).toBeGreaterThan(250 * MiB);

    // Second snapshot of the same name: kill -9 as soon as its temporary file has data.
    const second = runStream(snaps.CreateSnapshot({ vmId: id, name: 'big.snap', replace: true }));
    const temps = () => fs.readdirSync(snapDir).filter((n) => n.endsWith('.vcpud-tmp'));
    await waitFor(() => temps().some((t) => fs.statSync(path.join(snapDir, t)).size > 8 * MiB), 'the temporary file to fill', 20_000);
    d.proc.kill('SIGKILL');
    const r = await second;
    expect(r.error).toBeDefined();
    expect(r.messages.some((m) => m.done)).toBe(false);
    await d.stop();

    expect(fs.readdirSync(snapDir).filter((n) => !n.startsWith('.'))).toEqual(['big.snap']);
    expect(fs.statSync(file).size).toBe(size);
    expect(sha256(file)).toBe(before);
    expect(temps()).toHaveLength(1); // the dead process's partial file, hidden under a temporary name

    // A new vcpud restores the previous snapshot (every checksum verified) and cleans the stale file up.
    const d2 = await startVcpud(['--snapshot-dir', snapDir]);
    try {
      const r2 = await call<Record<string, any>>(d2.client('SnapshotService'), 'RestoreSnapshot', { name: 'big.snap', run: true });
      expect(r2.vm.memoryBytes).toBe(String(256 * MiB));
      const vms2 = d2.client('VmService');
      const c = consoleCollector(vms2, r2.vm.id);
      await waitFor(() => counterLines(c.text()).length > 50, 'the restored VM to count');
      c.stop();
      expect(firstBreak(counterLines(c.text()).slice(1))).toBeUndefined();
      const again = await runStream(d2.client('SnapshotService').CreateSnapshot({ vmId: r2.vm.id, name: 'other.snap' }));
      expect(again.error).toBeUndefined();
      expect(temps()).toEqual([]);
    } finally {
      await d2.stop();
    }
  });
});
