/**
 * A full disk during CreateSnapshot (issue 9), on a real vcpud whose --snapshot-dir is a 16 MiB
 * tmpfs: the call fails with RESOURCE_EXHAUSTED naming the snapshot, ENOSPC and the directory; the
 * previous snapshot under that name stays byte-identical and restorable; no temporary file is left;
 * the source VM runs again. Both write paths are hit: guest memory (native pwrite on the libuv
 * pool, a VM larger than the disk) and the records before it (fs.writeSync, a disk already full).
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { consoleCollector, counterLines, counterVm, MiB, runStream, sha256, waitFor, type Client } from '../support/snapshot';
import { describeKvmWithTmpfs } from '../support/tmpfs';
import { call, collect, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const NAME = 'full.snap';

describeKvmWithTmpfs('CreateSnapshot on a full disk (16 MiB tmpfs as --snapshot-dir)', '16m', (tmpfs) => {
  let d: VcpudProcess;
  let vms: Client;
  let snaps: Client;
  let dir: string;
  let file: string;
  let good: { sha: string; size: number };

  beforeAll(async () => {
    dir = tmpfs().dir;
    file = path.join(dir, NAME);
    d = await startVcpud(['--snapshot-dir', dir]);
    vms = d.client('VmService');
    snaps = d.client('SnapshotService');
    // The snapshot that fits: counter64 in 4 MiB (a few pages stored).
    const small = await counterVm(vms, { name: 'small' });
    await call(vms, 'RunVm', { vmId: small });
    const first = await runStream(snaps.CreateSnapshot({ vmId: small, name: NAME }));
    expect(first.error).toBeUndefined();
    good = { sha: sha256(file), size: fs.statSync(file).size };
  });
  afterAll(async () => {
    await d?.stop();
  });

  /** A running counter VM's snapshot under NAME fails with ENOSPC; everything else is as it was. */
  async function expectRefusedAndIntact(vmId: string, others: string[] = []) {
    const out = consoleCollector(vms, vmId);
    await waitFor(() => counterLines(out.text()).length > 20, 'the VM to count');

    const r = await runStream(snaps.CreateSnapshot({ vmId, name: NAME, replace: true })); // over the good one, which must survive
    expect(r.messages.some((m) => m.done)).toBe(false);
    expect({ code: r.error?.code, details: r.error?.details }).toEqual({ code: grpc.status.RESOURCE_EXHAUSTED, details: expect.any(String) });
    // A clear message: the snapshot, the errno and the directory.
    expect(r.error!.details).toContain(`snapshot "${NAME}"`);
    expect(r.error!.details).toContain('ENOSPC');
    expect(r.error!.details).toContain(dir);
    const st = decodeStatusDetails(r.error!.metadata);
    expect(st?.errorInfo).toMatchObject({ reason: 'STORAGE_FULL', domain: 'vcpud.dev', metadata: { errno: 'ENOSPC' } });

    // The previous snapshot is untouched and nothing else is there (no hidden temporary file).
    expect(fs.readdirSync(dir).sort()).toEqual([NAME, ...others].sort());
    expect({ sha: sha256(file), size: fs.statSync(file).size }).toEqual(good);
    // ... and restores (every checksum verified) into a VM that counts on.
    const restored = (await call<{ vm: { id: string } }>(snaps, 'RestoreSnapshot', { name: NAME, run: true })).vm.id;
    const rc = consoleCollector(vms, restored);
    await waitFor(() => counterLines(rc.text()).length > 20, 'the restored VM to count');
    rc.stop();
    await call(vms, 'DeleteVm', { vmId: restored });

    // The source VM was resumed and is not held: it keeps counting, and run control works.
    const vm = (await call<{ vm: Record<string, any> }>(vms, 'GetVm', { vmId })).vm;
    expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    const seen = counterLines(out.text()).length;
    await waitFor(() => counterLines(out.text()).length > seen + 50, 'the VM to count on after the failure');
    await call(vms, 'PauseVm', { vmId });
    await call(vms, 'ResumeVm', { vmId });
    out.stop();
    expect(d.proc.exitCode).toBeNull();
  }

  it('a VM larger than the free space: ENOSPC while writing guest memory', async () => {
    const big = await counterVm(vms, { name: 'big', memory: 64 * MiB, fill: true });
    await call(vms, 'RunVm', { vmId: big });
    await expectRefusedAndIntact(big);
    await call(vms, 'DeleteVm', { vmId: big });
  });

  it('a disk already full: ENOSPC on the first record; with room again the same call succeeds', async () => {
    const filler = path.join(dir, 'filler');
    const fd = fs.openSync(filler, 'w');
    const block = Buffer.alloc(64 * 1024, 0xa5);
    try {
      for (;;) fs.writeSync(fd, block);
    } catch (e) {
      expect((e as NodeJS.ErrnoException).code).toBe('ENOSPC');
    }
    try {
      for (;;) fs.writeSync(fd, block, 0, 512); // the last partial pages
    } catch (e) {
      expect((e as NodeJS.ErrnoException).code).toBe('ENOSPC');
    } finally {
      fs.closeSync(fd);
    }
    const vmId = await counterVm(vms, { name: 'small-2' });
    await call(vms, 'RunVm', { vmId });
    await expectRefusedAndIntact(vmId, ['filler']);

    fs.rmSync(filler);
    const again = await runStream(snaps.CreateSnapshot({ vmId, name: NAME, replace: true }));
    expect(again.error).toBeUndefined();
    expect(again.messages.some((m) => m.done)).toBe(true);
    expect(fs.readdirSync(dir).filter((n) => n.startsWith('.'))).toEqual([]);
  });
  it('an incremental snapshot on a full disk: STORAGE_FULL, and the next child (room again) still stores every page dirtied since the parent', async () => {
    const vmId = await counterVm(vms, { name: 'inc', memory: 32 * MiB });
    await call(vms, 'RunVm', { vmId });
    const base = await runStream(snaps.CreateSnapshot({ vmId, name: 'inc-base', trackDirty: true }));
    expect(base.error).toBeUndefined();
    // 4 MiB dirtied by vcpud, then the disk filled to 1 MiB of free space.
    const data = Buffer.alloc(4 * MiB, 0x6b);
    await call(vms, 'WriteMemory', { vmId, guestPhysicalAddress: String(16 * MiB), data });
    const filler = path.join(dir, 'filler-inc');
    const free = fs.statfsSync(dir);
    fs.writeFileSync(filler, Buffer.alloc(Math.max(0, free.bavail * free.bsize - MiB)));
    const full = await runStream(snaps.CreateSnapshot({ vmId, name: 'inc-child', parent: 'inc-base' }));
    expect(full.error?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(decodeStatusDetails(full.error!.metadata)?.errorInfo?.reason).toBe('STORAGE_FULL');
    expect(fs.existsSync(path.join(dir, 'inc-child'))).toBe(false);

    fs.rmSync(filler);
    const again = await runStream(snaps.CreateSnapshot({ vmId, name: 'inc-child', parent: 'inc-base' }));
    expect(again.error).toBeUndefined();
    const r = await call<{ vm: { id: string } }>(snaps, 'RestoreSnapshot', { name: 'inc-child' });
    const got = Buffer.concat(
      (await collect<{ data: Buffer }>(vms, 'ReadMemory', { vmId: r.vm.id, guestPhysicalAddress: String(16 * MiB), length: String(data.length) })).map(
        (m) => m.data,
      ),
    );
    expect(got.equals(data)).toBe(true); // the failed child's dirty pages were not lost
    for (const id of [vmId, r.vm.id]) await call(vms, 'DeleteVm', { vmId: id });
  });
});
