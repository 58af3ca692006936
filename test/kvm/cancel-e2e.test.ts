/**
 * A client cancelling mid-stream (issue 9), against real vcpud processes on real KVM. For every
 * streaming RPC that holds something while it runs, the client cancels after the first message
 * (server streams) or after its first data messages (RestoreSnapshotStream), and then:
 * - the server released what it held: the VM it paused runs again and is not held (PauseVm/ResumeVm
 *   work), no fd is left open (nothing in /proc/PID/fd that was not there before, in the source and
 *   the migration destination), no VM or file was left half-made, and the vCPU mutex is free
 *   (GetState of every section and SetState answer within 5 s);
 * - the process is still up;
 * - grpc_server_handled_total counts the call once, as Canceled.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { describeKvm } from '../support/kvm';
import { expectFdsBack, fdBaseline, handledByCode, scrapeClosing } from '../support/proc-resources';
import { sample } from '../support/prom';
import { counterVm, MiB, waitFor, type Client } from '../support/snapshot';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type Obj = Record<string, any>;

/** Cancels `stream` when its first message (or the first `when` accepts) arrives; resolves with how it ended. */
function cancelAfterFirst(
  stream: grpc.ClientReadableStream<Obj>,
  when: (m: Obj) => boolean | Promise<boolean> = () => true,
): Promise<{ first?: Obj; error?: grpc.ServiceError; ended: boolean }> {
  return new Promise((resolve) => {
    let first: Obj | undefined;
    stream.on('data', async (m: Obj) => {
      if (first || !(await when(m)) || first) return;
      first = m;
      stream.cancel();
    });
    stream.on('error', (error: grpc.ServiceError) => resolve({ first, error, ended: false }));
    stream.on('end', () => resolve({ first, ended: true }));
  });
}

/** A unary call that must answer quickly: a vCPU mutex left locked would make it hang. */
function quick<T = Obj>(client: Client, method: string, req: object): Promise<T> {
  return new Promise((resolve, reject) =>
    client[method](req, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (e: grpc.ServiceError | null, r: T) =>
      e ? reject(new Error(`${method}: ${e.message}`)) : resolve(r),
    ),
  );
}

