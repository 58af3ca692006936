/**
 * Adversarial: the snapshot file a VM was lazily restored from (its memory maps the file) is
 * truncated, or rewritten in place with cp (O_TRUNC on the same inode), while the VM lives. Against
 * a real vcpud: ReadMemory, WriteMemory and CreateSnapshot (to a file and to a stream) of that VM
 * fail with DATA_LOSS MEMORY_BACKING_LOST naming the file; the guest touching a lost page stops
 * with "memory_backing_lost"; vcpud stays up and a bystander VM keeps running and answering.
 * Before the fix the first ReadMemory or CreateSnapshot killed vcpud with SIGBUS.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import { consoleCollector, counterLines, counterVm, MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const PAGE = 4096;
/** Guest layouts (test/guests/README.md): which pages get non-zero bytes so a run of >= 16 pages is mapped. */
const LAYOUTS = {
  // counter64's counter (0x9000) and stack (0x10000) inside the mapped run, its code copied: the
  // guest's first write to the mapped run finds a lost page.
  dataMapped: { fill: [0x9000, 0x10000], lost: [0x9000, 0x19000] },
  // its code page (0x1000) inside the mapped run: the first instruction fetch finds a lost page.
  codeMapped: { fill: [0x2000, 0xf000], lost: [0x1000, 0x11000] },
} as const;

