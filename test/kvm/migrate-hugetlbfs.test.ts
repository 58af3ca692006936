/**
 * Live migration between two vcpuds whose guest memory is in huge pages: each one's --state-dir on
 * hugetlbfs over a pool the suite reserves (what README's "Guest memory in huge pages" advises for
 * migration destinations). A running dirty64 guest moves there and back: every page of its range holds
 * what its counter says, its random memory is the source's byte for byte, and each copy takes the
 * pool's pages while it lives (its memory file on the mount) and gives them back when it is deleted.
 * Only pages that hold data are taken: the migration neither reads the source's untouched pages (a
 * read would allocate them) nor allocates the destination's for pages that arrive as zero. A snapshot
 * of such a guest stores and reads only those pages too, and restores intact in the other vcpud.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { native } from '../../src/ffi/native';
import { isMemoryFile } from '../../src/vm/guest-memory';
import { countBits } from '../../src/vm/snapshot-format';
import { DIRTY64 } from '../guests/guests';
import { dirtyGuest, expectIntact, readMemory, untilLapped } from '../support/dirty-guest';
import { describeKvmWithHugepages, hugepagesTaken } from '../support/hugepage-pool';
import { MiB, runStream, uploadSnapshot, waitFor, type Client } from '../support/snapshot';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const MEMORY = 64 * MiB;
const PAGES_PER_COPY = MEMORY / (2 * MiB);
/** Written with zeros before the move: allocated on the source, sent as zero pages. */
const ZEROED = { at: 20 * MiB, bytes: 4 * MiB };

