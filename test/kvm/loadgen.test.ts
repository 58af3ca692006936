/**
 * The load generator (bench/loadgen.ts) and the h2load recipe (scripts/h2load.sh) against a real
 * vcpud: every GetState call OK, the client's count equal to the server's grpc_server_handled_total
 * delta, the histogram accounting for every call; over the Unix socket and over mTLS TCP. A wrong
 * VM id shows that a failure is counted on both sides, and that the h2load cross-check catches
 * HTTP 200 responses carrying a gRPC error.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pausedCounterVm } from '../../bench/floors';
import { GET_STATE_PATH, getStateRequest, loadOk, runLoad, type LoadResult } from '../../bench/loadgen';
import { describeKvm } from '../support/kvm';
import { issueClients, localhostTarget, mtlsServeArgs, ORCHESTRATOR } from '../support/mtls';
import { makePki, type Pki } from '../support/pki';
import { fdTargets } from '../support/proc-resources';
import { startVcpud, type VcpudProcess } from '../support/vcpud-process';

const ROOT = path.resolve(__dirname, '..', '..');
const NO_SUCH_VM = '00000000-0000-0000-0000-000000000000';

const sockets = (pid: number) => [...fdTargets(pid).values()].filter((t) => t.startsWith('socket:')).length;

/** The invariants of a clean run: all OK, the server agrees, the histogram holds every call. */
function expectClean(r: LoadResult): void {
  expect(r.errors).toEqual([]);
  expect(r.calls).toBeGreaterThan(0);
  expect(r.codes).toEqual({ OK: r.calls });
  expect(r.server).toEqual({ codes: { OK: r.calls }, calls: r.calls, match: true });
  expect(r.latencyMs.histogram.reduce((a, b) => a + b.count, 0)).toBe(r.calls);
  const l = r.latencyMs;
  expect(0 < l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max).toBe(true);
  expect(r.responseBytes / r.calls).toBeGreaterThan(1000); // every section, xsave alone is KiBs
  expect(loadOk(r)).toBe(true);
}

describeKvm('load generator and h2load recipe against a real vcpud', () => {
  describe('Unix socket', () => {
    let d: VcpudProcess;
    let vmId: string;
    beforeAll(async () => {
      d = await startVcpud();
      vmId = (await pausedCounterVm(d.client('VmService'))).id;
    });
    afterAll(() => d.stop());

    it('4 clients x 4 in flight for 2 s: separate connections, all OK, counts agree', async () => {
      const pid = d.proc.pid!;
      const before = sockets(pid);
      let connected = 0;
      const r = await runLoad({
        target: d.serving.api,
        vmId,
        clients: 4,
        inFlight: 4,
        durationSeconds: 2,
        metricsUrl: d.serving.metrics,
        onConnected: () => void (connected = sockets(pid)),
      });
      expect(connected - before).toBeGreaterThanOrEqual(4); // one HTTP/2 connection per client
      expectClean(r);
      expect(r.clients * r.inFlight).toBe(16);
    });

    it('a fixed count makes exactly that many calls', async () => {
      const r = await runLoad({ target: d.serving.api, vmId, sections: ['regs', 'sregs'], clients: 3, inFlight: 2, count: 101, metricsUrl: d.serving.metrics });
      expect(r.calls).toBe(101);
      expect(r.server).toEqual({ codes: { OK: 101 }, calls: 101, match: true });
    });

    it('raw mode: failures are counted by code on both sides and fail the run', async () => {
      const request = getStateRequest(NO_SUCH_VM);
      const r = await runLoad({ target: d.serving.api, method: GET_STATE_PATH, request, clients: 2, count: 20, metricsUrl: d.serving.metrics });
      expect(r.codes).toEqual({ NotFound: 20 });
      expect(r.server).toEqual({ codes: { NotFound: 20 }, calls: 20, match: true });
      expect(loadOk(r)).toBe(false);
    });
  });

  describe('mTLS over TCP', () => {
    let pki: Pki;
    let d: VcpudProcess;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-loadgen-'));
    beforeAll(async () => {
      pki = makePki(dir);
      issueClients(pki, ORCHESTRATOR);
      d = await startVcpud(mtlsServeArgs(pki, [ORCHESTRATOR]));
    });
    afterAll(async () => {
      await d.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('4 clients x 4 in flight for 2 s: all OK, counts agree', async () => {
      const target = localhostTarget(d);
      const vm = await pausedCounterVm(d.client('VmService', pki.clientCreds('orchestrator'), target));
      const r = await runLoad({
        target,
        ca: pki.file('ca.crt'),
        cert: pki.file('orchestrator.crt'),
        key: pki.file('orchestrator.key'),
        vmId: vm.id,
        clients: 4,
        inFlight: 4,
        durationSeconds: 2,
        metricsUrl: d.serving.metrics,
      });
      expectClean(r);
    });
  });

  describe('scripts/h2load.sh (provisions h2load, starts its own vcpud on loopback)', () => {
    const h2load = (...args: string[]) => spawnSync('bash', ['scripts/h2load.sh', ...args], { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });

    it('200 GetState requests: h2load and the server agree', () => {
      const r = h2load('-n', '200', '-c', '4', '-m', '2');
      expect(r.stderr + r.stdout).toMatch(/requests: 200 total, 200 started, 200 done, 200 succeeded/);
      expect(r.stdout).toMatch(/^cross-check: agree \(h2load succeeded 200 = server OK 200, 200 handled\)$/m);
      expect(r.status).toBe(0);
    });

    it('HTTP 200 with a gRPC error: h2load counts successes, the cross-check says MISMATCH', () => {
      const r = h2load('-n', '50', '-c', '2', '--vm', NO_SUCH_VM);
      expect(r.stdout).toMatch(/requests: 50 total, 50 started, 50 done, 50 succeeded/);
      expect(r.stdout).toMatch(/NotFound 50/);
      expect(r.stdout).toMatch(/^cross-check: MISMATCH/m);
      expect(r.status).toBe(1);
    });
  });
});