describeKvm('a client cancelling mid-stream (real vcpud processes)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-cancel-'));
  let a: VcpudProcess;
  let b: VcpudProcess;
  let aVms: Client;
  let aState: Client;
  let aSnap: Client;
  let bVms: Client;
  /** counter64 in 256 MiB, 254 MiB of it random: a snapshot or migration of it takes a while. */
  let big: string;

  beforeAll(async () => {
    [a, b] = await Promise.all([startVcpud(['--snapshot-dir', path.join(dir, 'a')]), startVcpud(['--snapshot-dir', path.join(dir, 'b')])]);
    aVms = a.client('VmService');
    aState = a.client('VcpuStateService');
    aSnap = a.client('SnapshotService');
    bVms = b.client('VmService');
    big = await counterVm(aVms, { memory: 256 * MiB, fill: true, name: 'big' });
    await call(aVms, 'RunVm', { vmId: big });
    // Every client connection the tests use is open before any fd baseline is taken.
    await Promise.all([call(aState, 'GetCapabilities', {}), call(aSnap, 'ListSnapshots', {}), call(bVms, 'ListVms', {})]);
  }, 120_000);
  afterAll(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Before a cancelled call: the fds of `procs` and the handled counts of `methods` (service/method). */
  async function before(methods: [VcpudProcess, string, string][]) {
    const fds = new Map([a, b].map((p) => [p, fdBaseline(p.proc.pid!)]));
    const counts = await Promise.all(methods.map(async ([p, svc, m]) => handledByCode(await scrapeClosing(p.serving.metrics), svc, m)));
    return { fds, methods, counts };
  }

  /**
   * After it: everything released, and each method counted `n` more calls, all Canceled, or (with
   * `orOk`) each either Canceled or OK: a cancel that crosses the server's final reply.
   */
  async function expectReleased(b0: Awaited<ReturnType<typeof before>>, what: string, n = 1, orOk = false) {
    for (const [p, base] of b0.fds) {
      expect(p.proc.exitCode).toBeNull();
      await expectFdsBack(p.proc.pid!, base, `${what}: fds of vcpud ${p === a ? 'A' : 'B'}`);
    }
    for (const [i, [p, svc, m]] of b0.methods.entries()) {
      const want = { ...b0.counts[i], Canceled: (b0.counts[i].Canceled ?? 0) + n };
      let got: Record<string, number> = {};
      await waitFor(
        async () => {
          got = handledByCode(await scrapeClosing(p.serving.metrics), svc, m);
          return Object.values(got).reduce((x, y) => x + y, 0) >= Object.values(want).reduce((x, y) => x + y, 0);
        },
        `${svc}/${m} to be counted`,
        10_000,
      ).catch(() => undefined);
      if (orOk) {
        const { Canceled: wantCancelled = 0, OK: wantOk = 0, ...rest } = b0.counts[i];
        const { Canceled: gotCancelled = 0, OK: gotOk = 0, ...gotRest } = got;
        expect({ method: m, ended: gotCancelled + gotOk, others: gotRest }).toEqual({ method: m, ended: wantCancelled + wantOk + n, others: rest });
      } else expect({ method: m, handled: got }).toEqual({ method: m, handled: want });
    }
    // The big VM runs again, is not held, and its vCPU mutex is free.
    await waitFor(
      async () => (await quick(aVms, 'GetVm', { vmId: big })).vm.vcpus[0].runState === 'VCPU_RUN_STATE_RUNNING',
      `${what}: the VM to run again`,
      10_000,
    );
    await quick(aVms, 'PauseVm', { vmId: big });
    const { state } = await quick(aState, 'GetState', { vmId: big, vcpuId: 0 });
    await quick(aState, 'SetState', { vmId: big, vcpuId: 0, state: { debugregs: state.debugregs } });
    await quick(aVms, 'ResumeVm', { vmId: big });
    expect(a.logs()).not.toMatch(/MaxListenersExceededWarning|unhandled|uncaught/i);
  }

  it('CreateSnapshot to a stream: the VM is resumed and released', async () => {
    const b0 = await before([[a, 'vcpud.v1.SnapshotService', 'CreateSnapshot']]);
    const r = await cancelAfterFirst(aSnap.CreateSnapshot({ vmId: big, stream: true }));
    expect({ ended: r.ended, code: r.error?.code, first: r.first?.progress?.phase }).toEqual({
      ended: false,
      code: grpc.status.CANCELLED,
      first: 'SNAPSHOT_PHASE_STATE',
    });
    await expectReleased(b0, 'CreateSnapshot (stream)');
  });

  it('CreateSnapshot to a file: the VM is resumed and released, no file and no temporary file is left', async () => {
    const b0 = await before([[a, 'vcpud.v1.SnapshotService', 'CreateSnapshot']]);
    const r = await cancelAfterFirst(aSnap.CreateSnapshot({ vmId: big, name: 'cancelled.snap' }));
    expect({ ended: r.ended, code: r.error?.code }).toEqual({ ended: false, code: grpc.status.CANCELLED });
    await expectReleased(b0, 'CreateSnapshot (file)');
    expect(fs.readdirSync(path.join(dir, 'a'))).toEqual([]);
  });

  it('MigrateVm: the VM is resumed here, the destination is left with no VM and nothing open', async () => {
    const b0 = await before([[a, 'vcpud.v1.SnapshotService', 'MigrateVm']]);
    // Cancelled with the first message after the destination prepared the incoming VM (a cancel
    // before that would leave the destination nothing to clean up).
    const started = async () => sample(await scrapeClosing(b.serving.metrics), 'grpc_server_started_total', { grpc_method: 'PrepareIncomingMigration' }) ?? 0;
    const started0 = await started();
    const r = await cancelAfterFirst(aSnap.MigrateVm({ vmId: big, destination: b.serving.api }), async () => (await started()) > started0);
    expect({ ended: r.ended, code: r.error?.code }).toEqual({ ended: false, code: grpc.status.CANCELLED });
    await expectReleased(b0, 'MigrateVm');
    expect((await quick(bVms, 'ListVms', {})).vms).toEqual([]);
    expect((await quick(aVms, 'GetVm', { vmId: big })).vm.id).toBe(big);
  });

  it('MigrateVm cancelled once the destination has the VM: it lives on there, nothing is rolled back or left open', async () => {
    // The source is past the point of no return when it reports RESUME (sent once the destination
    // committed). The destination is then stopped (SIGSTOP) for 300 ms: the source must neither hang
    // on it nor "roll back" by deleting the only copy. The source no longer asks the destination
    // anything after the commit, so the cancel may arrive before or after its final reply: the
    // server counts the call Canceled or OK, and the client sees CANCELLED either way.
    const mover = await counterVm(aVms, { name: 'mover' });
    await call(aVms, 'RunVm', { vmId: mover });
    const b0 = await before([[a, 'vcpud.v1.SnapshotService', 'MigrateVm']]);
    const r = await cancelAfterFirst(aSnap.MigrateVm({ vmId: mover, destination: b.serving.api }), async (m) => {
      if (m.progress?.phase !== 'SNAPSHOT_PHASE_RESUME') return false;
      b.proc.kill('SIGSTOP');
      setTimeout(() => b.proc.kill('SIGCONT'), 300);
      return true;
    });
    expect({ ended: r.ended, code: r.error?.code, phase: r.first?.progress?.phase }).toEqual({
      ended: false,
      code: grpc.status.CANCELLED,
      phase: 'SNAPSHOT_PHASE_RESUME',
    });
    await waitFor(async () => (await quick(aVms, 'ListVms', {})).vms.every((v: Obj) => v.id !== mover), 'the source copy to go', 10_000);
    const moved = (await quick(bVms, 'ListVms', {})).vms;
    expect(moved.map((v: Obj) => [v.name, v.vcpus[0].runState])).toEqual([['mover', 'VCPU_RUN_STATE_RUNNING']]);
    await quick(bVms, 'DeleteVm', { vmId: moved[0].id });
    await expectReleased(b0, 'MigrateVm (after the commit)', 1, true);
  });

  it('RestoreSnapshotStream cancelled after its first data: no VM is made, no fd stays open, counted Canceled not DataLoss', async () => {
    // A 32 MiB snapshot (30 MiB of it random) streamed out of A, then uploaded back in part.
    const src = await counterVm(aVms, { memory: 32 * MiB, fill: true, name: 'upload-src' });
    const data: Buffer[] = [];
    await new Promise<void>((resolve, reject) => {
      const s = aSnap.CreateSnapshot({ vmId: src, stream: true }) as grpc.ClientReadableStream<Obj>;
      s.on('data', (m: Obj) => m.data && data.push(m.data));
      s.on('error', reject);
      s.on('end', resolve);
    });
    await call(aVms, 'DeleteVm', { vmId: src });
    const bytes = Buffer.concat(data);
    expect(bytes.length).toBeGreaterThan(30 * MiB);
    const vmsBefore = (await quick(aVms, 'ListVms', {})).vms.length;

    const b0 = await before([[a, 'vcpud.v1.SnapshotService', 'RestoreSnapshotStream']]);
    const labels = { grpc_service: 'vcpud.v1.SnapshotService', grpc_method: 'RestoreSnapshotStream' };
    const received = async () => sample(await scrapeClosing(a.serving.metrics), 'grpc_server_msg_received_total', labels) ?? 0;
    const received0 = await received();
    let outcome: grpc.ServiceError | Obj | undefined;
    const up = aSnap.RestoreSnapshotStream((e: grpc.ServiceError | null, res: Obj) => (outcome = e ?? res)) as grpc.ClientWritableStream<Obj>;
    up.write({ options: { vmName: 'never' } });
    for (let off = 0; off < 4 * MiB; off += MiB) up.write({ data: bytes.subarray(off, off + MiB) });
    // Cancelled once the server has read the header and the first memory: the restore is under way.
    await waitFor(async () => (await received()) >= received0 + 5, 'the server to receive the first messages');
    up.cancel();
    await waitFor(() => outcome !== undefined, 'the upload to end');
    expect((outcome as grpc.ServiceError).code).toBe(grpc.status.CANCELLED);
    await expectReleased(b0, 'RestoreSnapshotStream');
    expect((await quick(aVms, 'ListVms', {})).vms).toHaveLength(vmsBefore);

    // The same bytes uploaded whole restore fine afterwards.
    const ok = await new Promise<Obj>((resolve, reject) => {
      const w = aSnap.RestoreSnapshotStream((e: grpc.ServiceError | null, res: Obj) => (e ? reject(e) : resolve(res))) as grpc.ClientWritableStream<Obj>;
      w.write({ options: { vmName: 'whole' } });
      for (let off = 0; off < bytes.length; off += MiB) w.write({ data: bytes.subarray(off, off + MiB) });
      w.end();
    });
    expect(ok.vm.name).toBe('whole');
    await call(aVms, 'DeleteVm', { vmId: ok.vm.id });
  });

  it('StreamConsole, 20 times: no listener or fd left behind', async () => {
    const b0 = await before([[a, 'vcpud.v1.VmService', 'StreamConsole']]);
    for (let i = 0; i < 20; i++) {
      const r = await cancelAfterFirst(aVms.StreamConsole({ vmId: big, fromStart: true }));
      expect({ ended: r.ended, code: r.error?.code, first: r.first?.event }).toEqual({ ended: false, code: grpc.status.CANCELLED, first: 'output' });
    }
    // (a listener left on the VM per call would also make Node warn past 10: checked in expectReleased)
    await expectReleased(b0, 'StreamConsole', 20);
  });

  it('ReadMemory of the whole 256 MiB: the handler stops and the next read answers', async () => {
    const b0 = await before([[a, 'vcpud.v1.VmService', 'ReadMemory']]);
    const r = await cancelAfterFirst(aVms.ReadMemory({ vmId: big, guestPhysicalAddress: '0', length: String(256 * MiB) }));
    expect({ ended: r.ended, code: r.error?.code, first: r.first?.data?.length }).toEqual({ ended: false, code: grpc.status.CANCELLED, first: MiB });
    await expectReleased(b0, 'ReadMemory');
    const next = await new Promise<Obj[]>((resolve, reject) => {
      const out: Obj[] = [];
      const s = aVms.ReadMemory({ vmId: big, guestPhysicalAddress: '4096', length: '16' }) as grpc.ClientReadableStream<Obj>;
      s.on('data', (m: Obj) => out.push(m));
      s.on('error', reject);
      s.on('end', () => resolve(out));
    });
    expect(next.map((m) => m.data.length)).toEqual([16]);
  });
});
