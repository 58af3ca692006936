/**
 * A real server from createVcpudServer on a unix socket in a temp dir: health transitions (through
 * shutdown), the plaintext health-only listener, reflection, request ids and request logs. The only
 * application service is a test-only one from an inline .proto (plus vcpud's own VmService without
 * handlers, to check the real protos load and reflect).
 */
import fs from 'node:fs';
import http2 from 'node:http2';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { loadConfig, type Config } from '../../src/server/config';
import { Health } from '../../src/server/health';
import { REQUEST_ID_HEADER } from '../../src/server/interceptors';
import { createLogger, type LogFields } from '../../src/server/logging';
import { Metrics } from '../../src/server/metrics';
import { packageRoot } from '../../src/package';
import { protoFiles, SERVICE_NAMES, vcpudPackageDefinition, vcpudProto } from '../../src/api/proto';
import { vcpudServiceDefinitions } from '../../src/server/service-definitions';
import { createVcpudServer, type RunningServer, type ServiceRegistrar } from '../../src/server/server';

const ECHO_PROTO = `
syntax = "proto3";
package vcpudtest;
message EchoRequest { string text = 1; int32 fail_code = 2; }
message EchoResponse { string text = 1; }
service Echo { rpc Say(EchoRequest) returns (EchoResponse); }
`;

type Unary = (
  req: object,
  md: grpc.Metadata,
  opts: grpc.CallOptions,
  cb: (e: grpc.ServiceError | null, r?: Record<string, unknown>) => void,
) => grpc.ClientUnaryCall;

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-lifecycle-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const echoFile = path.join(dir, 'echo.proto');
fs.writeFileSync(echoFile, ECHO_PROTO);
const echoDefinition = protoLoader.loadSync(echoFile, { defaults: true });
const EchoCtor = (grpc.loadPackageDefinition(echoDefinition).vcpudtest as grpc.GrpcObject).Echo as grpc.ServiceClientConstructor;
const echo: ServiceRegistrar = {
  packageDefinition: echoDefinition,
  register(server) {
    server.addService(EchoCtor.service, {
      Say: (call: grpc.ServerUnaryCall<{ text: string; failCode: number }, unknown>, cb: grpc.sendUnaryData<unknown>) =>
        call.request.failCode ? cb({ code: call.request.failCode, details: 'asked to fail' }) : cb(null, { text: call.request.text }),
    });
  },
};
/** vcpud's VmService with no handlers: grpc-js answers UNIMPLEMENTED; enough to exercise the real protos. */
const bareVmService: ServiceRegistrar = {
  register(server) {
    server.addService(vcpudServiceDefinitions().VmService, {});
  },
};

const HealthCtor = (
  ((grpc.loadPackageDefinition(protoLoader.loadSync(healthProtoPath, { enums: String })).grpc as grpc.GrpcObject).health as grpc.GrpcObject)
    .v1 as grpc.GrpcObject
).Health as grpc.ServiceClientConstructor;
const reflectionDir = path.join(path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');
const ReflectionCtor = (
  (
    (
      grpc.loadPackageDefinition(protoLoader.loadSync('grpc/reflection/v1/reflection.proto', { includeDirs: [reflectionDir], keepCase: true }))
        .grpc as grpc.GrpcObject
    ).reflection as grpc.GrpcObject
  ).v1 as grpc.GrpcObject
).ServerReflection as grpc.ServiceClientConstructor;

interface Setup {
  running: RunningServer;
  health: Health;
  logs: LogFields[];
  config: Config;
}

const clients: grpc.Client[] = [];
const servers: RunningServer[] = [];
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.shutdown(100);
});

async function setup(extraFlags: string[] = [], logLevel = 'debug'): Promise<Setup> {
  const sock = path.join(dir, `s${servers.length}-${Date.now()}.sock`);
  const config = loadConfig(['--listen', `unix:${sock}`, '--metrics-listen', '', '--log-level', logLevel, ...extraFlags], {}, dir);
  const logs: LogFields[] = [];
  const logger = createLogger({ level: config.logLevel, sink: (line) => logs.push(JSON.parse(line) as LogFields) });
  const health = new Health({ logger });
  const running = await createVcpudServer(config, { logger, metrics: new Metrics({ defaultMetrics: false }), health, services: [echo, bareVmService] });
  servers.push(running);
  return { running, health, logs, config };
}

function client<T extends grpc.Client>(Ctor: grpc.ServiceClientConstructor, target: string): T & Record<string, Unary> {
  const c = new Ctor(target, grpc.credentials.createInsecure()) as T & Record<string, Unary>;
  clients.push(c);
  return c;
}

