/**
 * A PrepareIncomingMigration with preallocate_memory whose caller gives up (its deadline passes, or
 * it cancels) while the destination commits the guest's memory: the commit stops within a chunk, the
 * incoming migration is discarded and its memory freed at once (not after the stall timeout, set to
 * 60 s here so that waiting for it cannot pass these tests), and the limits it held are free for
 * the next prepare. In-process, the prepare rejects CANCELLED naming how far the commit got.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { VcpudError } from '../../src/errors';
import { probeCapabilities } from '../../src/ffi/capabilities';
import { Kvm } from '../../src/ffi/kvm';
import { toServiceError } from '../../src/server/errors';
import { grpcCodeName } from '../../src/server/metrics';
import { isMemoryFile } from '../../src/vm/guest-memory';
import { IncomingMigration } from '../../src/vm/migration/incoming';
import { VmRegistry } from '../../src/vm/registry';
import type { SnapshotHeader } from '../../src/vm/snapshot-format';
import { describeKvm, testMemorySource } from '../support/kvm';
import { migrationHeaderJson } from '../support/migration-header';
import { rssBytes, scrapeClosing } from '../support/proc-resources';
import { sample } from '../support/prom';
import { MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

/** Long to commit (0.3-2.9 s per GiB here), against a total limit that holds one such guest, not two. */
const GUEST = 2048 * MiB;
/** Enough of the guest committed to tell a commit under way from a Node process's own RSS noise. */
const UNDER_WAY = 128 * MiB;
/** Memory freed: RSS back within this of where it was. */
const NEAR = 64 * MiB;

describeKvm('PrepareIncomingMigration cancelled while committing guest memory (real KVM)', () => {
  let src: VcpudProcess;
  let dst: VcpudProcess;
  let migrations: Client;
  let stateDir: string;
  const header = migrationHeaderJson(GUEST);

  beforeAll(async () => {
    // The guest memory as files, so the test sees when the incoming migration's memory is gone.
    stateDir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'vcpud-prepare-cancel-'));
    src = await startVcpud();
    dst = await startVcpud(['--state-dir', stateDir, '--migration-stall-timeout', '60s', '--max-memory-total', `${(GUEST * 3) / 2 / MiB}Mi`]);
    migrations = dst.client('MigrationService');
  });
  afterAll(async () => {
    await Promise.all([src?.stop(), dst?.stop()]);
    if (stateDir) fs.rmSync(stateDir, { recursive: true, force: true });
  });

  const memoryFiles = () => fs.readdirSync(stateDir).filter(isMemoryFile);
  const committedBytes = () => memoryFiles().reduce((a, f) => a + fs.statSync(path.join(stateDir, f)).blocks * 512, 0);
  const received = async () =>
    sample(await scrapeClosing(dst.serving.metrics), 'grpc_server_msg_received_total', { grpc_method: 'PrepareIncomingMigration' }) ?? 0;
  const preparesCancelled = async () =>
    sample(await scrapeClosing(dst.serving.metrics), 'grpc_server_handled_total', {
      grpc_method: 'PrepareIncomingMigration',
      grpc_code: grpcCodeName(grpc.status.CANCELLED),
    }) ?? 0;

  /** Waits until the destination holds no incoming memory (no file, RSS back near `rssBefore`); answers when (performance.now()). */
  async function expectFreed(rssBefore: number, what: string): Promise<number> {
    const pid = dst.proc.pid as number;
    await waitFor(async () => memoryFiles().length === 0 && rssBytes(pid) < rssBefore + NEAR, what);
    return performance.now();
  }

  /** A full prepare (with preallocate_memory) works afterwards: nothing of the cancelled one holds the limits; then it is aborted. */
  async function expectNewPrepareWorks(rssBefore: number): Promise<void> {
    const { migrationId } = await call<{ migrationId: string }>(migrations, 'PrepareIncomingMigration', { headerJson: header, preallocateMemory: true });
    expect((await call<{ state: string }>(migrations, 'GetIncomingMigration', { migrationId })).state).toBe('INCOMING_MIGRATION_STATE_WAITING');
    await call(migrations, 'AbortIncomingMigration', { migrationId, reason: 'the test only prepares' });
    await expectFreed(rssBefore, 'the aborted migration to free its memory');
  }

  it('its deadline passing frees the memory at once, and a new prepare works', async () => {
    const rssBefore = rssBytes(dst.proc.pid as number);
    const received0 = await received();
    const err = await new Promise<grpc.ServiceError | null>((resolve) =>
      (migrations as Client).PrepareIncomingMigration(
        { headerJson: header, preallocateMemory: true },
        new grpc.Metadata(),
        { deadline: Date.now() + 150 },
        (e: grpc.ServiceError | null) => resolve(e),
      ),
    );
    const t0 = performance.now();
    expect(err?.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    // The destination had the request (its memory file was made with it) before it can have freed it.
    await waitFor(async () => (await received()) > received0, 'the destination to receive the prepare');
    const ms = (await expectFreed(rssBefore, "the destination to free the cancelled prepare's memory")) - t0;
    console.log(`prepare of a ${GUEST / MiB} MiB guest, deadline 150 ms: memory freed ${ms.toFixed(0)} ms after the client saw DEADLINE_EXCEEDED`);
    await expectNewPrepareWorks(rssBefore);
  });

  it('a client cancel in the middle of the commit frees the memory at once, and a new prepare works', async () => {
    const rssBefore = rssBytes(dst.proc.pid as number);
    let ended: grpc.ServiceError | null | undefined;
    const pending = (migrations as Client).PrepareIncomingMigration(
      { headerJson: header, preallocateMemory: true },
      new grpc.Metadata(),
      { deadline: Date.now() + 60_000 },
      (e: grpc.ServiceError | null) => (ended = e),
    ) as grpc.ClientUnaryCall;
    await waitFor(() => committedBytes() >= UNDER_WAY || ended !== undefined, 'the destination to commit some of the memory');
    const committed = committedBytes();
    const t0 = performance.now();
    pending.cancel();
    const ms = (await expectFreed(rssBefore, "the destination to free the cancelled prepare's memory")) - t0;
    console.log(
      `prepare of a ${GUEST / MiB} MiB guest cancelled with ${(committed / MiB).toFixed(0)} MiB committed: memory freed ${ms.toFixed(0)} ms after the cancel`,
    );
    expect(ended?.code).toBe(grpc.status.CANCELLED);
    await expectNewPrepareWorks(rssBefore);
  });

  it('a prepare still committing its memory holds the limits: a second one at the same time is refused', async () => {
    const rssBefore = rssBytes(dst.proc.pid as number);
    const prepare = () =>
      call<{ migrationId: string }>(migrations, 'PrepareIncomingMigration', { headerJson: header, preallocateMemory: true }).then(
        (r) => ({ ok: r.migrationId }),
        (e: grpc.ServiceError) => ({ err: e }),
      );
    // The second arrives while the first commits 2 GiB (seconds); the total limit holds one guest, not two.
    const first = prepare();
    await waitFor(() => committedBytes() > 0, 'the destination to start committing the first guest');
    const results = await Promise.all([first, prepare()]);
    const refused = results.flatMap((r) => ('err' in r ? [r.err] : []));
    const prepared = results.flatMap((r) => ('ok' in r ? [r.ok] : []));
    for (const migrationId of prepared) await call(migrations, 'AbortIncomingMigration', { migrationId, reason: 'the test only prepares' });
    expect(prepared).toHaveLength(1);
    expect(refused.map((e) => [e.code, decodeStatusDetails(e.metadata)?.errorInfo?.metadata?.limit])).toEqual([
      [grpc.status.RESOURCE_EXHAUSTED, 'max_memory_total_bytes'],
    ]);
    await expectFreed(rssBefore, 'the aborted migration to free its memory');
  });

  it('MigrateVm cancelled by its caller while the destination commits: the source cancels the prepare, the destination frees it at once', async () => {
    const vms = src.client('VmService');
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(GUEST), vcpuCount: 1 });
    const rssBefore = rssBytes(dst.proc.pid as number);
    const cancelled0 = await preparesCancelled();
    const stream = (src.client('SnapshotService') as Client).MigrateVm({
      vmId: vm.id,
      destination: dst.serving.api,
      preallocateDestinationMemory: true,
    }) as grpc.ClientReadableStream<unknown>;
    const ended = runStream(stream);
    await waitFor(() => committedBytes() >= UNDER_WAY, 'the destination to commit some of the memory');
    const committed = committedBytes();
    const t0 = performance.now();
    stream.cancel();
    const ms = (await expectFreed(rssBefore, "the destination to free the cancelled migration's memory")) - t0;
    console.log(
      `MigrateVm of a ${GUEST / MiB} MiB VM cancelled with ${(committed / MiB).toFixed(0)} MiB committed at the destination: freed there ${ms.toFixed(0)} ms after the cancel`,
    );
    expect((await ended).error?.code).toBe(grpc.status.CANCELLED);
    // The destination saw its prepare cancelled (not answered, then aborted by the source).
    await waitFor(async () => (await preparesCancelled()) > cancelled0, 'the destination to count the prepare cancelled');
    expect((await call<{ vm: { id: string } }>(vms, 'GetVm', { vmId: vm.id })).vm.id).toBe(vm.id);
    await call(vms, 'DeleteVm', { vmId: vm.id });
    await expectNewPrepareWorks(rssBefore);
  });
});

