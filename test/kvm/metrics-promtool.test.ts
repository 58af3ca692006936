/**
 * /metrics passes Prometheus's own linter: `promtool check metrics` (from Debian's prometheus package,
 * provisioned by scripts/test.sh through scripts/provision-tools.sh promtool) on a real vcpud after
 * traffic of every kind (calls that succeed and fail, a running guest, health checks). The alerting
 * rules the chart ships (helm/vcpud/files/alerts.yaml) pass `promtool check rules` and their unit
 * tests (alerts.promtool-test.yaml: each alert fires on its series and not on its neighbours), and
 * every metric they name is one a real vcpud exposes. Skips loudly without promtool; fails instead
 * under VCPUD_REQUIRE_KVM=1, as CI runs it.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { parse } from 'yaml';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const MiB = 1024 * 1024;
const ALERTS = path.join(__dirname, '../../helm/vcpud/files/alerts.yaml');
const ALERT_TESTS = path.join(__dirname, 'alerts.promtool-test.yaml');
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

  promtoolTest("the chart's alerting rules: promtool check rules, their unit tests, and only metrics vcpud exposes", async () => {
    expect(promtoolMissing).toBeUndefined();
    const rules = (parse(fs.readFileSync(ALERTS, 'utf8')) as { groups: { rules: { alert: string; expr: string }[] }[] }).groups.flatMap((g) => g.rules);
    const check = spawnSync('promtool', ['check', 'rules', ALERTS], { encoding: 'utf8', timeout: 60_000 });
    expect({ status: check.status, output: check.stdout + check.stderr }).toMatchObject({
      status: 0,
      output: expect.stringContaining(`SUCCESS: ${rules.length} rules found`),
    });
    // Run from the test file's folder: its rule_files path is relative to it.
    const unit = spawnSync('promtool', ['test', 'rules', path.basename(ALERT_TESTS)], { cwd: path.dirname(ALERT_TESTS), encoding: 'utf8', timeout: 60_000 });
    expect({ status: unit.status, output: unit.stdout + unit.stderr }).toMatchObject({ status: 0, output: expect.stringContaining('SUCCESS') });
    // Every alert has a unit test.
    const tested = fs.readFileSync(ALERT_TESTS, 'utf8');
    for (const r of rules) expect({ alert: r.alert, tested: tested.includes(`alertname: ${r.alert}`) }).toEqual({ alert: r.alert, tested: true });
    // A rule naming a metric vcpud does not expose would never fire.
    const exposed = new Set([...(await d.scrape()).matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1]));
    const named = new Set(rules.flatMap((r) => [...r.expr.matchAll(/\b(vcpud_[a-z_]+|process_[a-z_]+)\b/g)].map((m) => m[1])));
    expect(named.size).toBeGreaterThan(0);
    for (const name of named) expect({ name, exposed: exposed.has(name) }).toEqual({ name, exposed: true });
  });
});