describeKvm('snapshot files changed under a lazily restored VM (real vcpud)', () => {
  const snapDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-changed-'));
  let v: VcpudProcess;
  let vms: Client;
  let snaps: Client;
  let bystander: string;
  let bystanderConsole: ReturnType<typeof consoleCollector>;

  beforeAll(async () => {
    v = await startVcpud(['--snapshot-dir', snapDir]);
    vms = v.client('VmService');
    snaps = v.client('SnapshotService');
    bystander = await counterVm(vms, { name: 'bystander' });
    bystanderConsole = consoleCollector(vms, bystander);
    await call(vms, 'RunVm', { vmId: bystander });
  });
  afterAll(async () => {
    bystanderConsole?.stop();
    await v?.stop();
    fs.rmSync(snapDir, { recursive: true, force: true });
  });
  afterEach(async () => {
    const { vms: left } = await call<{ vms: { id: string }[] }>(vms, 'ListVms', {});
    for (const vm of left) if (vm.id !== bystander) await call(vms, 'DeleteVm', { vmId: vm.id });
  });

  /** vcpud is up, and the bystander VM answers and keeps counting. */
  async function expectBystanderUnharmed() {
    expect({ exitCode: v.proc.exitCode, signal: v.proc.signalCode }).toEqual({ exitCode: null, signal: null });
    const before = counterLines(bystanderConsole.text()).length;
    await waitFor(() => counterLines(bystanderConsole.text()).length >= before + 50, 'the bystander to print 50 more lines');
    const { vm } = await call<{ vm: Record<string, any> }>(vms, 'GetVm', { vmId: bystander });
    expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
  }

  /** counter64 (not yet run) with `layout`'s pages filled, snapshotted to `name`, deleted, restored lazily (paused). */
  async function lazilyRestored(name: string, layout: keyof typeof LAYOUTS): Promise<{ id: string; file: string }> {
    const source = await counterVm(vms, { name: 'source' });
    const [at, len] = LAYOUTS[layout].fill;
    await call(vms, 'WriteMemory', { vmId: source, guestPhysicalAddress: String(at), data: Buffer.alloc(len, 0x5a) });
    const r = await runStream(snaps.CreateSnapshot({ vmId: source, name }));
    expect(r.error).toBeUndefined();
    await call(vms, 'DeleteVm', { vmId: source });
    const restored = await call<Record<string, any>>(snaps, 'RestoreSnapshot', { name, vmName: 'restored' });
    expect(Number(restored.stats.memoryBytesMapped)).toBeGreaterThanOrEqual(16 * PAGE); // lazily: the file is mapped
    return { id: restored.vm.id, file: path.join(snapDir, name) };
  }

  /** A snapshot much shorter than the one restored: a VM with no page beyond counter64's image. */
  async function shortSnapshot(name: string): Promise<string> {
    const id = await counterVm(vms, { name: 'short' });
    expect((await runStream(snaps.CreateSnapshot({ vmId: id, name }))).error).toBeUndefined();
    await call(vms, 'DeleteVm', { vmId: id });
    return path.join(snapDir, name);
  }

  function expectBackingLost(err: grpc.ServiceError | undefined, file: string, change: RegExp) {
    expect(err).toBeDefined();
    expect({ code: err!.code, reason: decodeStatusDetails(err!.metadata)?.errorInfo?.reason }).toEqual({
      code: grpc.status.DATA_LOSS,
      reason: 'MEMORY_BACKING_LOST',
    });
    expect(err!.details).toContain(file);
    expect(err!.details).toMatch(change);
  }

  /** ReadMemory, WriteMemory and CreateSnapshot (file and stream) of `id` all fail MEMORY_BACKING_LOST; no snapshot is left. */
  async function expectMemoryCallsFail(id: string, file: string, change: RegExp, lostGpa: number) {
    const read = await runStream(vms.ReadMemory({ vmId: id, guestPhysicalAddress: String(lostGpa), length: String(PAGE) }));
    expectBackingLost(read.error, file, change);
    expect(read.messages).toEqual([]);
    const write = await new Promise<grpc.ServiceError | undefined>((resolve) =>
      vms.WriteMemory({ vmId: id, guestPhysicalAddress: String(lostGpa), data: Buffer.alloc(8, 1) }, (e: grpc.ServiceError | null) => resolve(e ?? undefined)),
    );
    expectBackingLost(write, file, change);
    const toFile = await runStream(snaps.CreateSnapshot({ vmId: id, name: 'of-changed.snap' }));
    expectBackingLost(toFile.error, file, change);
    expect(fs.existsSync(path.join(snapDir, 'of-changed.snap'))).toBe(false);
    const toStream = await runStream(snaps.CreateSnapshot({ vmId: id, stream: true }));
    expectBackingLost(toStream.error, file, change);
  }

  /** Runs the VM until its vCPU stops (bounded); returns the vCPU. */
  async function runUntilStopped(id: string): Promise<Record<string, any>> {
    await call(vms, 'RunVm', { vmId: id });
    let vcpu: Record<string, any> = {};
    await waitFor(
      async () => {
        vcpu = (await call<{ vm: Record<string, any> }>(vms, 'GetVm', { vmId: id })).vm.vcpus[0];
        return vcpu.runState === 'VCPU_RUN_STATE_STOPPED';
      },
      'the restored vCPU to stop',
      10_000,
    );
    return vcpu;
  }

  it('truncated: memory calls fail MEMORY_BACKING_LOST naming the file; a guest write to a lost page stops memory_backing_lost at that GPA', async () => {
    const { id, file } = await lazilyRestored('truncated.snap', 'dataMapped');
    fs.truncateSync(file, 0);
    const [lostFrom, lostTo] = LAYOUTS.dataMapped.lost;
    await expectMemoryCallsFail(id, file, /was truncated to 0 bytes/, lostFrom);
    const vcpu = await runUntilStopped(id);
    expect(vcpu.stopReason).toBe('memory_backing_lost');
    expect(vcpu.stopDetails.gpa).toBeGreaterThanOrEqual(lostFrom);
    expect(vcpu.stopDetails.gpa).toBeLessThan(lostTo);
    expect(vcpu.stopDetails.isWrite).toBe(1);
    // Other VMs and other calls on this one are unaffected.
    expect((await call<{ vm: Record<string, any> }>(vms, 'GetVm', { vmId: id })).vm.id).toBe(id);
    await expectBystanderUnharmed();
  });

  it('rewritten in place by cp with a shorter snapshot: the same errors; the guest fetching code from a lost page stops memory_backing_lost', async () => {
    const { id, file } = await lazilyRestored('rewritten.snap', 'codeMapped');
    const other = await shortSnapshot('short.snap');
    const inode = fs.statSync(file).ino;
    execFileSync('cp', [other, file]); // O_TRUNC, then the other file's bytes: same inode
    expect(fs.statSync(file).ino).toBe(inode);
    const size = fs.statSync(file).size;
    const [lostFrom] = LAYOUTS.codeMapped.lost;
    await expectMemoryCallsFail(id, file, new RegExp(`was truncated to ${size} bytes`), lostFrom);
    const vcpu = await runUntilStopped(id);
    expect(vcpu.stopReason).toBe('memory_backing_lost');
    await expectBystanderUnharmed();
  });

  it('rewritten in place by cp with a longer snapshot (no page faults): memory calls still fail, saying the file changed', async () => {
    const { id, file } = await lazilyRestored('replaced.snap', 'dataMapped');
    const longer = await counterVm(vms, { name: 'longer', memory: 4 * MiB, fill: true });
    expect((await runStream(snaps.CreateSnapshot({ vmId: longer, name: 'longer.snap' }))).error).toBeUndefined();
    const before = fs.statSync(file);
    execFileSync('cp', [path.join(snapDir, 'longer.snap'), file]);
    expect(fs.statSync(file).ino).toBe(before.ino);
    expect(fs.statSync(file).size).toBeGreaterThan(before.size); // every mapped page exists: nothing faults
    await expectMemoryCallsFail(id, file, /was changed/, LAYOUTS.dataMapped.lost[0]);
    await expectBystanderUnharmed();
  });

  it('truncated while CreateSnapshot reads the mapped pages (on the libuv pool): that snapshot fails MEMORY_BACKING_LOST', async () => {
    const memory = 64 * MiB;
    const source = await counterVm(vms, { name: 'big', memory, fill: true });
    expect((await runStream(snaps.CreateSnapshot({ vmId: source, name: 'big.snap' }))).error).toBeUndefined();
    await call(vms, 'DeleteVm', { vmId: source });
    const restored = await call<Record<string, any>>(snaps, 'RestoreSnapshot', { name: 'big.snap' });
    const file = path.join(snapDir, 'big.snap');
    let truncatedAt: number | undefined;
    const r = await runStream(snaps.CreateSnapshot({ vmId: restored.vm.id, stream: true }), (m) => {
      // Truncated once the memory is being read: the check before it passed, the pages go mid-copy.
      if (truncatedAt === undefined && m.progress?.phase === 'SNAPSHOT_PHASE_MEMORY') {
        truncatedAt = Number(m.progress.memoryBytesDone);
        fs.truncateSync(file, 0);
      }
    });
    expect(truncatedAt).toBeDefined();
    expectBackingLost(r.error, file, /truncated/);
    console.log(`truncated at ${truncatedAt} of ${memory} bytes: ${r.error?.details}`);
    await expectBystanderUnharmed();
  });

  describe('migrating such a VM (to a second vcpud)', () => {
    let dst: VcpudProcess;
    beforeAll(async () => {
      dst = await startVcpud([]);
    });
    afterAll(async () => {
      await dst?.stop();
    });

    /** A 64 MiB VM of random-looking pages, snapshotted, deleted and restored lazily: its memory maps the file. */
    async function bigRestored(name: string): Promise<{ id: string; file: string }> {
      const source = await counterVm(vms, { name: 'big', memory: 64 * MiB, fill: true });
      expect((await runStream(snaps.CreateSnapshot({ vmId: source, name }))).error).toBeUndefined();
      await call(vms, 'DeleteVm', { vmId: source });
      const restored = await call<Record<string, any>>(snaps, 'RestoreSnapshot', { name });
      return { id: restored.vm.id, file: path.join(snapDir, name) };
    }

    async function expectNothingMoved(id: string) {
      expect((await call<{ vms: unknown[] }>(dst.client('VmService'), 'ListVms', {})).vms).toEqual([]);
      expect((await call<{ vm: { id: string } }>(vms, 'GetVm', { vmId: id })).vm.id).toBe(id);
      await expectBystanderUnharmed();
    }

    it('truncated before MigrateVm: DATA_LOSS MEMORY_BACKING_LOST naming the file, the VM stays here, nothing there', async () => {
      const { id, file } = await bigRestored('migrate-before.snap');
      fs.truncateSync(file, 0);
      const r = await runStream(snaps.MigrateVm({ vmId: id, destination: dst.serving.api }));
      console.log(`MigrateVm of a VM whose snapshot file was truncated: ${r.error && grpc.status[r.error.code]}: ${r.error?.details}`);
      expectBackingLost(r.error, file, /truncated/);
      await expectNothingMoved(id);
    });

    it('truncated during pass 1: DATA_LOSS MEMORY_BACKING_LOST naming the file, not a lost connection; nothing there', async () => {
      const { id, file } = await bigRestored('migrate-during.snap');
      let truncatedAt: number | undefined;
      const r = await runStream(snaps.MigrateVm({ vmId: id, destination: dst.serving.api, bandwidthBytesPerSecond: String(32 * MiB) }), (m) => {
        if (truncatedAt === undefined && Number(m.progress?.memoryBytesDone) > 0) {
          truncatedAt = Number(m.progress.memoryBytesDone);
          fs.truncateSync(file, 0);
        }
      });
      console.log(`MigrateVm, the snapshot file truncated at ${truncatedAt} bytes: ${r.error && grpc.status[r.error.code]}: ${r.error?.details}`);
      expect(truncatedAt).toBeDefined();
      expectBackingLost(r.error, file, /truncated/);
      expect(r.error!.details).not.toMatch(/connection/);
      await expectNothingMoved(id);
    });
  });

  it('a lazily restored VM whose file is intact reads, writes and snapshots as before', async () => {
    const { id } = await lazilyRestored('intact.snap', 'dataMapped');
    const read = await runStream(vms.ReadMemory({ vmId: id, guestPhysicalAddress: String(0x9000), length: String(PAGE) }));
    expect(read.error).toBeUndefined();
    expect(Buffer.concat(read.messages.map((m) => m.data)).every((b) => b === 0x5a)).toBe(true);
    await call(vms, 'WriteMemory', { vmId: id, guestPhysicalAddress: String(0x9000), data: Buffer.alloc(8, 1) });
    expect((await runStream(snaps.CreateSnapshot({ vmId: id, name: 'of-intact.snap' }))).error).toBeUndefined();
  });
});