describeKvmWithHugepages('live migration with guest memory in huge pages (real KVM)', 2 * PAGES_PER_COPY + 8, (pool) => {
  const daemons: Record<'a' | 'b', VcpudProcess> = {} as never;
  const dirs: Record<'a' | 'b', string> = {} as never;

  beforeAll(async () => {
    for (const side of ['a', 'b'] as const) {
      dirs[side] = fs.mkdtempSync(path.join(pool().mount, `${side}-`));
      daemons[side] = await startVcpud(['--state-dir', dirs[side]]);
    }
  });
  // SIGINT: the VMs are destroyed, not saved in the state directories for a restart.
  afterAll(async () => Promise.all(Object.values(daemons).map((d) => d.stop('SIGINT'))));

  const memoryFiles = (side: 'a' | 'b') => fs.readdirSync(dirs[side]).filter(isMemoryFile);

  /** MigrateVm from `from` to `to`; resolves to the moved VM's id and the most pool pages taken while it ran. */
  async function migrate(from: 'a' | 'b', to: 'a' | 'b', vmId: string): Promise<{ id: string; maxTaken: number }> {
    let maxTaken = hugepagesTaken();
    const r = await runStream(daemons[from].client('SnapshotService').MigrateVm({ vmId, destination: daemons[to].serving.api }), () => {
      maxTaken = Math.max(maxTaken, hugepagesTaken());
    });
    expect(r.error).toBeUndefined();
    const done = r.messages.find((m) => m.done)?.done;
    expect(done.mode).toBe('MIGRATION_MODE_PRE_COPY');
    expect(done.destinationVm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect((await callError(daemons[from].client('VmService'), 'GetVm', { vmId })).code).toBe(grpc.status.NOT_FOUND);
    return { id: done.destinationVm.id, maxTaken };
  }

  /** Waits until dirty64 in `vmId` has written 1000 more values. */
  async function stillWriting(vms: Client, vmId: string): Promise<void> {
    const lastValue = async () => (await readMemory(vms, vmId, DIRTY64.control + DIRTY64.lastValue, 8)).readBigUInt64LE(0);
    const at = await lastValue();
    await waitFor(async () => (await lastValue()) > at + 1000n, 'dirty64 to go on writing after the move');
  }

  it('a running dirty64 guest moves there and back intact, each copy taking only the pool pages that hold data', async () => {
    const taken = hugepagesTaken();
    const aVms = daemons.a.client('VmService');
    const bVms = daemons.b.client('VmService');
    const guest = await dirtyGuest(aVms, MEMORY);
    await call(aVms, 'WriteMemory', { vmId: guest.id, guestPhysicalAddress: String(ZEROED.at), data: Buffer.alloc(ZEROED.bytes) });
    expect(memoryFiles('a')).toHaveLength(1);
    await untilLapped(aVms, guest.id, 2);
    // Pages are taken as they are first touched (the memory is mapped MAP_NORESERVE, as on a tmpfs): at
    // least the random upper half and the zeroed range, and the pages of the program, its control block
    // and its range. A copy made by a migration takes those that hold data.
    const source = hugepagesTaken() - taken;
    const zeroed = ZEROED.bytes / (2 * MiB);
    expect(source).toBeGreaterThanOrEqual(PAGES_PER_COPY / 2 + zeroed);
    const copy = source - zeroed;

    const there = await migrate('a', 'b', guest.id);
    expect([memoryFiles('a').length, memoryFiles('b').length]).toEqual([0, 1]);
    // While both copies lived the source had taken no more than before (none of its untouched pages
    // was read) and the destination no more than its data.
    expect(there.maxTaken - taken).toBeLessThanOrEqual(source + copy);
    // The source's pages went back to the pool when its copy was deleted (unmapped off the JS thread).
    await waitFor(async () => hugepagesTaken() - taken === copy, "the source copy's huge pages to return to the pool");
    await stillWriting(bVms, there.id);

    const back = await migrate('b', 'a', there.id);
    expect(back.maxTaken - taken).toBeLessThanOrEqual(2 * copy);
    await waitFor(async () => hugepagesTaken() - taken === copy, 'the copy at b to give its pages back');
    await stillWriting(aVms, back.id);
    await expectIntact(aVms, daemons.a.client('VcpuStateService'), guest, back.id, MEMORY);
    expect((await readMemory(aVms, back.id, ZEROED.at, ZEROED.bytes)).equals(Buffer.alloc(ZEROED.bytes))).toBe(true);

    await call(aVms, 'DeleteVm', { vmId: back.id });
    await waitFor(async () => hugepagesTaken() === taken, 'every huge page to return to the pool');
    expect([memoryFiles('a').length, memoryFiles('b').length]).toEqual([0, 0]);
  });

  it("a memory file mapped again (a restart's handover) has pages its new mapping has not touched: every page is a candidate", () => {
    const file = path.join(pool().mount, 'remapped.mem');
    const pages = (2 * MiB) / 4096;
    const fd = fs.openSync(file, 'w+');
    try {
      fs.ftruncateSync(fd, 4 * MiB);
      const first = new native.GuestMemory(4 * MiB, fd);
      first.write(2 * MiB, Buffer.alloc(4096, 1));
      // Fresh file: the mapping's own pages say which exist (the second huge page, all of its 4 KiB pages).
      expect(countBits(first.candidatePages(0, 2 * pages), 2 * pages)).toBe(pages);
      first.release();
      const again = new native.GuestMemory(4 * MiB, fd);
      // Not this mapping's pages: which hold data is unknown, so every page is read.
      expect(countBits(again.candidatePages(0, 2 * pages), 2 * pages)).toBe(2 * pages);
      again.release();
    } finally {
      fs.closeSync(fd);
      fs.rmSync(file, { force: true });
    }
  });

  it('a snapshot of a guest on hugetlbfs stores the pages that hold data, takes no pool page, and restores intact there', async () => {
    const aVms = daemons.a.client('VmService');
    const guest = await dirtyGuest(aVms, MEMORY);
    await untilLapped(aVms, guest.id, 1);
    await call(aVms, 'PauseVm', { vmId: guest.id });
    const before = hugepagesTaken();
    const data: Buffer[] = [];
    const made = await runStream(daemons.a.client('SnapshotService').CreateSnapshot({ vmId: guest.id, stream: true }), (m) => m.data && data.push(m.data));
    expect(made.error).toBeUndefined();
    const done = made.messages.find((m) => m.done)?.done;
    // The random upper half at least, and far from every page: the holes were neither stored nor read.
    expect(Number(done.memoryPagesStored)).toBeGreaterThanOrEqual(MEMORY / 2 / 4096);
    expect(Number(done.memoryPagesStored)).toBeLessThan((MEMORY * 3) / 4 / 4096);
    expect(hugepagesTaken()).toBe(before);
    const restored = await uploadSnapshot(daemons.b.client('SnapshotService'), Buffer.concat(data));
    await call(aVms, 'DeleteVm', { vmId: guest.id });
    await expectIntact(daemons.b.client('VmService'), daemons.b.client('VcpuStateService'), guest, restored.vm.id, MEMORY);
    await call(daemons.b.client('VmService'), 'DeleteVm', { vmId: restored.vm.id });
  });
});
