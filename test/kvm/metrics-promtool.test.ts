/**
 * /metrics passes Prometheus's own linter: `promtool check metrics` (from Debian's prometheus package,
 * provisioned by scripts/test.sh through scripts/provision-tools.sh promtool) on a real vcpud after
 * traffic of every kind (calls that succeed and fail, a running guest, health checks). Skips loudly
 * without promtool; fails instead under VCPUD_REQUIRE_KVM=1, as CI runs it.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const MiB = 1024 * 1024;
const promtoolMissing = spawnSync('promtool', ['--version'], { encoding: 'utf8' }).error;
const required = process.env.VCPUD_REQUIRE_KVM === '1';
const promtoolTest = promtoolMissing && !required ? test.skip : test;
if (promtoolMissing && !required)
  console.warn(`\n*** SKIPPING promtool check metrics: promtool is not on PATH (bash scripts/provision-tools.sh promtool) ***\n`);

describeKvm('/metrics passes promtool check metrics (real vcpud)', () => {
  let d: VcpudProcess;
  beforeAll(async () => {
    d = await startVcpud();
  });
  afterAll(async () => {
    await d?.stop();
  });

  promtoolTest('exit 0 and nothing to say, after traffic', async () => {
    expect(promtoolMissing).toBeUndefined(); // VCPUD_REQUIRE_KVM=1 without promtool fails here
    const vms = d.client('VmService');
    const state = d.client('VcpuStateService');
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 1, name: 'promtool' });
    await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: String(GUEST_ABI.loadAddress) });
    await call(vms, 'RunVm', { vmId: vm.id });
    await call(state, 'GetState', { vmId: vm.id, vcpuId: 0 });
    await callError(state, 'GetState', { vmId: 'no-such-vm', vcpuId: 0 });
    await call(state, 'GetCapabilities', {});
    await call(d.health(), 'Check', { service: '' });
    await call(vms, 'DeleteVm', { vmId: vm.id });

    const text = await d.scrape();
    expect(text).toMatch(/grpc_server_handled_total\{[^}]*grpc_method="GetState",grpc_code="NotFound"} 1\n/); // the traffic is in it
    const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8', timeout: 60_000 });
    expect({ status: r.status, output: r.stdout + r.stderr }).toEqual({ status: 0, output: '' });
  });
});
