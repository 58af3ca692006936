/**
 * The snapshot directory against an adversary with write access to it, on real vcpud processes:
 * a subdirectory swapped with a symbolic link to an outside directory (renameat2 RENAME_EXCHANGE in
 * a loop) never lets DeleteSnapshot or CreateSnapshot touch outside; a FIFO swapped in for a snapshot
 * is refused at once while a bystander's calls are answered; 20,000 files are listed in pages
 * without stalling a bystander (its p99 is reported, not asserted); a temporary file left by kill -9
 * in a subdirectory is removed when vcpud starts again; permission problems answer
 * FAILED_PRECONDITION SNAPSHOT_DIR_ACCESS_DENIED naming the path, and an unreadable subdirectory is a
 * problem entry of the listing.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { percentile } from '../../bench/floors';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import { counterVm, MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';
import { escapeArena, swapLoop, VICTIM } from '../support/rename-exchange';

const JUNK = `not a snapshot at all, clearly; long enough to read a header from: ${'x'.repeat(100)}`;
const RACE_SECONDS = 4;

/** Code and reason (or rule) of a failed call, 'OK' for a success. */
function outcome(err: grpc.ServiceError | undefined): string {
  if (!err) return 'OK';
  const d = decodeStatusDetails(err.metadata);
  return `${grpc.status[err.code]} ${d?.badRequest?.[0]?.reason ?? d?.errorInfo?.reason ?? ''}`.trim();
}

async function settle(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'OK';
  } catch (e) {
    return outcome(e as grpc.ServiceError);
  }
}

/** ListVms in a loop until stopped: the latencies of a client that only wants to be answered. */
function bystander(vms: Client): { stop(): Promise<{ latencies: number[]; errors: string[] }> } {
  const latencies: number[] = [];
  const errors: string[] = [];
  let running = true;
  const loop = (async () => {
    for (let i = 0; running && i < 100_000; i++) {
      const t = performance.now();
      const r = await settle(call(vms, 'ListVms', {}));
      latencies.push(performance.now() - t);
      if (r !== 'OK') errors.push(r);
      await new Promise((res) => setTimeout(res, 5));
    }
  })();
  return {
    async stop() {
      running = false;
      await loop;
      return { latencies, errors };
    },
  };
}

const report = (l: number[]) =>
  `${l.length} calls, p50 ${percentile(l, 50).toFixed(1)} ms, p99 ${percentile(l, 99).toFixed(1)} ms, max ${Math.max(...l).toFixed(1)} ms`;

