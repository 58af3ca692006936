/**
 * Live migration (pre-copy) between two real vcpud processes over unix sockets, and one over TCP with
 * mTLS on 127.0.0.1. A running dirty64 guest moves while it writes its counter into a page range: on
 * the destination every page of the range holds exactly the value its counter (RBX) says (no write
 * lost or repeated) and the random memory around it is byte for byte the source's, also with the
 * destination's memory preallocated (vcpuctl migrate --preallocate). Each fault leaves
 * exactly one live copy: the source's, running, with nothing left on the destination (both ListVms
 * checked): the destination stopped (SIGSTOP) or killed mid-pass, the caller cancelling; a migration to
 * the source's own server is refused up front. Run control
 * and memory writes during the pre-copy are refused naming the migration; pausing is allowed.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { run } from '../../src/cli/vcpuctl';
import { decodeStatusDetails } from '../../src/api/status-details';
import { DIRTY64, dirty64Control, GUESTS, GUEST_ABI } from '../guests/guests';
import { dirtyGuest, expectIntact, FILL_FROM, RANGE_PAGES, RANGE_START, readMemory, untilLapped } from '../support/dirty-guest';
import { describeKvm } from '../support/kvm';
import { issueClients, localhostTarget, MIGRATOR, ORCHESTRATOR, startMigrationDestination, startMigrationSource } from '../support/mtls';
import { makePki, type Pki } from '../support/pki';
import { sample } from '../support/prom';
import { MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

/** Stall timeout given to both daemons: a stalled destination must give the VM back within it. */
const STALL = '2s';

const listVms = async (vms: Client) => (await call<{ vms: { id: string; vcpus: { runState: string }[] }[] }>(vms, 'ListVms', {})).vms;

/** RPCs GetVm started on a server, from its metrics. */
/** vcpud_incoming_migrations_total by result. */
function incomingResults(metrics: string): Record<string, number> {
  return Object.fromEntries(
    ['succeeded', 'failed', 'abandoned'].map((result) => [result, sample(metrics, 'vcpud_incoming_migrations_total', { result }) ?? NaN]),
  );
}

function delta(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  return Object.fromEntries(Object.keys(after).map((k) => [k, after[k] - before[k]]));
}

function getVmCalls(metrics: string): number {
  const line = metrics.split('\n').find((l) => l.startsWith('grpc_server_started_total{') && l.includes('grpc_method="GetVm"'));
  return line ? Number(line.split(' ').pop()) : 0;
}

async function expectRunningHere(vms: Client, id: string): Promise<void> {
  const vm = (await call<{ vm: { vcpus: { runState: string }[] } }>(vms, 'GetVm', { vmId: id })).vm;
  expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
}