function unary(c: Record<string, Unary>, method: string, req: object, md = new grpc.Metadata()) {
  return new Promise<{ err: grpc.ServiceError | null; res?: Record<string, unknown>; headers?: grpc.Metadata; trailers?: grpc.Metadata }>((resolve) => {
    let headers: grpc.Metadata | undefined;
    let err: grpc.ServiceError | null = null;
    let res: Record<string, unknown> | undefined;
    // The callback runs before 'status' (which carries the trailers): resolve on the latter.
    const call = c[method](req, md, { deadline: Date.now() + 5000 }, (e, r) => {
      err = e;
      res = r;
    });
    call.on('metadata', (m: grpc.Metadata) => (headers = m));
    call.on('status', (status: grpc.StatusObject) => resolve({ err, res, headers, trailers: status.metadata }));
  });
}

const check = async (target: string, service: string) => {
  const { err, res } = await unary(client(HealthCtor, target), 'Check', { service });
  return err ? grpc.status[err.code] : (res?.status as string);
};

describe('proto loading', () => {
  test('every proto under protos/, both services, typed grpc object', () => {
    expect(protoFiles()).toEqual(expect.arrayContaining(['google/rpc/status.proto', 'vcpud/v1/state.proto', 'vcpud/v1/vm.proto']));
    const def = vcpudPackageDefinition();
    expect(def[SERVICE_NAMES.VcpuStateService]).toBeDefined();
    expect(def[SERVICE_NAMES.VmService]).toBeDefined();
    expect(def['google.rpc.Status']).toBeDefined();
    expect(vcpudPackageDefinition()).toBe(def); // loaded once
    expect(vcpudServiceDefinitions().VmService.CreateVm.path).toBe('/vcpud.v1.VmService/CreateVm');
    expect(vcpudServiceDefinitions().VcpuStateService.GetState.path).toBe('/vcpud.v1.VcpuStateService/GetState');
    // proto-loader's own methods, but for the request deserializer (src/server/undecodable-request.ts)
    const loaded = vcpudProto().vcpud.v1.VmService.service;
    const served = vcpudServiceDefinitions().VmService;
    expect(Object.keys(served)).toEqual(Object.keys(loaded));
    for (const [name, m] of Object.entries(loaded)) {
      const { requestDeserialize, ...rest } = served[name as keyof typeof served];
      expect({ name, ...rest }).toEqual({ name, ...m, requestDeserialize: undefined });
      expect(requestDeserialize).not.toBe(m.requestDeserialize);
    }
    expect(vcpudServiceDefinitions()).toBe(vcpudServiceDefinitions()); // made once
  });

  test('the package root is found from src/ and from a dist/ layout alike', () => {
    const root = path.resolve(__dirname, '..', '..');
    expect(packageRoot()).toBe(root);
    const fake = path.join(dir, 'pkg');
    fs.mkdirSync(path.join(fake, 'dist', 'src', 'server'), { recursive: true });
    fs.writeFileSync(path.join(fake, 'package.json'), '{}');
    expect(packageRoot(path.join(fake, 'dist', 'src', 'server'))).toBe(fake);
  });
});

describe('health', () => {
  test('NOT_SERVING until told, SERVING, then NOT_SERVING first thing on shutdown (seen by a Watch)', async () => {
    const { running, health } = await setup();
    const target = running.addresses.api.address;
    expect(await check(target, '')).toBe('NOT_SERVING');
    expect(await check(target, SERVICE_NAMES.VmService)).toBe('NOT_SERVING');
    expect(await check(target, 'no.such.Service')).toBe('NOT_FOUND');

    const watcher = client<grpc.Client>(HealthCtor, target);
    const seen: string[] = [];
    const watch = (watcher as unknown as { Watch(req: object): grpc.ClientReadableStream<{ status: string }> }).Watch({ service: '' });
    watch.on('data', (m) => seen.push(m.status));
    const ended = new Promise<void>((resolve) => {
      watch.on('error', () => resolve());
      watch.on('end', () => resolve());
    });
    await new Promise((resolve) => watch.once('data', resolve)); // the Watch is open and reported its first status

    health.setServing();
    expect(await check(target, '')).toBe('SERVING');
    expect(await check(target, SERVICE_NAMES.VcpuStateService)).toBe('SERVING');
    expect(await check(target, SERVICE_NAMES.VmService)).toBe('SERVING');

    health.setNotServing('no /dev/kvm');
    expect(await check(target, '')).toBe('NOT_SERVING');
    expect(await check(target, SERVICE_NAMES.VmService)).toBe('NOT_SERVING');
    expect(health.reason()).toBe('no /dev/kvm');
    health.setServing([SERVICE_NAMES.VmService]);
    expect(await check(target, SERVICE_NAMES.VmService)).toBe('SERVING');
    expect(await check(target, SERVICE_NAMES.VcpuStateService)).toBe('NOT_SERVING');
    expect(health.reason()).toBeUndefined();

    await running.shutdown(200); // the open Watch holds tryShutdown until the grace ends
    await ended;
    expect(seen).toEqual(['NOT_SERVING', 'SERVING', 'NOT_SERVING', 'SERVING', 'NOT_SERVING']);
    expect(health.status('')).toBe('NOT_SERVING');
    expect(fs.existsSync(running.addresses.api.kind === 'unix' ? running.addresses.api.path : '')).toBe(false);
  });

  test('the plaintext health-only listener shares the status and serves nothing else', async () => {
    const { running, health } = await setup(['--health-listen', '127.0.0.1:0']);
    const hc = running.addresses.health;
    expect(hc?.kind).toBe('tcp');
    const target = hc?.address as string;
    expect(target).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(await check(target, '')).toBe('NOT_SERVING');
    health.setServing();
    expect(await check(target, '')).toBe('SERVING');
    const { err } = await unary(client(EchoCtor, target), 'Say', { text: 'x' });
    expect(err?.code).toBe(grpc.status.UNIMPLEMENTED);
    await running.shutdown(100);
    expect((await unary(client(HealthCtor, target), 'Check', { service: '' })).err?.code).toBe(grpc.status.UNAVAILABLE);
  });
});