describeKvm('the snapshot directory against a writer of it (real vcpud)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-confine-'));
  const dir = path.join(root, 'snaps');
  let d: VcpudProcess;
  let vms: Client;
  let snaps: Client;

  beforeAll(async () => {
    fs.mkdirSync(dir);
    d = await startVcpud(['--snapshot-dir', dir]);
    vms = d.client('VmService');
    snaps = d.client('SnapshotService');
  });
  afterAll(async () => {
    await d?.stop('SIGKILL'); // a vcpud stuck on a FIFO (the bug this guards against) would not handle SIGTERM
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('rename-exchange of a subdirectory and a link to outside: DeleteSnapshot and CreateSnapshot touch nothing outside', async () => {
    const arena = escapeArena(path.join(dir, 'race'), path.join(root, 'outside'), JUNK);
    const id = await counterVm(vms);
    const racer = swapLoop(arena.sub, arena.link, RACE_SECONDS);
    const outcomes: Record<string, number> = {};
    const count = (k: string) => (outcomes[k] = (outcomes[k] ?? 0) + 1);
    for (let i = 0; i < 10_000 && racer.running(); i++) {
      const del = await settle(call(snaps, 'DeleteSnapshot', { name: `race/sub/${VICTIM}` }));
      count(`delete ${del}`);
      if (del === 'OK') arena.putBack();
      const created = await runStream(snaps.CreateSnapshot({ vmId: id, name: 'race/sub/new.snap', replace: true }));
      count(`create ${outcome(created.error as grpc.ServiceError | undefined)}`);
    }
    const swaps = await racer.done;
    arena.close();
    console.log(`rename-exchange against vcpud: ${swaps} swaps in ${RACE_SECONDS} s; outcomes ${JSON.stringify(outcomes)}`);
    expect(arena.outsideEntries()).toEqual([VICTIM]);
    expect(arena.outsideVictimIntact()).toBe(true);
    expect(outcomes['delete OK']).toBeGreaterThan(0); // the race ran against real deletes and creates
    expect(outcomes['create OK']).toBeGreaterThan(0);
    await call(vms, 'DeleteVm', { vmId: id });
  }, 60_000);

  it('a FIFO swapped in for a snapshot is refused at once and a bystander is answered throughout', async () => {
    fs.mkdirSync(path.join(dir, 'fifo'));
    fs.writeFileSync(path.join(dir, 'fifo/junk.snap'), JUNK);
    execFileSync('mkfifo', [path.join(dir, 'fifo/pipe')]);
    const watcher = bystander(vms);
    const racer = swapLoop(path.join(dir, 'fifo/junk.snap'), path.join(dir, 'fifo/pipe'), RACE_SECONDS);
    const outcomes: Record<string, number> = {};
    for (let i = 0; i < 10_000 && racer.running(); i++) {
      const r = await settle(
        new Promise((resolve, reject) =>
          snaps.RestoreSnapshot(
            { name: 'fifo/junk.snap' },
            new grpc.Metadata(),
            { deadline: Date.now() + 5_000 },
            (err: grpc.ServiceError | null, res: unknown) => (err ? reject(err) : resolve(res)),
          ),
        ),
      );
      outcomes[r] = (outcomes[r] ?? 0) + 1;
    }
    await racer.done;
    const { latencies, errors } = await watcher.stop();
    console.log(`FIFO swap against RestoreSnapshot: outcomes ${JSON.stringify(outcomes)}; bystander ListVms ${report(latencies)}`);
    expect(errors).toEqual([]);
    expect(Object.keys(outcomes).every((k) => k.startsWith('INVALID_ARGUMENT'))).toBe(true); // never stuck (DEADLINE_EXCEEDED), never INTERNAL
    expect(outcomes['INVALID_ARGUMENT snapshot.name.not_file']).toBeGreaterThan(0);
  }, 60_000);

  it('20,000 files: ListSnapshots answers in pages and a bystander keeps being answered (p99 reported)', async () => {
    const many = path.join(dir, 'many');
    fs.mkdirSync(many);
    const FILES = 20_000;
    for (let i = 0; i < FILES; i++) fs.writeFileSync(path.join(many, `f${String(i).padStart(5, '0')}.snap`), JUNK);
    const watcher = bystander(vms);
    const listings: number[] = [];
    let names: string[] = [];
    let firstPage = 0;
    for (let round = 0; round < 3; round++) {
      const t = performance.now();
      names = [];
      let token = '';
      for (let page = 0; page < 1000; page++) {
        const r = await call<{ snapshots: { name: string }[]; nextPageToken: string }>(snaps, 'ListSnapshots', { pageToken: token });
        if (page === 0) firstPage = r.snapshots.length;
        names.push(...r.snapshots.map((s) => s.name));
        token = r.nextPageToken;
        if (!token) break;
      }
      listings.push(performance.now() - t);
    }
    const { latencies, errors } = await watcher.stop();
    console.log(
      `ListSnapshots of ${FILES} files (3 full listings, default pages): ${listings.map((ms) => `${ms.toFixed(0)} ms`).join(', ')}; bystander ListVms ${report(latencies)}`,
    );
    expect(errors).toEqual([]);
    expect(firstPage).toBeLessThanOrEqual(1000);
    const listed = names.filter((n) => n.startsWith('many/'));
    expect(new Set(listed).size).toBe(FILES);
    expect(listed).toHaveLength(FILES);
    fs.rmSync(many, { recursive: true });
  }, 120_000);
});

