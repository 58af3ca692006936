/**
 * Transport: the unix socket (mode, directory, stale socket removal, refusals), plaintext TCP only with
 * --insecure on loopback, and mTLS with a client allowlist, using certificates made by openssl.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { makePki, type Pki } from '../support/pki';
import * as protoLoader from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { ConfigError, loadConfig, type Config } from '../../src/server/config';
import { Health } from '../../src/server/health';
import { authorizeClient, certificateIdentities } from '../../src/server/interceptors';
import { silentLogger } from '../../src/server/logging';
import { Metrics } from '../../src/server/metrics';
import { createVcpudServer, type RunningServer } from '../../src/server/server';
import { ConnectionGate } from '../../src/server/connections';
import { bindServer, prepareUnixSocketPath, serverOptions, tcpCredentials } from '../../src/server/transport';

const ECHO_PROTO = `
syntax = "proto3";
package vcpudtest;
message EchoRequest { string text = 1; }
message EchoResponse { string text = 1; }
service Echo { rpc Say(EchoRequest) returns (EchoResponse); }
`;

type Unary = (
  req: object,
  md: grpc.Metadata,
  opts: grpc.CallOptions,
  cb: (e: grpc.ServiceError | null, r?: { text?: string; status?: string }) => void,
) => void;
type EchoClient = grpc.Client & { Say: Unary };
type HealthClient = grpc.Client & { Check: Unary };

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-transport-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const echoFile = path.join(dir, 'echo.proto');
fs.writeFileSync(echoFile, ECHO_PROTO);
const echoDefinition = protoLoader.loadSync(echoFile);
const EchoCtor = (grpc.loadPackageDefinition(echoDefinition).vcpudtest as grpc.GrpcObject).Echo as grpc.ServiceClientConstructor;
const HealthCtor = ((grpc.loadPackageDefinition(protoLoader.loadSync(healthProtoPath, { enums: String })).grpc as grpc.GrpcObject).health as grpc.GrpcObject)
  .v1 as grpc.GrpcObject;

const echo = {
  packageDefinition: echoDefinition,
  register(server: grpc.Server) {
    server.addService(EchoCtor.service, {
      Say: (call: grpc.ServerUnaryCall<{ text: string }, unknown>, cb: grpc.sendUnaryData<unknown>) => cb(null, { text: call.request.text }),
    });
  },
};

const running: RunningServer[] = [];
const clients: grpc.Client[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const r of running.splice(0)) await r.shutdown(100);
});

async function start(config: Config, health = new Health()): Promise<RunningServer> {
  const r = await createVcpudServer(config, { logger: silentLogger(), metrics: new Metrics({ defaultMetrics: false }), health, services: [echo] });
  running.push(r);
  return r;
}

function call(client: grpc.Client & { Say?: Unary; Check?: Unary }, method: 'Say' | 'Check', req: object = {}) {
  return new Promise<{ err: grpc.ServiceError | null; res?: { text?: string; status?: string } }>((resolve) =>
    (client[method] as Unary)(req, new grpc.Metadata(), { deadline: Date.now() + 5000 }, (err, res) => resolve({ err, res })),
  );
}

function echoClient(target: string, creds = grpc.credentials.createInsecure(), options: grpc.ChannelOptions = {}): EchoClient {
  const c = new EchoCtor(target, creds, options) as unknown as EchoClient;
  clients.push(c);
  return c;
}

function healthClient(target: string, creds = grpc.credentials.createInsecure(), options: grpc.ChannelOptions = {}): HealthClient {
  const c = new (HealthCtor.Health as grpc.ServiceClientConstructor)(target, creds, options) as unknown as HealthClient;
  clients.push(c);
  return c;
}

describe('unix socket', () => {
  test('created with mode 0600 in a new 0700 directory, serves, and is removed on shutdown', async () => {
    const sock = path.join(dir, 'fresh', 'sub', 'vcpud.sock');
    const r = await start(loadConfig(['--listen', `unix:${sock}`, '--metrics-listen', ''], {}, dir));
    expect(r.addresses.api).toEqual({ kind: 'unix', path: sock, address: `unix:${sock}` });
    expect(fs.statSync(sock).isSocket()).toBe(true);
    expect(fs.statSync(sock).mode & 0o777).toBe(0o600);
    expect(fs.statSync(path.dirname(sock)).mode & 0o777).toBe(0o700);
    expect((await call(echoClient(r.addresses.api.address), 'Say', { text: 'hi' })).res?.text).toBe('hi');
    await r.shutdown(100);
    expect(fs.existsSync(sock)).toBe(false);
  });

  test('socketMode 0660 gives the group access, through the directory too', async () => {
    const sock = path.join(dir, 'group', 'vcpud.sock');
    await start(loadConfig(['--listen', `unix:${sock}`, '--metrics-listen', '', '--socket-mode', '0660'], {}, dir));
    expect(fs.statSync(sock).mode & 0o777).toBe(0o660);
    expect(fs.statSync(path.dirname(sock)).mode & 0o777).toBe(0o710);
  });

  test('a stale socket left by a killed server is removed and replaced', async () => {
    const sock = path.join(dir, 'stale.sock');
    // A server killed with SIGKILL leaves its socket file behind with nobody accepting on it.
    const child = spawn(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(sock)}, () => console.log('up'))`]);
    await new Promise<void>((resolve) => child.stdout.once('data', () => resolve()));
    child.kill('SIGKILL');
    await new Promise((resolve) => child.once('exit', resolve));
    expect(fs.lstatSync(sock).isSocket()).toBe(true);

    const r = await start(loadConfig(['--listen', `unix:${sock}`, '--metrics-listen', ''], {}, dir));
    expect((await call(echoClient(r.addresses.api.address), 'Say', { text: 'again' })).res?.text).toBe('again');
  });

  test('refuses a socket directory another user owns (it could swap the socket)', async () => {
    const foreign = path.join(dir, 'foreign');
    fs.mkdirSync(foreign);
    const uid = process.getuid!();
    if (uid === 0) fs.chownSync(foreign, 4242, 4242);
    const sock = path.join(foreign, 'vcpud.sock');
    // as root the directory now belongs to uid 4242; as anyone else a root-owned one is fine, so only check as root
    if (uid === 0)
      await expect(prepareUnixSocketPath(sock, 0o600)).rejects.toThrow(`the socket directory ${foreign} belongs to uid 4242, not to this user (uid 0) or root`);
    else await expect(prepareUnixSocketPath(sock, 0o600)).resolves.toBeUndefined();
  });

  test('refuses to delete a regular file, or a socket someone listens on', async () => {
    const file = path.join(dir, 'not-a-socket');
    fs.writeFileSync(file, 'precious');
    await expect(prepareUnixSocketPath(file, 0o600)).rejects.toThrow(`${file} exists and is not a socket; refusing to delete it`);
    expect(fs.readFileSync(file, 'utf8')).toBe('precious');

    const sock = path.join(dir, 'live.sock');
    const live = net.createServer();
    await new Promise<void>((r) => live.listen(sock, r));
    try {
      const server = new grpc.Server();
      const config = loadConfig(['--listen', `unix:${sock}`], {}, dir);
      await expect(bindServer(server, config, new ConnectionGate('api', 1))).rejects.toThrow(`${sock} is in use: another server is listening on it`);
      server.forceShutdown();
    } finally {
      await new Promise((r) => live.close(r));
    }
  });
});

describe('plaintext TCP', () => {
  test('refused without TLS unless --insecure on loopback', async () => {
    expect(() => loadConfig(['--listen', '127.0.0.1:0'], {}, dir)).toThrow(ConfigError);
    expect(() => loadConfig(['--listen', '0.0.0.0:0', '--insecure'], {}, dir)).toThrow(/--insecure is only allowed on a loopback address/);
    // Defense in depth: the transport refuses too, whatever config object it is handed.
    expect(() => tcpCredentials({ insecure: false, handshakeTimeoutMs: 1000 }, '127.0.0.1')).toThrow(
      'TCP requires --tls-cert/--tls-key (or --insecure on a loopback address)',
    );
    expect(() => tcpCredentials({ insecure: true, handshakeTimeoutMs: 1000 }, '0.0.0.0')).toThrow(/TCP requires/);

    const r = await start(loadConfig(['--listen', '127.0.0.1:0', '--insecure', '--metrics-listen', ''], {}, dir));
    const api = r.addresses.api;
    expect(api.kind === 'tcp' && api.port > 0 && api.address === `127.0.0.1:${api.port}`).toBe(true);
    expect((await call(echoClient(api.address), 'Say', { text: 'tcp' })).res?.text).toBe('tcp');
  });

  test('server options: message limits, streams, keepalive', () => {
    const c = loadConfig(['--max-message-bytes', '1Mi', '--max-concurrent-streams', '4'], {}, dir);
    expect(serverOptions(c)).toMatchObject({
      'grpc.max_receive_message_length': 1024 ** 2,
      'grpc.max_send_message_length': 1024 ** 2,
      'grpc.max_concurrent_streams': 4,
      'grpc.keepalive_time_ms': 60000,
      'grpc.keepalive_timeout_ms': 20000,
    });
  });

  test('a message over max-message-bytes is refused with RESOURCE_EXHAUSTED', async () => {
    const r = await start(loadConfig(['--listen', '127.0.0.1:0', '--insecure', '--metrics-listen', '', '--max-message-bytes', '1Ki'], {}, dir));
    const { err } = await call(echoClient(r.addresses.api.address), 'Say', { text: 'x'.repeat(4096) });
    expect(err?.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
  });
});

describe('mTLS', () => {
  const pkiDir = path.join(dir, 'pki');

  let pki: Pki;
  const f = (name: string) => pki.file(name);

  beforeAll(() => {
    pki = makePki(pkiDir);
    pki.issue('allowed', '/CN=orchestrator', 'extendedKeyUsage=clientAuth\n');
    pki.issue('spiffe', '/CN=some-workload', 'subjectAltName=URI:spiffe://cluster.local/ns/kube-system/sa/orchestrator\nextendedKeyUsage=clientAuth\n');
    pki.issue('other', '/CN=intruder', 'subjectAltName=URI:spiffe://cluster.local/ns/default/sa/intruder\nextendedKeyUsage=clientAuth\n');
  });

  const clientCreds = (name?: string) => pki.clientCreds(name);

  async function startMtls(extra: string[] = []) {
    const config = loadConfig(
      [
        '--listen',
        '127.0.0.1:0',
        '--metrics-listen',
        '',
        '--tls-cert',
        f('server.crt'),
        '--tls-key',
        f('server.key'),
        '--tls-ca',
        f('ca.crt'),
        '--allow-client',
        'orchestrator',
        '--allow-client',
        'spiffe://cluster.local/ns/kube-system/sa/orchestrator',
        ...extra,
      ],
      {},
      dir,
    );
    const health = new Health();
    const r = await start(config, health);
    health.setServing();
    const port = (r.addresses.api as { port: number }).port;
    return { r, target: `localhost:${port}` };
  }

  test('an allowed client (by CN, or by SAN URI) passes', async () => {
    const { target } = await startMtls();
    expect((await call(echoClient(target, clientCreds('allowed')), 'Say', { text: 'by CN' })).res?.text).toBe('by CN');
    expect((await call(echoClient(target, clientCreds('spiffe')), 'Say', { text: 'by URI' })).res?.text).toBe('by URI');
  });

  test('a client signed by the CA but not on the allowlist gets PERMISSION_DENIED; health stays open to it', async () => {
    const { target } = await startMtls();
    const { err } = await call(echoClient(target, clientCreds('other')), 'Say', { text: 'let me in' });
    expect(err?.code).toBe(grpc.status.PERMISSION_DENIED);
    expect(err?.details).toBe('client certificate CN=intruder (URI spiffe://cluster.local/ns/default/sa/intruder) is not allowed');
    const health = await call(healthClient(target, clientCreds('other')), 'Check', { service: '' });
    expect(health.err).toBeNull();
    expect(health.res?.status).toBe('SERVING');
  });

  test('a client without a certificate fails the TLS handshake', async () => {
    const { target } = await startMtls();
    const { err } = await call(echoClient(target, clientCreds()), 'Say', { text: 'anonymous' });
    expect(err?.code).toBe(grpc.status.UNAVAILABLE);
    expect(err?.details).not.toMatch(/permission/i);
  });

  test('without an allowlist any client the CA signed passes; TLS without a CA needs no client certificate', async () => {
    const base = ['--listen', '127.0.0.1:0', '--metrics-listen', '', '--tls-cert', f('server.crt'), '--tls-key', f('server.key')];
    const mtls = await start(loadConfig([...base, '--tls-ca', f('ca.crt')], {}, dir));
    const mtlsTarget = `localhost:${(mtls.addresses.api as { port: number }).port}`;
    expect((await call(echoClient(mtlsTarget, clientCreds('other')), 'Say', { text: 'ok' })).res?.text).toBe('ok');

    const tls = await start(loadConfig(base, {}, dir));
    const tlsTarget = `localhost:${(tls.addresses.api as { port: number }).port}`;
    expect((await call(echoClient(tlsTarget, clientCreds()), 'Say', { text: 'server-only TLS' })).res?.text).toBe('server-only TLS');
    // And plaintext does not get through a TLS port.
    expect((await call(echoClient(tlsTarget), 'Say', { text: 'plain' })).err?.code).toBe(grpc.status.UNAVAILABLE);
  });

  test('identities: subject CNs and SAN URIs (quoted entries included)', () => {
    const cert = { subject: { CN: 'a' }, subjectaltname: 'DNS:x.example, URI:spiffe://t/a, IP Address:127.0.0.1, URI:"urn:with,comma"' };
    expect(certificateIdentities(cert as never)).toEqual({ cns: ['a'], uris: ['spiffe://t/a', 'urn:with,comma'] });
    expect(authorizeClient({}, new Set(['a']))).toBe('a client certificate is required');
    expect(authorizeClient({ sslPeerCertificate: cert as never }, new Set(['urn:with,comma']))).toBeNull();
    expect(authorizeClient({ sslPeerCertificate: { subject: {} } as never }, new Set(['a']))).toBe('client certificate without CN is not allowed');
  });
});