describe('reflection', () => {
  function reflect(target: string, request: object): Promise<Record<string, unknown>> {
    const c = client<grpc.Client>(ReflectionCtor, target) as unknown as { ServerReflectionInfo(): grpc.ClientDuplexStream<object, Record<string, unknown>> };
    return new Promise((resolve, reject) => {
      const stream = c.ServerReflectionInfo();
      stream.once('data', (m) => {
        resolve(m);
        stream.end();
      });
      stream.once('error', reject);
      stream.write(request);
    });
  }

  test('lists exactly the registered services, reflection and health included', async () => {
    const { running } = await setup();
    const res = await reflect(running.addresses.api.address, { list_services: '*' });
    const names = ((res.list_services_response as { service: { name: string }[] }).service ?? []).map((s) => s.name).sort();
    expect(names).toEqual([
      'grpc.health.v1.Health',
      'grpc.reflection.v1.ServerReflection',
      'grpc.reflection.v1alpha.ServerReflection',
      'vcpud.v1.VmService',
      'vcpudtest.Echo',
    ]);
    expect(running.services).toEqual(names);
  });

  test('describes a vcpud service and the test service by symbol', async () => {
    const { running } = await setup();
    for (const symbol of ['vcpud.v1.VmService', 'vcpudtest.Echo', 'vcpud.v1.GetStateRequest']) {
      const res = await reflect(running.addresses.api.address, { file_containing_symbol: symbol });
      const files = (res.file_descriptor_response as { file_descriptor_proto: Buffer[] } | undefined)?.file_descriptor_proto;
      expect(files?.length).toBeGreaterThan(0);
    }
  });
});

