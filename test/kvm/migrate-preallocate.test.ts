/**
 * Preallocated destination memory (PrepareIncomingMigrationRequest.preallocate_memory, MigrateVm's
 * preallocate_destination_memory) against real vcpud processes. With the flag the destination has
 * committed the guest's memory when PrepareIncomingMigration answers (its RSS has grown by the
 * guest's size; without the flag it has not). A destination that cannot commit it (guest memory in
 * a --state-dir on a tmpfs smaller than the guest: the populate meets a page it cannot allocate,
 * EFAULT) answers RESOURCE_EXHAUSTED naming the size and errno with everything freed, and a
 * MigrateVm asking for it fails before any page is sent, the VM running on at the source.
 * (The e2e move of a counting guest with --preallocate is in live-migrate-e2e.test.ts.)
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { isMemoryFile } from '../../src/vm/guest-memory';
import { DIRTY64, dirty64Control, GUESTS, GUEST_ABI } from '../guests/guests';
import { migrationHeaderJson } from '../support/migration-header';
import { rssBytes, scrapeClosing } from '../support/proc-resources';
import { sample, samples } from '../support/prom';
import { MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { describeKvmWithTmpfs } from '../support/tmpfs';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

/** Large against the noise of a Node process's own RSS. */
const GUEST = 256 * MiB;
/** Larger than the tmpfs the small destination keeps guest memory in. */
const TOO_BIG = 64 * MiB;
const TMPFS = '32m';