describeKvm('live migration (pre-copy) between two vcpud processes (real KVM)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-live-'));
  let src: VcpudProcess;
  let dst: VcpudProcess;
  let srcVms: Client;
  let srcState: Client;
  let srcSnap: Client;
  let dstVms: Client;
  let dstState: Client;

  async function startDestination(): Promise<void> {
    dst = await startVcpud(['--migration-stall-timeout', STALL, '--snapshot-dir', path.join(dir, 'dst-snapshots')]);
    dstVms = dst.client('VmService');
    dstState = dst.client('VcpuStateService');
  }

  beforeAll(async () => {
    src = await startVcpud(['--migration-stall-timeout', STALL, '--snapshot-dir', path.join(dir, 'src-snapshots')]);
    srcVms = src.client('VmService');
    srcState = src.client('VcpuStateService');
    srcSnap = src.client('SnapshotService');
    await startDestination();
  });
  afterAll(async () => {
    await Promise.all([src?.stop(), dst?.stop()]);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  afterEach(async () => {
    // No test leaves a VM behind on either side.
    for (const vm of await listVms(srcVms)) await call(srcVms, 'DeleteVm', { vmId: vm.id });
    if (dst.proc.exitCode === null && dst.proc.signalCode === null) for (const vm of await listVms(dstVms)) await call(dstVms, 'DeleteVm', { vmId: vm.id });
  });

  it('a running dirty64 guest moves live: every page holds what its counter says, the random memory is intact, one copy is left', async () => {
    const memory = 64 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    await untilLapped(srcVms, guest.id, 4);
    const progress: Record<string, any>[] = [];
    let during: Promise<[string, string]> | undefined;
    const tornBefore = sample(await src.scrape(), 'vcpud_migration_torn_pages_total', {}) ?? NaN;
    const getVmCallsBefore = getVmCalls(await dst.scrape());
    const incomingBefore = incomingResults(await dst.scrape());
    const r = await runStream(srcSnap.MigrateVm({ vmId: guest.id, destination: dst.serving.api }), (m) => {
      if (m.progress?.migration) progress.push(m.progress.migration);
      // Under way: both sides count it, each in its direction.
      if (m.progress?.migration && progress.length === 1) during = Promise.all([src.scrape(), dst.scrape()]);
    });
    const [srcDuring, dstDuring] = await during!;
    expect(sample(srcDuring, 'vcpud_migrations_in_progress', { direction: 'outgoing' })).toBe(1);
    expect(sample(dstDuring, 'vcpud_migrations_in_progress', { direction: 'incoming' })).toBe(1);
    expect(r.error).toBeUndefined();
    // The destination described the VM in its COMMITTED message: the source did not ask for it again.
    expect(getVmCalls(await dst.scrape())).toBe(getVmCallsBefore);
    const done = r.messages.find((m) => m.done)?.done;
    expect(done.mode).toBe('MIGRATION_MODE_PRE_COPY');
    expect(done.passes).toBeGreaterThanOrEqual(2);
    expect(done.destinationVm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect(progress.some((p) => p.switchingOver)).toBe(true);
    expect(progress.some((p) => !p.switchingOver && Number(p.bytesSent) > 0)).toBe(true);
    const ms = (d: { seconds: string; nanos: number }) => Number(d.seconds) * 1000 + d.nanos / 1e6;
    // The phases before the switch-over are reported: with the downtime they make up the whole
    // migration (to the commit; deleting the source copy follows it).
    const phases = [done.setupPrepare, done.setupConnect, done.preCopy, done.deleteSource].map(ms);
    for (const p of phases) expect(p).toBeGreaterThan(0);
    expect(phases[0] + phases[1] + phases[2] + ms(done.downtime)).toBeCloseTo(ms(done.duration), 3);
    console.log(
      `live migration of a 64 MiB dirty64 guest over UDS: ${done.passes} passes, ${done.bytesSent} bytes, total ${ms(done.duration).toFixed(1)} ms ` +
        `(prepare ${phases[0].toFixed(1)}, connect ${phases[1].toFixed(1)}, pre-copy ${phases[2].toFixed(1)}, then deleting the source ${phases[3].toFixed(1)}), ` +
        `downtime ${ms(done.downtime).toFixed(1)} ms (last pass ${ms(done.downtimeLastPass).toFixed(1)}, state ${ms(done.downtimeState).toFixed(1)}, ` +
        `restore ${ms(done.downtimeRestore).toFixed(1)}, resume ${ms(done.downtimeResume).toFixed(1)})`,
    );
    // Exactly one copy: gone here, running there, and it keeps writing after the move.
    expect((await callError(srcVms, 'GetVm', { vmId: guest.id })).code).toBe(grpc.status.NOT_FOUND);
    expect(await listVms(srcVms)).toEqual([]);
    const moved = done.destinationVm.id;
    const at = (await readMemory(dstVms, moved, DIRTY64.control + DIRTY64.lastValue, 8)).readBigUInt64LE(0);
    await waitFor(
      async () => (await readMemory(dstVms, moved, DIRTY64.control + DIRTY64.lastValue, 8)).readBigUInt64LE(0) > at + 1000n,
      'dirty64 to go on writing there',
    );
    await expectIntact(dstVms, dstState, guest, moved, memory);
    const metrics = await src.scrape();
    expect(metrics).toMatch(/^vcpud_migrations_total\{result="succeeded"\} [1-9]/m);
    // Page copies the guest rewrote in flight: the report's note says how many, the counter adds them.
    const torn = Number((done.notes as string[]).join('\n').match(/(\d+) page copies changed in flight/)?.[1] ?? 0);
    expect(sample(metrics, 'vcpud_migration_torn_pages_total', {})! - tornBefore).toBe(torn);
    expect(sample(metrics, 'vcpud_migrations_in_progress', { direction: 'outgoing' })).toBe(0);
    // The destination counts what it committed; nothing is under way on either side any more.
    const dstMetrics = await dst.scrape();
    expect(delta(incomingBefore, incomingResults(dstMetrics))).toEqual({ succeeded: 1, failed: 0, abandoned: 0 });
    expect(sample(dstMetrics, 'vcpud_migrations_in_progress', { direction: 'incoming' })).toBe(0);
    expect(metrics).toMatch(/^vcpud_migration_downtime_seconds_count [1-9]/m);
    expect(metrics).toMatch(/^vcpud_migration_passes_sum [2-9]|^vcpud_migration_passes_sum \d\d/m);
    expect(metrics).toMatch(/^vcpud_migration_data_bytes_total [1-9]/m);
    // The gauge keeps the latest non-zero rate a pass measured. On a loaded host dirty64 may not get
    // the CPU to dirty a page during a short pass, so it follows what the progress reports said.
    const dirtied = progress.some((p) => Number(p.dirtyRateBytesPerSecond) > 0);
    expect(metrics).toMatch(dirtied ? /^vcpud_migration_dirty_rate_bytes [1-9]/m : /^vcpud_migration_dirty_rate_bytes 0$/m);
  });

  it('a migration to its own server is refused FAILED_PRECONDITION (MIGRATION_TO_SELF): the VM runs on here, no second copy', async () => {
    const memory = 32 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    const r = await runStream(srcSnap.MigrateVm({ vmId: guest.id, destination: src.serving.api }));
    expect(r.error?.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(decodeStatusDetails(r.error!.metadata)?.errorInfo?.reason).toBe('MIGRATION_TO_SELF');
    expect(r.error!.details).toMatch(/this same vcpud.*kept running here as it was/);
    expect((await listVms(srcVms)).map((v) => v.id)).toEqual([guest.id]);
    await expectRunningHere(srcVms, guest.id);
    // The refusal comes back at once: on a loaded host the guest may not have lapped its range yet.
    await untilLapped(srcVms, guest.id, 1);
    await expectIntact(srcVms, srcState, guest, guest.id, memory);
  });

  it('vcpuctl migrate --preallocate: the destination commits the memory before the copy; the guest moves live, no value lost or repeated', async () => {
    const memory = 64 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    await untilLapped(srcVms, guest.id, 4);
    let out = '';
    const io = { stdout: { write: (t: string | Uint8Array) => ((out += t.toString()), true) }, stderr: { write: () => true, isTTY: false }, cwd: dir };
    const code = await run(['--server', src.serving.api, '--json', 'migrate', guest.id, '--to', dst.serving.api, '--preallocate'], io as never);
    expect(code).toBe(0);
    const report = JSON.parse(out).migration;
    expect(report.mode).toBe('MIGRATION_MODE_PRE_COPY');
    console.log(
      `live migration of a 64 MiB dirty64 guest with --preallocate: prepare ${JSON.stringify(report.setupPrepare)}, total ${JSON.stringify(report.duration)}`,
    );
    expect(await listVms(srcVms)).toEqual([]);
    const moved = report.destinationVm.id as string;
    const at = (await readMemory(dstVms, moved, DIRTY64.control + DIRTY64.lastValue, 8)).readBigUInt64LE(0);
    await waitFor(
      async () => (await readMemory(dstVms, moved, DIRTY64.control + DIRTY64.lastValue, 8)).readBigUInt64LE(0) > at + 1000n,
      'dirty64 to go on writing there',
    );
    await expectIntact(dstVms, dstState, guest, moved, memory);
  });

  it('a slowly dirtying guest (pages written once, not again before the switch): nothing dirtied during the passes is lost', async () => {
    // dirty64 paced at 1 MiB/s over 256 pages writes each page once a second: a page written after
    // it was sent and before the last harvest of the pre-copy is not written again before the pause.
    const memory = 64 * MiB;
    const { vm } = await call<{ vm: { id: string } }>(srcVms, 'CreateVm', { memoryBytes: String(memory), vcpuCount: 1, name: 'slow' });
    await call(srcVms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.dirty64.file), loadAddress: String(GUEST_ABI.loadAddress) });
    const khz = (await call<{ state: { tscKhz: { khz: number } } }>(srcState, 'GetState', { vmId: vm.id, vcpuId: 0, sections: ['STATE_SECTION_TSC_KHZ'] }))
      .state.tscKhz.khz;
    const control = dirty64Control({ rangeStart: RANGE_START, rangePages: RANGE_PAGES, bytesPerSecond: MiB, tscKhz: khz });
    await call(srcVms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(DIRTY64.control), data: control });
    const hash = crypto.createHash('sha256');
    for (let gpa = FILL_FROM; gpa < memory; gpa += 16 * MiB) {
      const chunk = crypto.randomBytes(16 * MiB);
      hash.update(chunk);
      await call(srcVms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(gpa), data: chunk });
    }
    await call(srcVms, 'RunVm', { vmId: vm.id });
    await untilLapped(srcVms, vm.id, 2);
    // Pass 1 takes about a second at this bandwidth: many pages are written after they were sent.
    const r = await runStream(srcSnap.MigrateVm({ vmId: vm.id, destination: dst.serving.api, bandwidthBytesPerSecond: String(48 * MiB) }));
    expect(r.error).toBeUndefined();
    const done = r.messages.find((m) => m.done)?.done;
    await expectIntact(dstVms, dstState, { id: vm.id, fillHash: hash.digest('hex') }, done.destinationVm.id, memory);
  });

  it('a guest dirtying faster than the copy: throttled until it converges; with abort_on_no_progress it fails and runs on here', async () => {
    // Unpaced dirty64 over 16 MiB rewrites its whole range faster than 24 MiB/s can send it.
    const memory = 48 * MiB;
    const fast = await dirtyGuest(srcVms, memory, 4096);
    const refused = await runStream(
      srcSnap.MigrateVm({ vmId: fast.id, destination: dst.serving.api, bandwidthBytesPerSecond: String(24 * MiB), abortOnNoProgress: true }),
    );
    expect(refused.error?.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(refused.error!.details).toMatch(/pre-copy, pass \d+: no progress: .*abort_on_no_progress.*kept running here as it was/);
    await expectRunningHere(srcVms, fast.id);
    await waitFor(async () => (await listVms(dstVms)).length === 0, 'the destination to hold no VM');

    const throttles: number[] = [];
    // Convergence is what is tested, not its speed: on a loaded 2-core host the 10 s floor of the completion
    // deadline was reached at pass 16 while still converging, so this run allows 30 s (640 s/GiB of 48 MiB).
    const completionTimeoutPerGib = { seconds: 640 };
    const r = await runStream(
      srcSnap.MigrateVm({ vmId: fast.id, destination: dst.serving.api, bandwidthBytesPerSecond: String(24 * MiB), completionTimeoutPerGib }),
      (m) => {
        const p = m.progress?.migration;
        if (p) throttles.push(p.throttlePercent);
      },
    );
    expect(r.error).toBeUndefined();
    const done = r.messages.find((m) => m.done)?.done;
    console.log(
      `a guest dirtying faster than 24 MiB/s: ${done.passes} passes, throttle up to ${done.maxThrottlePercent}%, downtime ${Number(done.downtime.nanos) / 1e6} ms`,
    );
    expect(done.maxThrottlePercent).toBeGreaterThanOrEqual(20);
    expect(Math.max(...throttles)).toBe(done.maxThrottlePercent);
    // The throttle ends with the migration: the moved guest runs at full speed again.
    const moved = (await call<{ vm: { vcpus: Record<string, unknown>[] } }>(dstVms, 'GetVm', { vmId: done.destinationVm.id })).vm;
    expect(moved.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    await expectIntact(dstVms, dstState, fast, done.destinationVm.id, memory);
  });

  it('the destination stopped (SIGSTOP) mid-pass: the VM is back running here within the stall timeout, nothing is left there', async () => {
    const memory = 96 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    const incomingBefore = incomingResults(await dst.scrape());
    let stoppedAt = 0;
    const r = await runStream(srcSnap.MigrateVm({ vmId: guest.id, destination: dst.serving.api, bandwidthBytesPerSecond: String(32 * MiB) }), (m) => {
      if (!stoppedAt && Number(m.progress?.memoryBytesDone) > 8 * MiB) {
        stoppedAt = Date.now();
        dst.proc.kill('SIGSTOP');
      }
    });
    const failedAfterMs = Date.now() - stoppedAt;
    dst.proc.kill('SIGCONT');
    expect(stoppedAt).toBeGreaterThan(0);
    expect(r.error?.code).toBe(grpc.status.UNAVAILABLE);
    expect(decodeStatusDetails(r.error!.metadata)?.errorInfo?.reason).toBe('MIGRATION_FAILED');
    expect(r.error!.details).toMatch(/pre-copy, pass 1: .*made no progress for 2000 ms.*stalled.*kept running here as it was/);
    console.log(`SIGSTOP'd destination: MigrateVm failed ${failedAfterMs} ms after the stop (stall timeout ${STALL}); ${r.error!.details}`);
    await expectRunningHere(srcVms, guest.id);
    // The destination, woken up, finds its source gone and discards the incoming VM: abandoned, not failed here.
    await waitFor(async () => (await listVms(dstVms)).length === 0, 'the destination to hold no VM');
    await waitFor(async () => delta(incomingBefore, incomingResults(await dst.scrape())).abandoned === 1, 'the destination to count it abandoned');
    expect(delta(incomingBefore, incomingResults(await dst.scrape()))).toEqual({ succeeded: 0, failed: 0, abandoned: 1 });
    expect(sample(await dst.scrape(), 'vcpud_migrations_in_progress', { direction: 'incoming' })).toBe(0);
    await expectIntact(srcVms, srcState, guest, guest.id, memory);
  });

  it('the caller cancels mid-pass: nothing is left there; meanwhile writes and resume are refused naming the migration, pause is allowed', async () => {
    const memory = 96 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    const incomingBefore = incomingResults(await dst.scrape());
    const stream = srcSnap.MigrateVm({ vmId: guest.id, destination: dst.serving.api, bandwidthBytesPerSecond: String(32 * MiB) }) as grpc.ClientReadableStream<
      Record<string, any>
    >;
    let cancelled = false;
    const refusals: grpc.ServiceError[] = [];
    let during: Promise<void> | undefined;
    const r = await runStream(stream, (m) => {
      if (during || !(Number(m.progress?.memoryBytesDone) > 8 * MiB)) return;
      during = (async () => {
        refusals.push(await callError(srcVms, 'WriteMemory', { vmId: guest.id, guestPhysicalAddress: String(FILL_FROM), data: Buffer.alloc(8) }));
        await call(srcVms, 'PauseVm', { vmId: guest.id });
        refusals.push(await callError(srcVms, 'ResumeVm', { vmId: guest.id }));
      })().finally(() => {
        cancelled = true;
        stream.cancel();
      });
    });
    await during;
    expect(cancelled).toBe(true);
    expect(r.error?.code).toBe(grpc.status.CANCELLED);
    expect(refusals.map((e) => e.code)).toEqual([grpc.status.FAILED_PRECONDITION, grpc.status.FAILED_PRECONDITION]);
    for (const e of refusals) expect(e.details).toMatch(/pre-copy migration to unix:.* in progress/);
    await waitFor(async () => (await listVms(dstVms)).length === 0, 'the destination to hold no VM');
    // The source gave it up: the destination counts it abandoned, not failed here.
    await waitFor(async () => delta(incomingBefore, incomingResults(await dst.scrape())).abandoned === 1, 'the destination to count it abandoned');
    expect(delta(incomingBefore, incomingResults(await dst.scrape()))).toEqual({ succeeded: 0, failed: 0, abandoned: 1 });
    // The hold is gone: the VM stays as the caller left it (paused), and run control and writes work again.
    expect((await call<{ vm: { vcpus: { runState: string }[] } }>(srcVms, 'GetVm', { vmId: guest.id })).vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_PAUSED');
    // (The client sees CANCELLED at once; the server lets go of the VM a moment later.)
    await waitFor(
      () =>
        call(srcVms, 'ResumeVm', { vmId: guest.id }).then(
          () => true,
          () => false,
        ),
      'ResumeVm to work again',
    );
    await expectRunningHere(srcVms, guest.id);
    await expectIntact(srcVms, srcState, guest, guest.id, memory);
  });

  it('the destination killed mid-pass: the VM keeps running here, intact', async () => {
    const memory = 96 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    let killed = false;
    const r = await runStream(srcSnap.MigrateVm({ vmId: guest.id, destination: dst.serving.api, bandwidthBytesPerSecond: String(32 * MiB) }), (m) => {
      if (!killed && Number(m.progress?.memoryBytesDone) > 8 * MiB) {
        killed = true;
        dst.proc.kill('SIGKILL');
      }
    });
    expect(killed).toBe(true);
    expect(r.error?.code).toBe(grpc.status.UNAVAILABLE);
    expect(decodeStatusDetails(r.error!.metadata)?.errorInfo?.reason).toBe('MIGRATION_FAILED');
    expect(r.error!.details).toMatch(/pre-copy, pass 1: .*kept running here as it was/);
    await expectRunningHere(srcVms, guest.id);
    expect((await listVms(srcVms)).length).toBe(1);
    await expectIntact(srcVms, srcState, guest, guest.id, memory);
    await dst.stop();
    await startDestination();
  });

  it('vcpuctl migrate --json: a JSON line per progress message with the pass figures, the downtime parts in the report; a bar on a terminal', async () => {
    const ctl = async (args: string[], tty: boolean) => {
      let out = '';
      let err = '';
      const io = {
        stdout: { write: (t: string | Uint8Array) => ((out += t.toString()), true) },
        stderr: { write: (t: string | Uint8Array) => ((err += t.toString()), true), isTTY: tty },
        cwd: dir,
      };
      const code = await run(['--server', src.serving.api, ...args], io as never);
      return { code, out, err };
    };
    const memory = 48 * MiB;
    const guest = await dirtyGuest(srcVms, memory);
    const j = await ctl(
      ['--json', 'migrate', guest.id, '--to', dst.serving.api, '--mode', 'pre-copy', '--max-downtime', '200ms', '--bandwidth', '1GiB'],
      false,
    );
    expect(j.code).toBe(0);
    const lines = j.err
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { progress: { operation: string; migration?: Record<string, number | boolean> } });
    expect(lines.length).toBeGreaterThan(1);
    expect(lines.every((l) => l.progress.operation === 'migrate' && l.progress.migration)).toBe(true);
    expect(Object.keys(lines[0].progress.migration!)).toEqual(
      expect.arrayContaining([
        'pass',
        'bytesTotal',
        'bytesSent',
        'bytesRemaining',
        'dirtyRateBytesPerSecond',
        'transferRateBytesPerSecond',
        'expectedDowntimeMs',
        'throttlePercent',
        'switchingOver',
      ]),
    );
    const report = JSON.parse(j.out).migration;
    expect(report).toMatchObject({ mode: 'MIGRATION_MODE_PRE_COPY', passes: expect.any(Number) });
    for (const part of ['downtimeLastPass', 'downtimeState', 'downtimeRestore', 'downtimeResume']) expect(report[part]).toBeDefined();
    const moved = report.destinationVm.id as string;

    const back = await run(['--server', dst.serving.api, 'migrate', moved, '--to', src.serving.api, '--mode', 'stop-and-copy'], {
      stdout: { write: () => true },
      stderr: { write: () => true, isTTY: false },
      cwd: dir,
    } as never);
    expect(back).toBe(0);
    const [home] = await listVms(srcVms);
    const t = await ctl(['migrate', home.id, '--to', dst.serving.api], true);
    expect(t.code).toBe(0);
    expect(t.err).toMatch(/\rmigrate \[#+-*\] .* pass \d/);
    expect(t.out).toMatch(/downtime: last pass [\d.]+ ms, state [\d.]+ ms, restore [\d.]+ ms, resume [\d.]+ ms/);
    expect(t.out).toMatch(/before the switch: prepare [\d.]+ ms, connect [\d.]+ ms, pre-copy [\d.]+ ms; source deleted after it in [\d.]+ ms/);
    const bad = await ctl(['migrate', home.id, '--to', dst.serving.api, '--mode', 'sideways'], false);
    expect(bad.code).toBe(2);
    const [there] = await listVms(dstVms);
    await expectIntact(dstVms, dstState, guest, there.id, memory);
  });

  describe('over TCP with mTLS on 127.0.0.1', () => {
    let pki: Pki;
    let tlsDst: VcpudProcess;
    let tlsSrc: VcpudProcess;
    beforeAll(async () => {
      pki = makePki(path.join(dir, 'pki'));
      issueClients(pki, ORCHESTRATOR, MIGRATOR);
      tlsDst = await startMigrationDestination(pki, ['--migration-stall-timeout', STALL]);
      tlsSrc = await startMigrationSource(pki);
    });
    afterAll(async () => {
      await Promise.all([tlsSrc?.stop(), tlsDst?.stop()]);
    });

    it('a running dirty64 guest moves live over the mTLS data plane, intact', async () => {
      const memory = 64 * MiB;
      const vms = tlsSrc.client('VmService');
      const guest = await dirtyGuest(vms, memory);
      const target = localhostTarget(tlsDst);
      const r = await runStream(tlsSrc.client('SnapshotService').MigrateVm({ vmId: guest.id, destination: target }));
      expect(r.error).toBeUndefined();
      const done = r.messages.find((m) => m.done)?.done;
      expect(done.mode).toBe('MIGRATION_MODE_PRE_COPY');
      const remoteVms = tlsDst.client('VmService', pki.clientCreds(ORCHESTRATOR), target);
      const remoteState = tlsDst.client('VcpuStateService', pki.clientCreds(ORCHESTRATOR), target);
      expect(await listVms(vms)).toEqual([]);
      await expectIntact(remoteVms, remoteState, guest, done.destinationVm.id, memory);
      await call(remoteVms, 'DeleteVm', { vmId: done.destinationVm.id });
    });

    it('a data connection with a client certificate the allowlist refuses gets nothing', async () => {
      // The data endpoint applies the API's --allow-client rules: a migrating server whose certificate is
      // signed by the CA but not allowed is turned away at PrepareIncomingMigration already (the API), and
      // an endpoint reached directly without a certificate never completes the TLS handshake.
      issueClients(pki, 'stranger');
      const vms = tlsSrc.client('VmService');
      const guest = await dirtyGuest(vms, 40 * MiB);
      const target = localhostTarget(tlsDst);
      const tls = { caPem: pki.pem('ca.crt'), certPem: pki.pem('stranger.crt'), keyPem: pki.pem('stranger.key') };
      const r = await runStream(tlsSrc.client('SnapshotService').MigrateVm({ vmId: guest.id, destination: target, tls }));
      expect(r.error?.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(r.error!.details).toMatch(/PERMISSION_DENIED.*kept running here as it was/);
      await expectRunningHere(vms, guest.id);
      await call(vms, 'DeleteVm', { vmId: guest.id });
    });
  });
});
