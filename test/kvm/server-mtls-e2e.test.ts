/**
 * The real vcpud process serving mTLS on TCP: an allowlisted client certificate works end to end
 * on real KVM, an unlisted one gets PERMISSION_DENIED, no certificate fails the handshake, and the
 * plaintext health-only port answers probes.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { describeKvm } from '../support/kvm';
import { issueClients, localhostTarget, mtlsServeArgs, ORCHESTRATOR } from '../support/mtls';
import { makePki, type Pki } from '../support/pki';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

describeKvm('vcpud over mTLS TCP (real process, real KVM)', () => {
  let pki: Pki;
  let d: VcpudProcess;
  let target: string;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-mtls-'));

  beforeAll(async () => {
    pki = makePki(dir);
    issueClients(pki, ORCHESTRATOR, 'intruder');
    d = await startVcpud([...mtlsServeArgs(pki, [ORCHESTRATOR]), '--health-listen', '127.0.0.1:0']);
    target = localhostTarget(d);
  });
  afterAll(async () => {
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('an allowlisted client runs a VM and reads its state', async () => {
    const vms = d.client('VmService', pki.clientCreds('orchestrator'), target);
    const state = d.client('VcpuStateService', pki.clientCreds('orchestrator'), target);
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    const r = await call<{ state: { regs: { rip: string } } }>(state, 'GetState', { vmId: vm.id, vcpuId: 0, sections: ['STATE_SECTION_REGS'] });
    expect(r.state.regs.rip).toBe('65520'); // the reset vector's 0xfff0
    await call(vms, 'DeleteVm', { vmId: vm.id });
  });

  it('a valid certificate not on the allowlist gets PERMISSION_DENIED', async () => {
    const err = await callError(d.client('VcpuStateService', pki.clientCreds('intruder'), target), 'GetCapabilities', {});
    expect(err.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(err.details).toMatch(/intruder/);
  });

  it('no client certificate: the handshake fails', async () => {
    const err = await callError(d.client('VcpuStateService', pki.clientCreds(), target), 'GetCapabilities', {});
    expect(err.code).toBe(grpc.status.UNAVAILABLE);
  });

  it('plaintext TCP is not served', async () => {
    const err = await callError(d.client('VcpuStateService', grpc.credentials.createInsecure(), target), 'GetCapabilities', {});
    expect(err.code).toBe(grpc.status.UNAVAILABLE);
  });

  it('the plaintext health-only port answers Kubernetes probes', async () => {
    const h = d.health(d.serving.health);
    expect(await call<{ status: string }>(h, 'Check', { service: '' })).toEqual({ status: 'SERVING' });
  });
});