describeKvmWithTmpfs('preallocated destination memory (real KVM)', TMPFS, (tmpfs) => {
  let src: VcpudProcess;
  let dst: VcpudProcess;
  let small: VcpudProcess;
  let dstMigrations: Client;
  let smallMigrations: Client;

  beforeAll(async () => {
    [src, dst, small] = await Promise.all([startVcpud(), startVcpud(), startVcpud(['--state-dir', tmpfs().dir])]);
    dstMigrations = dst.client('MigrationService');
    smallMigrations = small.client('MigrationService');
  });
  afterAll(async () => {
    await Promise.all([src?.stop(), dst?.stop(), small?.stop()]);
  });

  it("with preallocate_memory the destination's RSS has grown by the guest's size when prepare answers; without it, not", async () => {
    const header = migrationHeaderJson(GUEST);
    const pid = dst.proc.pid as number;
    const prepare = async (preallocateMemory: boolean) => {
      const before = rssBytes(pid);
      const t0 = performance.now();
      const { migrationId } = await call<{ migrationId: string }>(dstMigrations, 'PrepareIncomingMigration', { headerJson: header, preallocateMemory });
      const ms = performance.now() - t0;
      const grown = rssBytes(pid) - before;
      const { state } = await call<{ state: string }>(dstMigrations, 'GetIncomingMigration', { migrationId });
      await call(dstMigrations, 'AbortIncomingMigration', { migrationId, reason: 'the test only prepares' });
      // Aborting frees the memory (unmapped off the JS thread, so not at once).
      await waitFor(async () => rssBytes(pid) < before + GUEST / 4, 'the aborted migration to free its memory');
      return { grown, ms, state };
    };
    const without = await prepare(false);
    const withIt = await prepare(true);
    console.log(
      `PrepareIncomingMigration of a ${GUEST / MiB} MiB guest: RSS +${(without.grown / MiB).toFixed(1)} MiB in ${without.ms.toFixed(1)} ms without ` +
        `preallocate_memory, +${(withIt.grown / MiB).toFixed(1)} MiB in ${withIt.ms.toFixed(1)} ms with it`,
    );
    expect([without.state, withIt.state]).toEqual(['INCOMING_MIGRATION_STATE_WAITING', 'INCOMING_MIGRATION_STATE_WAITING']);
    expect(withIt.grown).toBeGreaterThanOrEqual(GUEST);
    expect(without.grown).toBeLessThan(GUEST / 4);
  });

  it('a destination that cannot commit the memory answers RESOURCE_EXHAUSTED naming size and errno, with nothing left of it', async () => {
    const err = await callError(smallMigrations, 'PrepareIncomingMigration', { headerJson: migrationHeaderJson(TOO_BIG), preallocateMemory: true });
    expect(err.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(decodeStatusDetails(err.metadata)?.errorInfo?.reason).toBe('HOST_RESOURCES_EXHAUSTED');
    expect(err.details).toMatch(/could not commit the guest's 64 MiB of memory \(preallocate_memory\): EFAULT beyond the first \d+(\.\d+)? MiB/);
    // The memory file is removed once the KVM VM made meanwhile is closed, and the tmpfs pages it held
    // are freed once its mapping is gone (unmapped off the JS thread, so not at once on a loaded host).
    await waitFor(async () => fs.readdirSync(tmpfs().dir).filter(isMemoryFile).length === 0, 'the memory file to be removed');
    await waitFor(async () => fs.statfsSync(tmpfs().dir).bfree === fs.statfsSync(tmpfs().dir).blocks, 'the tmpfs pages to be freed');
    // Without the flag the same prepare succeeds (memory is committed as pages arrive).
    const { migrationId } = await call<{ migrationId: string }>(smallMigrations, 'PrepareIncomingMigration', { headerJson: migrationHeaderJson(TOO_BIG) });
    await call(smallMigrations, 'AbortIncomingMigration', { migrationId, reason: 'the test only prepares' });
  });

  /**
   * A running dirty64 guest too big for the small destination's tmpfs: its memory from 8 MiB on holds
   * data (a migration sends only pages that may, so an untouched guest would fit).
   */
  async function tooBigGuest(vms: Client): Promise<string> {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(TOO_BIG), vcpuCount: 1 });
    for (let gpa = 8 * MiB; gpa < TOO_BIG; gpa += 8 * MiB)
      await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: Buffer.alloc(8 * MiB, 0xa5) });
    await call(vms, 'WriteMemory', {
      vmId: vm.id,
      guestPhysicalAddress: String(DIRTY64.control),
      data: dirty64Control({ rangeStart: 4 * MiB, rangePages: 256 }),
    });
    await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.dirty64.file), loadAddress: String(GUEST_ABI.loadAddress) });
    await call(vms, 'RunVm', { vmId: vm.id });
    return vm.id;
  }

  it('MigrateVm with preallocate_destination_memory to such a destination fails before any page is sent; the VM runs on at the source', async () => {
    const vms = src.client('VmService');
    const vm = { id: await tooBigGuest(vms) };
    const dataBytes = async () => samples(await scrapeClosing(src.serving.metrics), 'vcpud_migration_data_bytes_total').reduce((a, s) => a + s.value, 0);
    const sentBefore = await dataBytes();
    const r = await runStream(
      src.client('SnapshotService').MigrateVm({ vmId: vm.id, destination: small.serving.api, preallocateDestinationMemory: true }),
      () => {},
    );
    expect(r.error?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(r.error?.details).toMatch(/failed: prepare: .*RESOURCE_EXHAUSTED.*could not commit the guest's 64 MiB of memory .*EFAULT.*kept running here/);
    expect(await dataBytes()).toBe(sentBefore);
    const after = (await call<{ vm: { vcpus: { runState: string }[] } }>(vms, 'GetVm', { vmId: vm.id })).vm;
    expect(after.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect((await call<{ vms: unknown[] }>(small.client('VmService'), 'ListVms', {})).vms).toEqual([]);
    await call(vms, 'DeleteVm', { vmId: vm.id });
  });

  it('without it the pages meet the full tmpfs there: the destination counts the migration failed (its own failure), the VM runs on at the source', async () => {
    const vms = src.client('VmService');
    const vmId = await tooBigGuest(vms);
    const results = async () => {
      const text = await scrapeClosing(small.serving.metrics);
      return ['succeeded', 'failed', 'abandoned'].map((result) => sample(text, 'vcpud_incoming_migrations_total', { result }));
    };
    const before = await results();
    const r = await runStream(src.client('SnapshotService').MigrateVm({ vmId, destination: small.serving.api }), () => {});
    expect(r.error?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    console.log(`migration into a full tmpfs: ${grpc.status[r.error!.code]}: ${r.error!.details}`);
    // Named for what it is: the destination's memory, not the connection.
    expect(r.error!.details).toMatch(
      /pre-copy, pass 1: .*reported: guest memory could not take the incoming pages \(.*(SIGBUS|EFAULT).*filesystem .* full.*kept running here/,
    );
    expect(r.error!.details).not.toMatch(/connection/);
    await waitFor(async () => (await results())[1] === before[1]! + 1, 'the destination to count the migration failed');
    expect(await results()).toEqual([before[0], before[1]! + 1, before[2]]);
    expect(sample(await scrapeClosing(small.serving.metrics), 'vcpud_migrations_in_progress', { direction: 'incoming' })).toBe(0);
    const after = (await call<{ vm: { vcpus: { runState: string }[] } }>(vms, 'GetVm', { vmId })).vm;
    expect(after.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect((await call<{ vms: unknown[] }>(small.client('VmService'), 'ListVms', {})).vms).toEqual([]);
    await call(vms, 'DeleteVm', { vmId });
  });
});
