/**
 * MigrateVm between two real vcpud processes, the destination serving mTLS on TCP with a client
 * allowlist: counter64 moves mid-run and its console continues with no value repeated or skipped;
 * the source copy is gone. The destination killed mid-migration: the source VM resumes and keeps
 * counting. The source killed mid-migration: the destination keeps nothing of it. A destination that refuses the migrating server's certificate: the VM stays here.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import { issueClients, localhostTarget, ORCHESTRATOR, MIGRATOR, startMigrationDestination, startMigrationSource } from '../support/mtls';
import { makePki, type Pki } from '../support/pki';
import { consoleCollector, counterLines, counterVm, firstBreak, MiB, runStream, waitFor, type Client } from '../support/snapshot';
import { expectFdsBack, fdBaseline } from '../support/proc-resources';
import { call, callError, type VcpudProcess } from '../support/vcpud-process';

describeKvm('MigrateVm between two vcpud processes over mTLS (real KVM)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-migrate-'));
  let pki: Pki;
  let src: VcpudProcess;
  let dst: VcpudProcess;
  let srcVms: Client;
  let srcSnap: Client;
  let dstVms: Client;
  let dstTarget: string;

  async function startDestination(): Promise<void> {
    dst = await startMigrationDestination(pki, ['--snapshot-dir', path.join(dir, 'dst-snapshots')]);
    dstTarget = localhostTarget(dst);
    dstVms = dst.client('VmService', pki.clientCreds(ORCHESTRATOR), dstTarget);
  }

  beforeAll(async () => {
    pki = makePki(path.join(dir, 'pki'));
    issueClients(pki, ORCHESTRATOR, MIGRATOR, 'stranger');
    // The source dials destinations with its configured migration credentials.
    src = await startMigrationSource(pki, ['--snapshot-dir', path.join(dir, 'src-snapshots')]);
    srcVms = src.client('VmService');
    srcSnap = src.client('SnapshotService');
    await startDestination();
  });
  afterAll(async () => {
    await Promise.all([src?.stop(), dst?.stop()]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('counter64 moves mid-run: the console continues with no value repeated or skipped; the source copy is gone', async () => {
    const id = await counterVm(srcVms, { name: 'mover' });
    const before = consoleCollector(srcVms, id);
    await call(srcVms, 'RunVm', { vmId: id });
    await waitFor(() => counterLines(before.text()).length >= 300, '300 lines at the source');

    const phases: string[] = [];
    const r = await runStream(srcSnap.MigrateVm({ vmId: id, destination: dstTarget }), (m) => m.progress && phases.push(m.progress.phase));
    expect(r.error).toBeUndefined();
    const done = r.messages.find((m) => m.done)?.done;
    expect(done.destinationVm).toMatchObject({ name: 'mover' });
    expect(done.destinationVm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect(Number(done.bytesSent)).toBeGreaterThan(0);
    expect(phases).toEqual(expect.arrayContaining(['SNAPSHOT_PHASE_STATE', 'SNAPSHOT_PHASE_MEMORY', 'SNAPSHOT_PHASE_RESUME']));
    await waitFor(() => before.ended(), 'the source console stream to end with its VM');
    expect((await callError(srcVms, 'GetVm', { vmId: id })).code).toBe(grpc.status.NOT_FOUND);

    const after = consoleCollector(dstVms, done.destinationVm.id);
    await waitFor(() => counterLines(after.text()).length >= 500, '500 lines at the destination');
    after.stop();
    const values = counterLines(before.text() + after.text());
    expect(values[0]).toBe(1);
    expect(firstBreak(values)).toBeUndefined();
    await call(dstVms, 'DeleteVm', { vmId: done.destinationVm.id });
  });

  it('a destination that does not allow the client certificate: FAILED_PRECONDITION, the VM keeps running here', async () => {
    const id = await counterVm(srcVms);
    await call(srcVms, 'RunVm', { vmId: id });
    const tls = { caPem: pki.pem('ca.crt'), certPem: pki.pem('stranger.crt'), keyPem: pki.pem('stranger.key') };
    const r = await runStream(srcSnap.MigrateVm({ vmId: id, destination: dstTarget, tls }));
    expect(r.error?.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(decodeStatusDetails(r.error!.metadata)?.errorInfo?.reason).toBe('MIGRATION_FAILED');
    expect(r.error!.details).toMatch(/PERMISSION_DENIED.*here as it was/);
    const vm = (await call<{ vm: Record<string, any> }>(srcVms, 'GetVm', { vmId: id })).vm;
    expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    expect((await call<{ vms: unknown[] }>(dstVms, 'ListVms', {})).vms).toEqual([]);
    await call(srcVms, 'DeleteVm', { vmId: id });
  });

  it('the source killed mid-migration: the destination is left with no VM and no fd it did not have', async () => {
    // A source of its own: this one is killed.
    const doomed = await startMigrationSource(pki, ['--snapshot-dir', path.join(dir, 'doomed-snapshots')]);
    const doomedVms = doomed.client('VmService');
    const id = await counterVm(doomedVms, { memory: 256 * MiB, fill: true });
    await call(doomedVms, 'RunVm', { vmId: id });
    const before = fdBaseline(dst.proc.pid!);
    const vmsBefore = (await call<{ vms: unknown[] }>(dstVms, 'ListVms', {})).vms.length;
    let killed = false;
    const r = await runStream(doomed.client('SnapshotService').MigrateVm({ vmId: id, destination: dstTarget }), (m) => {
      if (!killed && m.progress?.phase === 'SNAPSHOT_PHASE_MEMORY' && Number(m.progress.memoryBytesDone) > 16 * MiB) {
        killed = true;
        doomed.proc.kill('SIGKILL');
      }
    });
    expect(killed).toBe(true);
    expect(r.error).toBeDefined();
    await doomed.stop();
    // The destination drops the half-received VM: nothing restored, nothing held open.
    await expectFdsBack(dst.proc.pid!, before, 'the destination after its source died');
    expect((await call<{ vms: unknown[] }>(dstVms, 'ListVms', {})).vms.length).toBe(vmsBefore);
    expect(dst.proc.exitCode).toBeNull();
  });

  it('the destination killed mid-migration: the source VM resumes and keeps counting', async () => {
    const id = await counterVm(srcVms, { memory: 256 * MiB, fill: true });
    const c = consoleCollector(srcVms, id);
    await call(srcVms, 'RunVm', { vmId: id });
    await waitFor(() => counterLines(c.text()).length >= 100, '100 lines at the source');

    let killed = false;
    const r = await runStream(srcSnap.MigrateVm({ vmId: id, destination: dstTarget }), (m) => {
      if (!killed && m.progress?.phase === 'SNAPSHOT_PHASE_MEMORY' && Number(m.progress.memoryBytesDone) > 16 * MiB) {
        killed = true;
        dst.proc.kill('SIGKILL');
      }
    });
    expect(killed).toBe(true);
    expect(r.error).toBeDefined();
    expect(r.error!.code).toBe(grpc.status.UNAVAILABLE);
    expect(decodeStatusDetails(r.error!.metadata)?.errorInfo?.reason).toBe('MIGRATION_FAILED');
    expect(r.error!.details).toMatch(/(resumed|running) here as it was/);

    const vm = (await call<{ vm: Record<string, any> }>(srcVms, 'GetVm', { vmId: id })).vm;
    expect(vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    const at = counterLines(c.text()).length;
    await waitFor(() => counterLines(c.text()).length >= at + 500, 'the source to keep counting');
    c.stop();
    const values = counterLines(c.text());
    expect(values[0]).toBe(1);
    expect(firstBreak(values)).toBeUndefined();
    await call(srcVms, 'DeleteVm', { vmId: id });
    await dst.stop();
    await startDestination();
  });
});