describe('request ids and logs', () => {
  // An id is unique per call: HPACK-indexing each one churned the connection's header table (BENCHMARKS.md).
  test("a client's request id goes out in response headers as a never-indexed literal; none is made for a call nobody logs", async () => {
    const { running } = await setup([], 'info');
    const session = http2.connect('http://localhost', { createConnection: () => net.connect(running.addresses.api.address.replace(/^unix:/, '')) });
    const say = (req: Buffer, id?: string) =>
      new Promise<{ headers: http2.IncomingHttpHeaders; trailers: http2.IncomingHttpHeaders }>((resolve, reject) => {
        const stream = session.request({
          ':method': 'POST',
          ':path': '/vcpudtest.Echo/Say',
          'content-type': 'application/grpc',
          te: 'trailers',
          ...(id ? { [REQUEST_ID_HEADER]: id } : {}),
        });
        const prefix = Buffer.alloc(5);
        prefix.writeUInt32BE(req.length, 1);
        stream.end(Buffer.concat([prefix, req]));
        let headers: http2.IncomingHttpHeaders = {};
        stream.on('response', (h) => (headers = h));
        stream.on('trailers', (trailers) => resolve({ headers, trailers }));
        stream.on('error', reject);
        stream.resume();
      });
    try {
      const hi = Buffer.from([0x0a, 0x02, 0x68, 0x69]); // text: "hi"
      const echoed = await say(hi, 'req-7');
      expect(echoed.headers[REQUEST_ID_HEADER]).toBe('req-7');
      expect((echoed.headers as Record<symbol, unknown>)[http2.sensitiveHeaders]).toEqual([REQUEST_ID_HEADER]);
      const anonymous = await say(hi);
      expect(anonymous.trailers['grpc-status']).toBe('0');
      expect(anonymous.headers[REQUEST_ID_HEADER]).toBeUndefined();
      expect(anonymous.trailers[REQUEST_ID_HEADER]).toBeUndefined();
    } finally {
      session.close();
    }
  });

  test('the client x-request-id comes back in headers and in the log line; a logged call without one gets one in its trailers', async () => {
    const { running, logs } = await setup();
    const c = client(EchoCtor, running.addresses.api.address);
    const md = new grpc.Metadata();
    md.set(REQUEST_ID_HEADER, 'req-42');
    const ok = await unary(c, 'Say', { text: 'hi' }, md);
    expect(ok.res?.text).toBe('hi');
    expect(ok.headers?.get(REQUEST_ID_HEADER)).toEqual(['req-42']);
    expect(ok.trailers?.get(REQUEST_ID_HEADER)).toEqual([]);

    const failed = await unary(c, 'Say', { failCode: grpc.status.INVALID_ARGUMENT });
    expect(failed.err?.code).toBe(grpc.status.INVALID_ARGUMENT);
    const generated = failed.err?.metadata.get(REQUEST_ID_HEADER)[0] as string;
    expect(generated).toMatch(/^[0-9a-f-]{36}$/);

    // At debug every call is logged: an insane client id is replaced by a made one, in the trailers.
    const bad = new grpc.Metadata();
    bad.set(REQUEST_ID_HEADER, 'has spaces and a "quote"');
    const replaced = await unary(c, 'Say', { text: 'x' }, bad);
    expect(replaced.headers?.get(REQUEST_ID_HEADER)).toEqual([]);
    const made = replaced.trailers?.get(REQUEST_ID_HEADER)[0] as string;
    expect(made).toMatch(/^[0-9a-f-]{36}$/);

    await new Promise((r) => setImmediate(r));
    const rpcLogs = logs.filter((l) => l.msg === 'rpc finished' && l.method === '/vcpudtest.Echo/Say');
    expect(rpcLogs[0]).toMatchObject({ level: 'debug', request_id: 'req-42', code: 'OK', method: '/vcpudtest.Echo/Say' });
    expect(typeof rpcLogs[0].duration_ms).toBe('number');
    expect(typeof rpcLogs[0].time).toBe('string');
    expect(rpcLogs[1]).toMatchObject({ level: 'info', request_id: generated, code: 'InvalidArgument', details: 'asked to fail' });
    expect(rpcLogs[2]).toMatchObject({ level: 'debug', request_id: made, code: 'OK' });
    expect(logs.find((l) => l.msg === 'listening')).toMatchObject({ api: running.addresses.api.address, tls: 'none' });
  });

  test('at the default level only failed calls are logged: a successful one is debug', async () => {
    const { running, logs } = await setup([], 'info');
    const c = client(EchoCtor, running.addresses.api.address);
    expect((await unary(c, 'Say', { text: 'hi' })).res?.text).toBe('hi');
    expect((await unary(c, 'Say', { failCode: grpc.status.NOT_FOUND })).err?.code).toBe(grpc.status.NOT_FOUND);
    await new Promise((r) => setImmediate(r));
    const rpcLogs = logs.filter((l) => l.msg === 'rpc finished');
    expect(rpcLogs).toEqual([expect.objectContaining({ level: 'info', code: 'NotFound', method: '/vcpudtest.Echo/Say' })]);
  });

  test('health checks log at debug only', async () => {
    const quiet = await setup([], 'info');
    await check(quiet.running.addresses.api.address, '');
    const verbose = await setup([], 'debug');
    await check(verbose.running.addresses.api.address, '');
    await new Promise((r) => setImmediate(r));
    const isCheck = (l: LogFields) => l.method === '/grpc.health.v1.Health/Check';
    expect(quiet.logs.filter(isCheck)).toEqual([]);
    expect(verbose.logs.filter(isCheck)).toEqual([expect.objectContaining({ level: 'debug', code: 'OK' })]);
  });

  test('unregistered vcpud handlers answer UNIMPLEMENTED through the same interceptors', async () => {
    const { running, logs } = await setup();
    const VmClient = vcpudProto().vcpud.v1.VmService;
    const c = new VmClient(running.addresses.api.address, grpc.credentials.createInsecure());
    clients.push(c);
    const err = await new Promise<grpc.ServiceError | null>((resolve) => c.ListVms({}, (e) => resolve(e)));
    expect(err?.code).toBe(grpc.status.UNIMPLEMENTED);
    await new Promise((r) => setImmediate(r));
    expect(logs.find((l) => l.method === '/vcpud.v1.VmService/ListVms')).toMatchObject({ code: 'Unimplemented' });
  });
});
