/**
 * A real vcpud against connections that never do anything:
 * - descriptor exhaustion: idle connections take every descriptor its limit allows, and calls on a
 *   connection opened before still get answers (RESOURCE_EXHAUSTED naming EMFILE for a call that needs
 *   a descriptor, the usual status for the others) instead of vcpud exiting; once the idle connections
 *   close, new connections and VMs work again;
 * - the connection cap of each listener (API, health, metrics) refuses connections over it at accept
 *   and counts them, and connections that never finish a TLS handshake (API) or never send a request
 *   (health, metrics) are closed after --handshake-timeout, after which a real client gets through.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { PROBE_MAX_CONNECTIONS } from '../../src/server/server';
import { describeKvm } from '../support/kvm';
import { issueClients, mtlsServeArgs, ORCHESTRATOR } from '../support/mtls';
import { makePki, type Pki } from '../support/pki';
import { fdCount, rssBytes } from '../support/proc-resources';
import { sample } from '../support/prom';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const FD_LIMIT = 64;

/** Polls `cond` every 50 ms (running `refresh` before each look) for up to `ms`; false when it never held. */
async function until(cond: () => boolean, ms: number, refresh?: () => Promise<unknown>): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    await refresh?.();
    if (cond()) return true;
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
}

const closed = (s: net.Socket) => s.destroyed || s.closed;

/** Opens `n` connections that never send a byte; resolves once each is connected or failed. */
function openIdle(connect: () => net.Socket, n: number): Promise<net.Socket[]> {
  return Promise.all(
    Array.from(
      { length: n },
      () =>
        new Promise<net.Socket>((resolve) => {
          const s = connect();
          s.on('error', () => {}); // a connection vcpud refuses or resets is expected here
          s.resume(); // reads (and drops) what vcpud sends, so its closing is seen
          s.once('connect', () => resolve(s));
          s.once('close', () => resolve(s));
        }),
    ),
  );
}

const alive = (d: VcpudProcess) => d.proc.exitCode === null && d.proc.signalCode === null;

