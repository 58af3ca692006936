/**
 * Incremental snapshots end to end, real vcpud processes on real KVM: counter64 snapshotted as a
 * chain (full, then children storing only the pages dirtied since their parent, by the guest or by
 * WriteMemory) in one vcpud; every snapshot restored in a second vcpud holds the exact counter value
 * and memory it had and counts on from there. Bad parents, broken chains, delete with children and
 * merge; kill -9 during an incremental snapshot leaves the chain and the name's previous snapshot.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import {
  consoleCollector,
  counterLines,
  counterVm,
  firstMemoryData,
  MiB,
  runStream,
  sha256,
  snapshotPair,
  uploadSnapshot,
  waitFor,
  type Client,
} from '../support/snapshot';
import { call, callError, collect, startVcpud } from '../support/vcpud-process';

const COUNTER_MIRROR = 0x9000; // counter64 mirrors RBX here (vCPU 0)
const MARKER_BASE = 0x100000; // WriteMemory markers, one page each: vcpud's own writes (below the random fill at 2 MiB)
const MEMORY = 64 * MiB;
const hash = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

const readMem = async (vms: Client, vmId: string, gpa: number, length: number) =>
  Buffer.concat((await collect<{ data: Buffer }>(vms, 'ReadMemory', { vmId, guestPhysicalAddress: String(gpa), length: String(length) })).map((m) => m.data));

function expectStatus(err: grpc.ServiceError, code: grpc.status, reason: string, message?: RegExp) {
  expect({ code: err.code }).toEqual({ code });
  expect(decodeStatusDetails(err.metadata)?.errorInfo?.reason).toBe(reason);
  if (message) expect(err.details).toMatch(message);
}

jest.setTimeout(180_000);

describeKvm('incremental snapshots (real KVM)', () => {
  const pair = snapshotPair('vcpud-chain-');
  const { snapDir } = pair;
  let aVms: Client;
  let aSnap: Client;
  let bVms: Client;
  let bSnap: Client;
  beforeAll(() => void ({ aVms, aSnap, bVms, bSnap } = pair));

  const readU64 = async (vms: Client, vmId: string, gpa: number) => (await readMem(vms, vmId, gpa, 8)).readBigUInt64LE(0);
  const marker = (i: number) => Buffer.from(`marker ${i}`.padEnd(16, '.'));

  async function snapshot(vmId: string, req: object) {
    const r = await runStream(aSnap.CreateSnapshot({ vmId, leavePaused: true, ...req }));
    if (r.error) throw r.error;
    return r.messages.find((m) => m.done)!.done as Record<string, any>;
  }

  /**
   * A counter VM in A snapshotted at several points: s0 full (track_dirty), s1 <- s0, s2 <- s1,
   * s3 <- s2 and b1 <- s0 (a branch: everything dirtied since s0). Between snapshots it counts on and
   * vcpud writes marker i (after snapshot i). Returns each snapshot's counter value.
   */
  async function chain(prefix: string) {
    const id = await counterVm(aVms, { memory: MEMORY, fill: true });
    const counts: Record<string, bigint> = {};
    const infos: Record<string, Record<string, any>> = {};
    const plan: [string, string | undefined][] = [
      ['s0', undefined],
      ['s1', 's0'],
      ['s2', 's1'],
      ['b1', 's0'],
      ['s3', 's2'],
    ];
    for (const [i, [n, parent]] of plan.entries()) {
      await call(aVms, i === 0 ? 'RunVm' : 'ResumeVm', { vmId: id });
      await new Promise((r) => setTimeout(r, 150)); // counts on
      infos[n] = await snapshot(id, { name: `${prefix}/${n}`, ...(parent ? { parent: `${prefix}/${parent}` } : { trackDirty: true }) });
      counts[n] = await readU64(aVms, id, COUNTER_MIRROR);
      await call(aVms, 'WriteMemory', { vmId: id, guestPhysicalAddress: String(MARKER_BASE + i * 4096), data: marker(i) });
    }
    return { id, counts, infos, order: plan.map(([n]) => n) };
  }

  it('each snapshot of a chain restores with the exact counter value and memory it had, and counts on', async () => {
    const c = await chain('c');
    expect(c.infos.s0).toMatchObject({ parent: '', chainDepth: 0, formatVersion: 2 });
    expect(c.infos.s3).toMatchObject({ parent: 'c/s2', chainDepth: 3 });
    expect(c.infos.b1).toMatchObject({ parent: 'c/s0', chainDepth: 1 });
    // The full snapshot holds the random fill; children only what was dirtied since their parent.
    expect(Number(c.infos.s0.sizeBytes)).toBeGreaterThan(60 * MiB);
    for (const n of ['s1', 's2', 's3', 'b1']) expect(Number(c.infos[n].sizeBytes)).toBeLessThan(MiB);

    for (const [i, n] of c.order.entries()) {
      const r = await call<Record<string, any>>(bSnap, 'RestoreSnapshot', { name: `c/${n}` });
      const vmId = r.vm.id as string;
      expect(await readU64(bVms, vmId, COUNTER_MIRROR)).toBe(c.counts[n]);
      // markers 0..i-1 were written before snapshot i; later ones after it
      for (let j = 0; j < c.order.length; j++) {
        const got = await readMem(bVms, vmId, MARKER_BASE + j * 4096, 16);
        expect({ snapshot: n, j, got: got.toString('latin1') }).toEqual({ snapshot: n, j, got: j < i ? marker(j).toString('latin1') : '\0'.repeat(16) });
      }
      const con = consoleCollector(bVms, vmId);
      await call(bVms, 'ResumeVm', { vmId });
      await waitFor(() => counterLines(con.text()).length >= 3, `the ${n} restore to count`).catch(async (e) => {
        throw new Error(
          `${e.message}: console ${JSON.stringify(con.text().slice(0, 200))}, VM ${JSON.stringify((await call<any>(bVms, 'GetVm', { vmId })).vm.vcpus)}`,
        );
      });
      con.stop();
      // The pause fell while counter N was being printed (the restored VM finishes its line: a
      // suffix of N) or after it (the first line is N + 1); the next line follows on exactly.
      const [first, second] = con.text().split('\n');
      const N = c.counts[n];
      expect({ n, first, ok: String(N).endsWith(first) || first === String(N + 1n) }).toEqual({ n, first, ok: true });
      expect(BigInt(second)).toBe(first === String(N + 1n) ? N + 2n : N + 1n);
      await call(bVms, 'DeleteVm', { vmId });
    }

    // From a stream too: the child's bytes uploaded, its ancestors read from the snapshot directory.
    const r = await uploadSnapshot(bSnap, fs.readFileSync(path.join(snapDir, 'c/s3')));
    expect(await readU64(bVms, r.vm.id, COUNTER_MIRROR)).toBe(c.counts.s3);

    const listed = (await call<{ snapshots: Record<string, any>[] }>(bSnap, 'ListSnapshots', {})).snapshots.filter((s) => s.name.startsWith('c/'));
    expect(listed.map((s) => [s.name, s.parent, s.chainDepth])).toEqual([
      ['c/b1', 'c/s0', 1],
      ['c/s0', '', 0],
      ['c/s1', 'c/s0', 1],
      ['c/s2', 'c/s1', 2],
      ['c/s3', 'c/s2', 3],
    ]);
  });

  it("restores each page from the newest layer storing it: rewritten in a later child, the later bytes; only in the base, the base's", async () => {
    const id = await counterVm(aVms, { memory: MEMORY, fill: true });
    const page = 4096;
    // [gpa, pages] written (random bytes) before each child: runs long enough to be mapped from the
    // file, overlapping across children (o3 rewrites part of o1's run and one page inside o2's).
    const writes: [number, number][][] = [
      [],
      [[8 * MiB, 64]],
      [[16 * MiB, 40]],
      [
        [8 * MiB + 16 * page, 24],
        [16 * MiB + 5 * page, 1],
      ],
    ];
    const memoryAt: string[] = [];
    for (const [i, runs] of writes.entries()) {
      for (const [gpa, pages] of runs) await call(aVms, 'WriteMemory', { vmId: id, guestPhysicalAddress: String(gpa), data: crypto.randomBytes(pages * page) });
      await snapshot(id, { name: `o/${i}`, ...(i ? { parent: `o/${i - 1}` } : { trackDirty: true }) });
      memoryAt.push(hash(await readMem(aVms, id, 0, MEMORY)));
    }
    for (const [i, want] of memoryAt.entries()) {
      const r = await call<Record<string, any>>(bSnap, 'RestoreSnapshot', { name: `o/${i}` });
      expect({ snapshot: i, memory: hash(await readMem(bVms, r.vm.id, 0, MEMORY)) }).toEqual({ snapshot: i, memory: want });
      await call(bVms, 'DeleteVm', { vmId: r.vm.id });
    }
    // From a stream too (ancestors from the directory, their plan applied before the streamed pages).
    const r = await uploadSnapshot(bSnap, fs.readFileSync(path.join(snapDir, 'o/3')));
    expect(hash(await readMem(bVms, r.vm.id, 0, MEMORY))).toBe(memoryAt[3]);
  });

  it('refuses parents of another VM or taken before tracking, and broken chains, naming why; nothing is created', async () => {
    const other = await counterVm(aVms, { name: 'other' });
    await snapshot(other, { name: 'r/other', trackDirty: true });
    const id = await counterVm(aVms);
    await snapshot(id, { name: 'r/untracked' });
    const e0 = await runStream(aSnap.CreateSnapshot({ vmId: id, name: 'r/x', parent: 'r/untracked' }));
    expectStatus(e0.error!, grpc.status.FAILED_PRECONDITION, 'SNAPSHOT_PARENT_UNTRACKED', /dirty tracking is off/);
    const e1 = await runStream(aSnap.CreateSnapshot({ vmId: id, name: 'r/x', parent: 'r/other' }));
    expectStatus(e1.error!, grpc.status.FAILED_PRECONDITION, 'SNAPSHOT_PARENT_UNTRACKED', /snapshot of VM .* \(other\), not of/);
    await snapshot(id, { name: 'r/base', trackDirty: true });
    const e2 = await runStream(aSnap.CreateSnapshot({ vmId: id, name: 'r/x', parent: 'r/untracked' }));
    expectStatus(e2.error!, grpc.status.FAILED_PRECONDITION, 'SNAPSHOT_PARENT_UNTRACKED', /taken before VM .* dirty tracking started/);
    expect(fs.existsSync(path.join(snapDir, 'r/x'))).toBe(false);

    await snapshot(id, { name: 'r/c1', parent: 'r/base' });
    await snapshot(id, { name: 'r/c2', parent: 'r/c1' });
    const c1 = path.join(snapDir, 'r/c1');
    const saved = fs.readFileSync(c1);
    // missing ancestor
    fs.renameSync(c1, `${c1}.away`);
    expectStatus(
      await callError(bSnap, 'RestoreSnapshot', { name: 'r/c2' }),
      grpc.status.FAILED_PRECONDITION,
      'SNAPSHOT_CHAIN_BROKEN',
      /"r\/c2" -> "r\/c1".*missing/,
    );
    // replaced ancestor (another snapshot under its name)
    fs.copyFileSync(path.join(snapDir, 'r/base'), c1);
    expectStatus(await callError(bSnap, 'RestoreSnapshot', { name: 'r/c2' }), grpc.status.DATA_LOSS, 'SNAPSHOT_CHAIN_BROKEN', /"r\/c2" -> "r\/c1".*replaced/);
    // a flipped byte in the full ancestor's memory: DATA_LOSS naming it
    fs.writeFileSync(c1, saved);
    fs.rmSync(`${c1}.away`);
    const base = path.join(snapDir, 'r/base');
    const good = fs.readFileSync(base);
    const bad = Buffer.from(good);
    bad[bad.length - 8192] ^= 0x40;
    fs.writeFileSync(base, bad);
    expectStatus(await callError(bSnap, 'RestoreSnapshot', { name: 'r/c2' }), grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT', /ancestor "r\/base"/);
    fs.writeFileSync(base, good);
    expect((await call<{ vms: unknown[] }>(bVms, 'ListVms', {})).vms).toEqual([]);
    await call(bSnap, 'RestoreSnapshot', { name: 'r/c2' }); // whole again
  });

  it('a flipped byte in the memory data of any layer of a chain fails its restore naming that layer, the oldest first; nothing is created', async () => {
    const id = await counterVm(aVms, { memory: MEMORY, fill: true });
    await snapshot(id, { name: 'f/base', trackDirty: true });
    for (const [n, parent] of [
      ['c1', 'base'],
      ['c2', 'c1'],
      ['c3', 'c2'],
    ]) {
      await call(aVms, 'WriteMemory', { vmId: id, guestPhysicalAddress: String(4 * MiB), data: Buffer.alloc(256 * 1024, n) }); // a run that gets mapped
      await snapshot(id, { name: `f/${n}`, parent: `f/${parent}` });
    }
    const file = (n: string) => path.join(snapDir, `f/${n}`);
    const saved = Object.fromEntries(['base', 'c1', 'c2', 'c3'].map((n) => [n, fs.readFileSync(file(n))]));
    const flip = (n: string) => {
      const bad = Buffer.from(saved[n]);
      bad[firstMemoryData(bad) + 100] ^= 0x40;
      fs.writeFileSync(file(n), bad);
    };
    const restoreError = (how: 'file' | 'stream') =>
      how === 'file'
        ? callError(bSnap, 'RestoreSnapshot', { name: 'f/c3' })
        : uploadSnapshot(bSnap, fs.readFileSync(file('c3'))).then(
            () => fail('restored'),
            (e) => e,
          );
    for (const how of ['file', 'stream'] as const) {
      flip('c1'); // in the middle of the chain: checked while its children are mapped over it
      expectStatus(await restoreError(how), grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT', /^ancestor "f\/c1" \(link "f\/c2" -> "f\/c1"\): checksum mismatch/);
      flip('base'); // two broken layers: the older one is reported
      expectStatus(await restoreError(how), grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT', /ancestor "f\/base" \(link "f\/c1" -> "f\/base"\): checksum mismatch/);
      fs.writeFileSync(file('base'), saved.base);
      fs.writeFileSync(file('c1'), saved.c1);
    }
    flip('c3'); // the restored snapshot itself
    const err = await restoreError('file');
    expectStatus(err, grpc.status.DATA_LOSS, 'SNAPSHOT_CORRUPT', /checksum mismatch in chunk/);
    expect(err.details).not.toMatch(/ancestor/);
    fs.writeFileSync(file('c3'), saved.c3);
    expect((await call<{ vms: unknown[] }>(bVms, 'ListVms', {})).vms).toEqual([]);
    await call(bSnap, 'RestoreSnapshot', { name: 'f/c3' }); // whole again
  });

  it('delete of a parent needs cascade; merge folds a chain that can still be extended and restored', async () => {
    const c = await chain('m');
    expectStatus(await callError(aSnap, 'DeleteSnapshot', { name: 'm/s1' }), grpc.status.FAILED_PRECONDITION, 'SNAPSHOT_HAS_CHILDREN', /"m\/s2", "m\/s3"/);
    const merged = await call<Record<string, any>>(aSnap, 'MergeSnapshot', { name: 'm/s2' });
    expect(merged).toMatchObject({ chainLength: 3, snapshot: { name: 'm/s2', parent: '', chainDepth: 0, snapshotId: c.infos.s2.snapshotId } });
    // s3 (child of the old s2) still restores through the merged s2; so does s2 itself
    for (const n of ['s2', 's3']) {
      const r = await call<Record<string, any>>(bSnap, 'RestoreSnapshot', { name: `m/${n}` });
      expect(await readU64(bVms, r.vm.id, COUNTER_MIRROR)).toBe(c.counts[n]);
    }
    // the VM can still take children of the merged snapshot
    await call(aVms, 'ResumeVm', { vmId: c.id });
    const s4 = await snapshot(c.id, { name: 'm/s4', parent: 'm/s2' });
    expect(s4).toMatchObject({ parent: 'm/s2', chainDepth: 1 });
    const r4 = await call<Record<string, any>>(bSnap, 'RestoreSnapshot', { name: 'm/s4' });
    expect(await readU64(bVms, r4.vm.id, COUNTER_MIRROR)).toBe(await readU64(aVms, c.id, COUNTER_MIRROR));

    const del = await call<{ deleted: string[] }>(aSnap, 'DeleteSnapshot', { name: 'm/s0', cascade: true });
    expect(del.deleted[del.deleted.length - 1]).toBe('m/s0');
    expect(new Set(del.deleted)).toEqual(new Set(['m/s0', 'm/s1', 'm/b1']));
    // s2 was merged (full): it and its children stay
    expect(fs.readdirSync(path.join(snapDir, 'm')).sort()).toEqual(['s2', 's3', 's4']);
  });
});

describeKvm('kill -9 of vcpud during an incremental snapshot', () => {
  const snapDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-chain-kill-'));
  afterAll(() => fs.rmSync(snapDir, { recursive: true, force: true }));

  it('leaves the parent, the earlier children and the previous snapshot under the name intact', async () => {
    const d = await startVcpud(['--snapshot-dir', snapDir]);
    const vms = d.client('VmService');
    const snaps = d.client('SnapshotService');
    const id = await counterVm(vms, { memory: 256 * MiB });
    const take = async (req: object) => {
      const r = await runStream(snaps.CreateSnapshot({ vmId: id, ...req }));
      expect(r.error).toBeUndefined();
    };
    await take({ name: 'base', trackDirty: true });
    await take({ name: 'c1', parent: 'base' });
    await take({ name: 'c2', parent: 'c1' }); // the name's previous snapshot
    const files = ['base', 'c1', 'c2'];
    const before = Object.fromEntries(files.map((f) => [f, sha256(path.join(snapDir, f))]));
    // 192 MiB dirtied by vcpud: the next child is big enough to be caught mid-write.
    const chunk = Buffer.alloc(32 * MiB, 0x5a);
    for (let gpa = 64 * MiB; gpa < 256 * MiB; gpa += chunk.length) await call(vms, 'WriteMemory', { vmId: id, guestPhysicalAddress: String(gpa), data: chunk });
    const second = runStream(snaps.CreateSnapshot({ vmId: id, name: 'c2', parent: 'c1', replace: true }));
    const temps = () => fs.readdirSync(snapDir).filter((n) => n.endsWith('.vcpud-tmp'));
    await waitFor(() => temps().some((t) => fs.statSync(path.join(snapDir, t)).size > 8 * MiB), 'the temporary file to fill', 20_000);
    d.proc.kill('SIGKILL');
    expect((await second).messages.some((m) => m.done)).toBe(false);
    await d.stop();
    expect(Object.fromEntries(files.map((f) => [f, sha256(path.join(snapDir, f))]))).toEqual(before);

    const d2 = await startVcpud(['--snapshot-dir', snapDir]);
    try {
      const r = await call<Record<string, any>>(d2.client('SnapshotService'), 'RestoreSnapshot', { name: 'c2' });
      expect(r.vm.memoryBytes).toBe(String(256 * MiB));
      const data = await readMem(d2.client('VmService'), r.vm.id, 64 * MiB, 16);
      expect(data.equals(Buffer.alloc(16))).toBe(true); // the killed child's writes are not in c2
    } finally {
      await d2.stop();
    }
  });
});