describeKvm('IncomingMigration.prepare with an aborted signal (real KVM, in process)', () => {
  const memory = testMemorySource();
  it('rejects CANCELLED naming the phase and how much was committed, and frees the memory', async () => {
    const kvm = Kvm.open();
    const registry = new VmRegistry(kvm, undefined, memory);
    const header = JSON.parse(migrationHeaderJson(GUEST).toString()) as SnapshotHeader;
    const rssBefore = rssBytes(process.pid);
    const abort = new AbortController();
    try {
      const preparing = IncomingMigration.prepare(registry, probeCapabilities(kvm), header, {
        stallMs: 60_000,
        checkLimits: () => {},
        preallocate: true,
        signal: abort.signal,
      });
      const outcome = preparing.then(
        (m) => m,
        (e: unknown) => e,
      );
      let settled = false;
      void outcome.then(() => (settled = true));
      await waitFor(() => rssBytes(process.pid) >= rssBefore + UNDER_WAY || settled, 'the commit to get under way');
      abort.abort(new VcpudError('cancelled', 'the caller gave up'));
      const e = await outcome;
      if (e instanceof IncomingMigration) e.discard('the test expected a cancel');
      expect(e).toBeInstanceOf(VcpudError);
      expect((e as VcpudError).kind).toBe('cancelled');
      expect((e as VcpudError).message).toMatch(/^the caller gave up while committing guest memory, \d+ of 2048 MiB: the incoming migration was discarded$/);
      expect(toServiceError(e).code).toBe(grpc.status.CANCELLED);
      await waitFor(() => rssBytes(process.pid) < rssBefore + NEAR, 'the memory to be freed');
    } finally {
      registry.destroyAll();
      kvm.close();
    }
  });
});