describeKvm('descriptor exhaustion (real vcpud under a low RLIMIT_NOFILE)', () => {
  let d: VcpudProcess;
  let idle: net.Socket[] = [];

  beforeAll(async () => {
    d = await startVcpud([], {}, [], { launcher: ['prlimit', `--nofile=${FD_LIMIT}:${FD_LIMIT}`, '--'] });
  });
  afterAll(async () => {
    for (const s of idle) s.destroy();
    await d.stop();
  });

  it('answers calls while idle connections hold every descriptor, and recovers when they close', async () => {
    const socketPath = d.serving.api.replace(/^unix:/, '');
    const vms = d.client('VmService');
    await call(vms, 'ListVms', {}); // this connection exists before the descriptors run out
    const pid = d.proc.pid as number;
    const before = fdCount(pid);

    const started = Date.now();
    idle = await openIdle(() => net.connect({ path: socketPath }), 2 * FD_LIMIT); // bounded: twice the limit
    expect(await until(() => fdCount(pid) >= FD_LIMIT, 5000)).toBe(true);
    const exhaustedMs = Date.now() - started;
    await until(() => false, 300); // lets vcpud close what it cannot accept
    const closedAtAccept = idle.filter(closed).length;

    // An error that needs nothing from the host: the error path itself must not need a descriptor.
    const t0 = Date.now();
    const notFound = await callError(vms, 'GetVm', { vmId: 'no-such-vm' });
    const notFoundMs = Date.now() - t0;
    expect(alive(d)).toBe(true);
    expect(notFound.code).toBe(grpc.status.NOT_FOUND);
    expect(decodeStatusDetails(notFound.metadata)?.errorInfo?.reason).toBe('VM_NOT_FOUND');

    // A call that needs a descriptor (KVM_CREATE_VM returns one): RESOURCE_EXHAUSTED naming EMFILE.
    const t1 = Date.now();
    const exhausted = await callError(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    const exhaustedCallMs = Date.now() - t1;
    expect(alive(d)).toBe(true);
    expect(exhausted.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(exhausted.details).toMatch(/EMFILE/);
    expect(decodeStatusDetails(exhausted.metadata)?.errorInfo).toMatchObject({ reason: 'HOST_RESOURCES_EXHAUSTED', metadata: { errno: 'EMFILE' } });

    for (const s of idle) s.destroy();
    idle = [];
    expect(await until(() => fdCount(pid) <= before + 2, 5000)).toBe(true);
    const fresh = d.client('VmService');
    const { vm } = await call<{ vm: { id: string } }>(fresh, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    await call(fresh, 'DeleteVm', { vmId: vm.id });
    expect(alive(d)).toBe(true);
    console.log(
      `descriptor exhaustion: RLIMIT_NOFILE ${FD_LIMIT}, ${before} fds before, all taken by idle connections in ${exhaustedMs} ms; ` +
        `${closedAtAccept} of ${2 * FD_LIMIT} closed unaccepted; GetVm answered NOT_FOUND in ${notFoundMs} ms, CreateVm RESOURCE_EXHAUSTED (EMFILE) in ${exhaustedCallMs} ms; recovered`,
    );
  });
});

describeKvm('connection cap and handshake timeout (real vcpud, mTLS)', () => {
  const HANDSHAKE_MS = 1000;
  const MAX = 8;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-conn-'));
  let pki: Pki;
  let d: VcpudProcess;
  let idle: net.Socket[] = [];
  const port = (address: string) => Number(address.split(':').pop());

  beforeAll(async () => {
    pki = makePki(dir);
    issueClients(pki, ORCHESTRATOR);
    d = await startVcpud([
      ...mtlsServeArgs(pki),
      '--health-listen',
      '127.0.0.1:0',
      '--max-connections',
      String(MAX),
      '--handshake-timeout',
      `${HANDSHAKE_MS}ms`,
    ]);
  });
  afterAll(async () => {
    for (const s of idle) s.destroy();
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Fills a listener with idle connections, checks one more is refused, then times how long vcpud keeps the idle ones. */
  async function fillAndWait(listener: string, address: string, max: number) {
    const connect = () => net.connect({ host: '127.0.0.1', port: port(address) });
    const opened = Date.now();
    idle = await openIdle(connect, max);
    // (a scrape of the full metrics listener would itself be refused: it is checked after)
    if (listener !== 'metrics')
      expect(
        await until(
          () => sample(scraped, 'vcpud_connections_open', { listener }) === max,
          5000,
          async () => (scraped = await d.scrape()),
        ),
      ).toBe(true);
    const [extra] = await openIdle(connect, 1);
    expect(await until(() => closed(extra), 5000)).toBe(true); // refused at accept: closed at once
    expect(idle.some(closed)).toBe(false);
    // vcpud closes the idle ones itself (bounded wait: 15 x the timeout; Node's own default would be 120 s)
    expect(await until(() => idle.every(closed), 15 * HANDSHAKE_MS)).toBe(true);
    const heldMs = Date.now() - opened;
    idle = [];
    scraped = await d.scrape();
    expect(sample(scraped, 'vcpud_connections_refused_total', { listener })).toBeGreaterThanOrEqual(1);
    expect(sample(scraped, 'vcpud_connection_limit', { listener })).toBe(max);
    return heldMs;
  }
  let scraped = '';

  it('API: connections over --max-connections are refused at accept; ones without a TLS handshake close after --handshake-timeout', async () => {
    const heldMs = await fillAndWait('api', d.serving.api, MAX);
    const vms = d.client('VmService', pki.clientCreds('orchestrator'), `localhost:${port(d.serving.api)}`);
    await call(vms, 'ListVms', {});
    console.log(
      `API: ${MAX} idle TCP connections (no TLS handshake) closed by vcpud after ${heldMs} ms (--handshake-timeout ${HANDSHAKE_MS} ms); connection ${MAX + 1} refused at accept`,
    );
  });

  it('API: a client trickling its ClientHello (a byte every 200 ms) is closed at the handshake deadline, not kept alive by its bytes', async () => {
    const opened = Date.now();
    const s = net.connect({ host: '127.0.0.1', port: port(d.serving.api) });
    s.on('error', () => {});
    s.resume();
    s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00])); // a TLS handshake record announcing 512 bytes
    const trickle = setInterval(() => s.writable && s.write(Buffer.from([0x01])), 200);
    try {
      expect(await until(() => closed(s), 15 * HANDSHAKE_MS)).toBe(true);
    } finally {
      clearInterval(trickle);
      s.destroy();
    }
    console.log(`API: a trickled ClientHello closed after ${Date.now() - opened} ms (--handshake-timeout ${HANDSHAKE_MS} ms)`);
  });

  it(`health: over ${PROBE_MAX_CONNECTIONS} connections refused; idle ones closed after --handshake-timeout; probes then work`, async () => {
    const heldMs = await fillAndWait('health', d.serving.health, PROBE_MAX_CONNECTIONS);
    const res = await call<{ status: string }>(d.health(d.serving.health), 'Check', { service: '' });
    expect(res.status).toBe('SERVING');
    console.log(`health: ${PROBE_MAX_CONNECTIONS} idle connections closed by vcpud after ${heldMs} ms`);
  });

  it(`metrics: over ${PROBE_MAX_CONNECTIONS} connections refused; idle ones closed; scrapes then work`, async () => {
    const heldMs = await fillAndWait('metrics', d.serving.metrics, PROBE_MAX_CONNECTIONS);
    console.log(`metrics: ${PROBE_MAX_CONNECTIONS} idle connections closed by vcpud after ${heldMs} ms`);
  });
});

describeKvm('connection defaults under a flood of idle TLS connections (real vcpud, mTLS)', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-conn-defaults-'));
  let d: VcpudProcess;
  let idle: net.Socket[] = [];
  const FLOOD = 300;
  const DEFAULT_MAX = 256;

  beforeAll(async () => {
    const pki = makePki(dir);
    d = await startVcpud(mtlsServeArgs(pki));
  });
  afterAll(async () => {
    for (const s of idle) s.destroy();
    await d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it(`${FLOOD} idle connections: ${DEFAULT_MAX} held, the rest refused at accept, all closed after the default 10 s handshake timeout`, async () => {
    const pid = d.proc.pid as number;
    const fdsBefore = fdCount(pid);
    const rssBefore = rssBytes(pid);
    const apiPort = Number(d.serving.api.split(':').pop());
    const opened = Date.now();
    idle = await openIdle(() => net.connect({ host: '127.0.0.1', port: apiPort }), FLOOD);
    expect(await until(() => idle.filter(closed).length >= FLOOD - DEFAULT_MAX, 5000)).toBe(true);
    const fdsPeak = fdCount(pid);
    const rssPeak = rssBytes(pid);
    expect(fdsPeak - fdsBefore).toBeLessThanOrEqual(DEFAULT_MAX);
    // bounded wait: 30 s for a 10 s deadline (before the fix: Node's 120 s)
    expect(await until(() => idle.every(closed), 30_000)).toBe(true);
    const heldMs = Date.now() - opened;
    const metrics = await d.scrape();
    expect(sample(metrics, 'vcpud_connections_refused_total', { listener: 'api' })).toBe(FLOOD - DEFAULT_MAX);
    expect(await until(() => fdCount(pid) <= fdsBefore + 1, 5000)).toBe(true);
    console.log(
      `defaults: ${FLOOD} idle TCP connections to the mTLS port: ${FLOOD - DEFAULT_MAX} refused at accept, ${DEFAULT_MAX} held for ${heldMs} ms ` +
        `(fds ${fdsBefore} -> ${fdsPeak}, RSS ${(rssBefore / 2 ** 20).toFixed(0)} -> ${(rssPeak / 2 ** 20).toFixed(0)} MiB), then all closed by vcpud`,
    );
  });
});