describeKvm('kill -9 during CreateSnapshot into a subdirectory', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-confine-kill-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('leaves a temporary file there that the next vcpud removes at start', async () => {
    const d = await startVcpud(['--snapshot-dir', dir]);
    const vms = d.client('VmService');
    const id = await counterVm(vms, { memory: 256 * MiB, fill: true });
    const sub = path.join(dir, 'nightly/web');
    const temps = () => (fs.existsSync(sub) ? fs.readdirSync(sub).filter((n) => n.endsWith('.vcpud-tmp')) : []);
    const pending = runStream(d.client('SnapshotService').CreateSnapshot({ vmId: id, name: 'nightly/web/big.snap' }));
    await waitFor(() => temps().some((t) => fs.statSync(path.join(sub, t)).size > 8 * MiB), 'the temporary file to fill', 20_000);
    d.proc.kill('SIGKILL');
    expect((await pending).error).toBeDefined();
    await d.stop();
    expect(temps()).toHaveLength(1);

    const d2 = await startVcpud(['--snapshot-dir', dir]);
    try {
      await waitFor(() => temps().length === 0, "the startup sweep to remove the dead run's temporary file", 10_000);
    } finally {
      await d2.stop();
    }
  }, 60_000);
});

/** The gid that may open /dev/kvm (its group). */
const kvmGid = () => fs.statSync('/dev/kvm').gid;

describeKvm('permission problems in the snapshot directory (vcpud as an unprivileged user)', () => {
  // As root the kernel skips permission checks (CAP_DAC_OVERRIDE): vcpud runs as nobody then, in /dev/kvm's group.
  const as = process.getuid?.() === 0 ? { uid: 65534, gid: kvmGid() } : undefined;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-confine-eacces-'));
  let d: VcpudProcess;
  let snaps: Client;
  let vms: Client;

  beforeAll(async () => {
    fs.writeFileSync(path.join(dir, 'ok.snap'), JUNK);
    fs.mkdirSync(path.join(dir, 'locked'));
    fs.writeFileSync(path.join(dir, 'locked/x.snap'), JUNK);
    fs.mkdirSync(path.join(dir, 'readonly'));
    if (as) execFileSync('chown', ['-R', `${as.uid}:${as.gid}`, dir]);
    fs.chmodSync(path.join(dir, 'locked'), 0);
    fs.chmodSync(path.join(dir, 'readonly'), 0o500);
    d = await startVcpud(['--snapshot-dir', dir], {}, [], { as });
    snaps = d.client('SnapshotService');
    vms = d.client('VmService');
  });
  afterAll(async () => {
    await d?.stop();
    fs.chmodSync(dir, 0o700);
    fs.chmodSync(path.join(dir, 'locked'), 0o700);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function expectAccessDenied(err: grpc.ServiceError, file: string) {
    expect({ code: grpc.status[err.code], details: err.details }).toMatchObject({ code: 'FAILED_PRECONDITION', details: expect.stringContaining(file) });
    expect(err.details).toMatch(/EACCES/);
    expect(decodeStatusDetails(err.metadata)?.errorInfo?.reason).toBe('SNAPSHOT_DIR_ACCESS_DENIED');
  }

  it('an unreadable subdirectory is a problem entry; the rest is listed', async () => {
    const r = await call<{ snapshots: { name: string; problem: string }[] }>(snaps, 'ListSnapshots', {});
    expect(r.snapshots.map((s) => s.name)).toEqual(['locked', 'ok.snap']); // readonly/ is empty
    expect(r.snapshots[0].problem).toMatch(/EACCES/);
  });

  it('Delete, Restore and Create under it answer FAILED_PRECONDITION naming the path', async () => {
    const locked = path.join(dir, 'locked');
    expectAccessDenied(await callError(snaps, 'DeleteSnapshot', { name: 'locked/x.snap' }), locked);
    expectAccessDenied(await callError(snaps, 'RestoreSnapshot', { name: 'locked/x.snap' }), locked);
    const id = await counterVm(vms);
    const created = await runStream(snaps.CreateSnapshot({ vmId: id, name: 'locked/new.snap' }));
    expectAccessDenied(created.error as grpc.ServiceError, locked);
    // A directory vcpud can read but not write: the temporary file cannot be created in it.
    const readonly = await runStream(snaps.CreateSnapshot({ vmId: id, name: 'readonly/new.snap' }));
    expectAccessDenied(readonly.error as grpc.ServiceError, path.join(dir, 'readonly'));
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('an unreadable snapshot directory answers FAILED_PRECONDITION naming it', async () => {
    fs.chmodSync(dir, 0);
    try {
      expectAccessDenied(await callError(snaps, 'ListSnapshots', {}), dir);
    } finally {
      fs.chmodSync(dir, 0o700);
    }
  });
});
