/**
 * The restart handover (--state-dir) between real vcpud processes on one state directory (tmpfs,
 * /dev/shm): VMs survive a SIGTERM restart with their ids, names, memory (mapped in place), vCPU
 * state and run states: counter64's console continues with no value lost or repeated, several
 * VMs with several vCPUs continue from the state they were saved with. A kill -9 leaves memory files
 * without a manifest: the next start removes them and says so. A corrupt manifest, a corrupt state
 * file and a manifest of another format version are each handled as documented.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { SECTIONS } from '../../src/ffi/sections';
import { LOCK_NAME } from '../../src/vm/guest-memory';
import { decodeManifest, MANIFEST_NAME } from '../../src/vm/handover';
import { decodeState } from '../../src/vm/migration/state-records';
import { GUEST_ABI, GUESTS } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { sample } from '../support/prom';
import { consoleCollector, counterLines, counterVm, firstBreak, MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { call, callError, collect, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const COUNTER_BASE = 0x9000;

describeKvm('restart handover with --state-dir (real KVM, tmpfs)', () => {
  let stateDir: string;
  let snapDir: string;
  const started: VcpudProcess[] = [];

  const start = async (extra: string[] = []) => {
    const p = await startVcpud(['--state-dir', stateDir, '--snapshot-dir', snapDir, ...extra]);
    started.push(p);
    return p;
  };
  /** SIGTERM and the exit code. */
  const terminate = (p: VcpudProcess) => p.stop('SIGTERM');
  const files = () =>
    fs
      .readdirSync(stateDir)
      .filter((n) => n !== 'aside' && n !== LOCK_NAME)
      .sort();
  const memFiles = () => files().filter((n) => n.endsWith('.mem'));

  beforeEach(() => {
    stateDir = fs.mkdtempSync('/dev/shm/vcpud-handover-');
    snapDir = fs.mkdtempSync('/dev/shm/vcpud-handover-snaps-');
  });
  afterEach(async () => {
    await Promise.all(started.splice(0).map((p) => p.stop('SIGKILL')));
    fs.rmSync(stateDir, { recursive: true, force: true });
    fs.rmSync(snapDir, { recursive: true, force: true });
  });

  /** Counter mirrors [0x9000 + 8*i] of `vcpus` vCPUs, read from the VM. */
  async function mirrors(vms: Client, vmId: string, vcpus: number): Promise<bigint[]> {
    const parts = await collect<{ data: Buffer }>(vms, 'ReadMemory', { vmId, guestPhysicalAddress: String(COUNTER_BASE), length: String(8 * vcpus) });
    const buf = Buffer.concat(parts.map((m) => m.data));
    return Array.from({ length: vcpus }, (_, i) => buf.readBigUInt64LE(8 * i));
  }

  /** What the old process saved: per VM id, every vCPU's RBX from its state file, and the mirrors in its memory file. */
  function saved(): Map<string, { rbx: bigint[]; mirror: bigint[] }> {
    const m = decodeManifest(fs.readFileSync(path.join(stateDir, MANIFEST_NAME)), MANIFEST_NAME);
    const out = new Map<string, { rbx: bigint[]; mirror: bigint[] }>();
    for (const v of m.vms) {
      const state = decodeState(fs.readFileSync(path.join(stateDir, v.stateFile)), { memoryBytes: v.memoryBytes, vcpuCount: v.vcpuCount });
      const rbx = [...state.vcpuState.values()].map((s) => SECTIONS.regs.decode(s.get('regs') as Buffer).rbx);
      const fd = fs.openSync(path.join(stateDir, v.memoryFile), 'r');
      const buf = Buffer.alloc(8 * v.vcpuCount);
      fs.readSync(fd, buf, 0, buf.length, COUNTER_BASE);
      fs.closeSync(fd);
      out.set(v.id, { rbx, mirror: rbx.map((_, i) => buf.readBigUInt64LE(8 * i)) });
    }
    return out;
  }

  it('a counter guest and several VMs with several vCPUs survive a SIGTERM restart: same ids, names and run states, nothing lost or repeated', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    const counter = await counterVm(vmsA, { name: 'counter' });
    await call(vmsA, 'RunVm', { vmId: counter });
    const smp: string[] = [];
    for (const name of ['smp-a', 'smp-b']) {
      const { vm } = await call<{ vm: { id: string } }>(vmsA, 'CreateVm', { memoryBytes: String(8 * MiB), vcpuCount: 3, name });
      await call(vmsA, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: String(GUEST_ABI.loadAddress) });
      await call(vmsA, 'RunVm', { vmId: vm.id });
      smp.push(vm.id);
    }
    const idle = (await call<{ vm: { id: string } }>(vmsA, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 2, name: 'idle' })).vm.id;
    expect(memFiles()).toHaveLength(4);
    const before = consoleCollector(vmsA, counter);
    await waitFor(() => counterLines(before.text()).length >= 300, '300 counter lines before the restart');
    for (const id of smp) await waitFor(async () => (await mirrors(vmsA, id, 3)).every((v) => v > 1000n), `VM ${id}'s three vCPUs counting`);
    const listedBefore = (await call<{ vms: Record<string, any>[] }>(vmsA, 'ListVms', {})).vms;

    expect(await terminate(a)).toBe(0);
    expect(a.logs()).toContain('"handover saved"');
    const atHandover = saved();
    for (const id of smp) {
      const s = atHandover.get(id)!;
      // Registers and memory were captured at the same instant (the store follows the increment).
      for (let i = 0; i < 3; i++) expect([s.rbx[i], s.rbx[i] - 1n]).toContain(s.mirror[i]);
    }

    const b = await start();
    const vmsB = b.client('VmService');
    expect(b.logs()).toContain('"handover restored"');
    const listedAfter = (await call<{ vms: Record<string, any>[] }>(vmsB, 'ListVms', {})).vms;
    const summary = (vms: Record<string, any>[]) =>
      vms.map((v) => ({ id: v.id, name: v.name, memoryBytes: v.memoryBytes, vcpus: v.vcpus.length })).sort((x, y) => x.id.localeCompare(y.id));
    expect(summary(listedAfter)).toEqual(summary(listedBefore));
    expect(fs.existsSync(path.join(stateDir, MANIFEST_NAME))).toBe(false);
    expect(files().filter((n) => !n.endsWith('.mem'))).toEqual([]); // state files consumed
    expect(memFiles()).toHaveLength(4); // the same files, mapped in place

    // The counter's console continues exactly: one history, 1, 2, 3, ... across both processes.
    const after = consoleCollector(vmsB, counter);
    const seenBefore = counterLines(before.text()).length;
    await waitFor(() => counterLines(after.text()).length >= seenBefore + 300, '300 more lines after the restart');
    after.stop();
    const values = counterLines(after.text());
    expect(values[0]).toBe(1);
    expect(firstBreak(values)).toBeUndefined();
    expect(values.slice(0, seenBefore)).toEqual(counterLines(before.text()));

    // The SMP VMs continue from the state they were saved with (not from reset, not from older state).
    for (const id of smp) {
      const got = await call<{ vm: Record<string, any> }>(vmsB, 'PauseVm', { vmId: id });
      expect(got.vm.vcpus.map((v: Record<string, any>) => v.runState)).toEqual(Array(3).fill('VCPU_RUN_STATE_PAUSED'));
      const now = await mirrors(vmsB, id, 3);
      const s = atHandover.get(id)!;
      for (let i = 0; i < 3; i++) expect(now[i]).toBeGreaterThan(s.mirror[i]);
    }
    const idleVm = (await call<{ vm: Record<string, any> }>(vmsB, 'GetVm', { vmId: idle })).vm;
    expect(idleVm.vcpus.map((v: Record<string, any>) => v.runState)).toEqual(['VCPU_RUN_STATE_CREATED', 'VCPU_RUN_STATE_CREATED']);
    expect(sample(await b.scrape(), 'vcpud_handover_vms_total', { result: 'restored' })).toBe(4);

    // Deleting a handed-over VM removes its memory file.
    await call(vmsB, 'DeleteVm', { vmId: idle });
    expect(memFiles()).toHaveLength(3);
  });

  it('snapshots and a lazy restore work on state-directory memory; the lazily mapped pages survive a restart', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    const snapsA = a.client('SnapshotService');
    const id = await counterVm(vmsA, { name: 'lazy-src', memory: 16 * MiB, fill: true });
    await call(vmsA, 'RunVm', { vmId: id });
    const src = consoleCollector(vmsA, id);
    await waitFor(() => counterLines(src.text()).length >= 200, '200 lines');
    const r = await runStream(snapsA.CreateSnapshot({ vmId: id, name: 'c.snap', leavePaused: true }));
    expect(r.error).toBeUndefined();
    // Every byte printed before the pause, the cut-off line's digits included, precedes the PAUSED
    // state change (waiting for the mirror's line left those digits in flight).
    const srcText = await src.stopAtPause();
    const srcLines = counterLines(srcText);
    await call(vmsA, 'DeleteVm', { vmId: id });
    expect(memFiles()).toEqual([]);

    // A lazy restore maps the snapshot's pages copy-on-write over the state-directory file.
    const restored = await call<Record<string, any>>(snapsA, 'RestoreSnapshot', { name: 'c.snap', run: true, vmName: 'lazy' });
    expect(Number(restored.stats.memoryBytesMapped)).toBeGreaterThan(0);
    const lazyId = restored.vm.id;
    const c1 = consoleCollector(vmsA, lazyId);
    await waitFor(() => counterLines(c1.text()).length >= 200, '200 lines from the lazy restore');
    c1.stop();
    const random = Buffer.concat(
      (await collect<{ data: Buffer }>(vmsA, 'ReadMemory', { vmId: lazyId, guestPhysicalAddress: String(8 * MiB), length: String(MiB) })).map((m) => m.data),
    );
    expect(random.equals(Buffer.alloc(MiB))).toBe(false);

    expect(await terminate(a)).toBe(0);
    // The snapshot file may go: the restarted VM must not need it.
    fs.rmSync(path.join(snapDir, 'c.snap'));
    const b = await start();
    const vmsB = b.client('VmService');
    const c2 = consoleCollector(vmsB, lazyId);
    await waitFor(() => counterLines(c2.text()).length >= 400, '400 lines after the restart');
    c2.stop();
    // The snapshot's output, then the restored VM's whole console history (carried across the restart).
    const values = counterLines(srcText + c2.text());
    expect(values[0]).toBe(1);
    expect(values.length).toBeGreaterThan(srcLines.length + 400);
    expect(firstBreak(values)).toBeUndefined();
    const randomAfter = Buffer.concat(
      (await collect<{ data: Buffer }>(vmsB, 'ReadMemory', { vmId: lazyId, guestPhysicalAddress: String(8 * MiB), length: String(MiB) })).map((m) => m.data),
    );
    expect(randomAfter.equals(random)).toBe(true);

    // A snapshot of the restarted VM (its pages not yet in this process's page tables) holds them all.
    const snapsB = b.client('SnapshotService');
    const r2 = await runStream(snapsB.CreateSnapshot({ vmId: lazyId, name: 'd.snap', leavePaused: true }));
    expect(r2.error).toBeUndefined();
    const again = await call<Record<string, any>>(snapsB, 'RestoreSnapshot', { name: 'd.snap', vmName: 'again', noLazyMemory: true });
    const copy = Buffer.concat(
      (await collect<{ data: Buffer }>(vmsB, 'ReadMemory', { vmId: again.vm.id, guestPhysicalAddress: String(8 * MiB), length: String(MiB) })).map(
        (m) => m.data,
      ),
    );
    expect(copy.equals(random)).toBe(true);
  });

  it('kill -9: the next start removes the memory files without a manifest, says so, and runs no stale VM', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    const id = await counterVm(vmsA, { name: 'doomed' });
    await call(vmsA, 'RunVm', { vmId: id });
    await counterVm(vmsA, { name: 'doomed-too' });
    expect(memFiles()).toHaveLength(2);
    a.proc.kill('SIGKILL');
    await new Promise((r) => a.proc.once('exit', r));
    expect(memFiles()).toHaveLength(2);

    const b = await start();
    const vmsB = b.client('VmService');
    expect((await call<{ vms: unknown[] }>(vmsB, 'ListVms', {})).vms).toEqual([]);
    expect((await callError(vmsB, 'GetVm', { vmId: id })).code).toBe(grpc.status.NOT_FOUND);
    expect(memFiles()).toEqual([]);
    expect(b.logs()).toMatch(/memory files without a handover manifest were removed.*"files":2/);
    expect(sample(await b.scrape(), 'vcpud_handover_vms_total', { result: 'lost' })).toBe(2);
  });

  it('a corrupt manifest: nothing runs, every file is moved aside, the error is logged and counted', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    const id = await counterVm(vmsA, { name: 'c' });
    await call(vmsA, 'RunVm', { vmId: id });
    expect(await terminate(a)).toBe(0);
    const manifest = path.join(stateDir, MANIFEST_NAME);
    const bytes = fs.readFileSync(manifest);
    bytes[bytes.length - 5] ^= 0x01; // one bit inside the body
    fs.writeFileSync(manifest, bytes);
    const kept = files();

    const b = await start();
    const vmsB = b.client('VmService');
    expect((await call<{ vms: unknown[] }>(vmsB, 'ListVms', {})).vms).toEqual([]);
    expect(b.logs()).toMatch(/handover manifest is corrupt.*checksum mismatch/);
    expect(files()).toEqual([]);
    const aside = fs.readdirSync(path.join(stateDir, 'aside'));
    expect(aside).toHaveLength(1);
    expect(fs.readdirSync(path.join(stateDir, 'aside', aside[0])).sort()).toEqual(kept);
  });

  it('a corrupt state file fails that VM only: it is not listed, its files are kept aside; the other VM runs on', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    const good = await counterVm(vmsA, { name: 'good' });
    const bad = await counterVm(vmsA, { name: 'bad' });
    await call(vmsA, 'RunVm', { vmId: good });
    await call(vmsA, 'RunVm', { vmId: bad });
    expect(await terminate(a)).toBe(0);
    const stateFile = path.join(stateDir, `${bad}.state`);
    const st = fs.readFileSync(stateFile);
    st[st.length >> 1] ^= 0x40;
    fs.writeFileSync(stateFile, st);

    const b = await start();
    const vmsB = b.client('VmService');
    const listed = (await call<{ vms: Record<string, any>[] }>(vmsB, 'ListVms', {})).vms;
    expect(listed.map((v) => v.id)).toEqual([good]);
    expect(listed[0].vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect(b.logs()).toMatch(new RegExp(`handed-over VM could not be restored.*${bad}.*does not match the manifest`));
    expect(sample(await b.scrape(), 'vcpud_handover_vms_total', { result: 'failed' })).toBe(1);
    const aside = fs.readdirSync(path.join(stateDir, 'aside'));
    expect(aside).toEqual([expect.stringContaining(`vm-${bad}`)]);
    const keptAside = fs.readdirSync(path.join(stateDir, 'aside', aside[0]));
    expect(keptAside.filter((n) => n.endsWith('.mem'))).toHaveLength(1);
    expect(keptAside.filter((n) => !n.endsWith('.mem'))).toEqual([`${bad}.state`]);
    expect(memFiles()).toHaveLength(1);
  });

  it('a second vcpud on the same state directory is refused at start; the first one keeps its VMs and files', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    const id = await counterVm(vmsA, { name: 'owned' });
    const kept = files();
    await expect(start()).rejects.toThrow(/exited with 1[\s\S]*state directory .* is in use by another vcpud process/);
    expect(files()).toEqual(kept);
    expect((await call<{ vm: { id: string } }>(vmsA, 'GetVm', { vmId: id })).vm.id).toBe(id);
  });

  it('a manifest of another format version is refused with a clear message; the files stay for the vcpud that wrote them', async () => {
    const a = await start();
    const vmsA = a.client('VmService');
    await counterVm(vmsA, { name: 'future' });
    expect(await terminate(a)).toBe(0);
    const manifest = path.join(stateDir, MANIFEST_NAME);
    const bytes = fs.readFileSync(manifest);
    fs.writeFileSync(manifest, Buffer.from(bytes.toString('latin1').replace(/^vcpud-handover 1 /, 'vcpud-handover 2 '), 'latin1'));
    const kept = files();
    await expect(start()).rejects.toThrow(/exited with 1[\s\S]*handover manifest .* is format version 2; this vcpud .* reads version 1 only/);
    expect(files()).toEqual(kept);
  });
});
