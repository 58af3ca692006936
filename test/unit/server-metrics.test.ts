/**
 * Metrics: the registry's series (domain metrics, collect-time sources, build info), the /metrics HTTP
 * endpoint, and gRPC metrics recorded by the interceptors of a real server (unix socket in a temp dir,
 * a test-only service from an inline .proto) and scraped over HTTP.
 */
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { loadConfig } from '../../src/server/config';
import { Health } from '../../src/server/health';
import { rpcLabels } from '../../src/server/interceptors';
import { silentLogger } from '../../src/server/logging';
import { Metrics, grpcCodeName } from '../../src/server/metrics';
import { createVcpudServer, type RunningServer } from '../../src/server/server';
import { sample } from '../support/prom';

const ECHO_PROTO = `
syntax = "proto3";
package vcpudtest;
message EchoRequest { string text = 1; int32 fail_code = 2; int32 count = 3; int32 delay_ms = 4; }
message EchoResponse { string text = 1; }
service Echo {
  rpc Say(EchoRequest) returns (EchoResponse);
  rpc Repeat(EchoRequest) returns (stream EchoResponse);
}
`;

interface EchoRequest {
  text: string;
  failCode: number;
  count: number;
  delayMs: number;
}

/** The test-only service: Say echoes or fails with fail_code; Repeat streams `count` echoes. */
function echoService(dir: string) {
  const file = path.join(dir, 'echo.proto');
  fs.writeFileSync(file, ECHO_PROTO);
  const packageDefinition = protoLoader.loadSync(file, { defaults: true });
  const ctor = (grpc.loadPackageDefinition(packageDefinition).vcpudtest as grpc.GrpcObject).Echo as grpc.ServiceClientConstructor;
  return {
    packageDefinition,
    client: (target: string) => new ctor(target, grpc.credentials.createInsecure()),
    register(server: grpc.Server) {
      server.addService(ctor.service, {
        Say: (call: grpc.ServerUnaryCall<EchoRequest, unknown>, cb: grpc.sendUnaryData<unknown>) =>
          setTimeout(
            () =>
              call.request.failCode
                ? cb({ code: call.request.failCode, details: `failing with ${call.request.failCode}` })
                : cb(null, { text: call.request.text }),
            call.request.delayMs,
          ),
        Repeat: (call: grpc.ServerWritableStream<EchoRequest, unknown>) => {
          for (let i = 0; i < call.request.count; i++) call.write({ text: `${call.request.text}${i}` });
          call.end();
        },
      });
    },
  };
}

function httpGet(url: string): Promise<{ status: number; body: string; type?: string }> {
  return new Promise((resolve, reject) => {
    http
      .get(url, (res) => {
        let body = '';
        res.on('data', (c) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body, type: res.headers['content-type'] }));
      })
      .on('error', reject);
  });
}

describe('Metrics registry', () => {
  test('go-grpc-prometheus code spellings', () => {
    expect([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16].map(grpcCodeName)).toEqual([
      'OK',
      'Canceled',
      'Unknown',
      'InvalidArgument',
      'DeadlineExceeded',
      'NotFound',
      'AlreadyExists',
      'PermissionDenied',
      'ResourceExhausted',
      'FailedPrecondition',
      'Aborted',
      'OutOfRange',
      'Unimplemented',
      'Internal',
      'Unavailable',
      'DataLoss',
      'Unauthenticated',
    ]);
    expect(grpcCodeName(42)).toBe('Code(42)');
  });

  test('grpc_type from the streaming flags, service and method from the path', () => {
    const m = (requestStream: boolean, responseStream: boolean) => rpcLabels({ path: '/vcpud.v1.VmService/ReadMemory', requestStream, responseStream });
    expect(m(false, false)).toEqual({ grpc_type: 'unary', grpc_service: 'vcpud.v1.VmService', grpc_method: 'ReadMemory' });
    expect(m(false, true).grpc_type).toBe('server_stream');
    expect(m(true, false).grpc_type).toBe('client_stream');
    expect(m(true, true).grpc_type).toBe('bidi_stream');
  });

  test('ioctl observer, state bytes, capabilities, collect-time sources, build info', async () => {
    const metrics = new Metrics({ version: '9.9.9', defaultMetrics: false });
    const obs = metrics.ioctlObserver();
    obs.onIoctl('KVM_GET_REGS', 3e-6);
    obs.onIoctl('KVM_GET_REGS', 2e-3);
    obs.onIoctl('KVM_SET_MSRS', 1e-5, 'EINVAL');
    obs.onNegotiationRetry('KVM_GET_MSR_INDEX_LIST');
    metrics.stateBytesRecorder('xsave')(4096);
    metrics.stateBytesRecorder('xsave')(4096);
    metrics.stateBytesRecorder('regs')(144);
    metrics.setCapabilities({ KVM_CAP_NESTED_STATE: 0, KVM_CAP_XSAVE2: 4096 });
    let exits: Record<string, number> = { io: 5, hlt: 1 };
    metrics.setSources({ vms: () => 2, vcpus: () => 3, exitsByReason: () => exits });

    let text = await metrics.scrape();
    expect(sample(text, 'vcpud_ioctl_duration_seconds_count', { ioctl: 'KVM_GET_REGS' })).toBe(2);
    expect(sample(text, 'vcpud_ioctl_duration_seconds_bucket', { ioctl: 'KVM_GET_REGS', le: '0.000005' })).toBe(1);
    expect(sample(text, 'vcpud_ioctl_duration_seconds_bucket', { ioctl: 'KVM_GET_REGS', le: '0.01' })).toBe(2);
    expect(sample(text, 'vcpud_ioctl_duration_seconds_bucket', { ioctl: 'KVM_GET_REGS', le: '0.000001' })).toBe(0);
    expect(sample(text, 'vcpud_ioctl_errors_total', { ioctl: 'KVM_SET_MSRS', errno: 'EINVAL' })).toBe(1);
    expect(sample(text, 'vcpud_size_negotiation_retries_total', { ioctl: 'KVM_GET_MSR_INDEX_LIST' })).toBe(1);
    expect(sample(text, 'vcpud_state_bytes_sum', { section: 'xsave' })).toBe(8192);
    expect(sample(text, 'vcpud_state_bytes_count', { section: 'regs' })).toBe(1);
    expect(sample(text, 'vcpud_capability', { capability: 'KVM_CAP_XSAVE2' })).toBe(4096);
    expect(sample(text, 'vcpud_capability', { capability: 'KVM_CAP_NESTED_STATE' })).toBe(0);
    expect(sample(text, 'vcpud_vms', {})).toBe(2);
    expect(sample(text, 'vcpud_vcpus', {})).toBe(3);
    expect(sample(text, 'vcpud_vcpu_exits_total', { reason: 'io' })).toBe(5);
    expect(sample(text, 'vcpud_build_info', { version: '9.9.9', node_version: process.version })).toBe(1);
    expect(text).not.toContain('process_cpu_user_seconds_total');

    // Sources are read at every scrape; capabilities are replaced, not merged.
    exits = { io: 9, mmio: 2 };
    metrics.setCapabilities({ KVM_CAP_XSAVE2: 8192 });
    text = await metrics.scrape();
    expect(sample(text, 'vcpud_vcpu_exits_total', { reason: 'io' })).toBe(9);
    expect(sample(text, 'vcpud_vcpu_exits_total', { reason: 'mmio' })).toBe(2);
    expect(sample(text, 'vcpud_vcpu_exits_total', { reason: 'hlt' })).toBeUndefined();
    expect(sample(text, 'vcpud_capability', { capability: 'KVM_CAP_NESTED_STATE' })).toBeUndefined();

    // A throwing source yields zeros instead of a failed scrape.
    metrics.setSources({
      vms: () => {
        throw new Error('gone');
      },
      vcpus: () => 1,
      exitsByReason: () => ({}),
    });
    text = await metrics.scrape();
    expect(sample(text, 'vcpud_vms', {})).toBe(0);
  });

  test('registries are private: two Metrics do not collide, the default metrics are on', async () => {
    const a = new Metrics();
    const b = new Metrics();
    a.stateBytesRecorder('regs')(1);
    expect(sample(await b.scrape(), 'vcpud_state_bytes_count', { section: 'regs' })).toBeUndefined();
    expect(await a.scrape()).toContain('process_cpu_user_seconds_total');
    expect(await a.scrape()).toMatch(/vcpud_build_info\{version="0\.1\.0"/);
  });

  test('serve(): GET /metrics in text format, 404 elsewhere, bound to exactly the host given', async () => {
    const metrics = new Metrics({ defaultMetrics: false });
    const server = await metrics.serve('127.0.0.1:0');
    try {
      const { address, port } = server.address() as AddressInfo;
      expect(address).toBe('127.0.0.1');
      const ok = await httpGet(`http://127.0.0.1:${port}/metrics`);
      expect(ok.status).toBe(200);
      expect(ok.type).toMatch(/^text\/plain; version=0\.0\.4/);
      expect(ok.body).toContain('# TYPE grpc_server_handled_total counter');
      expect((await httpGet(`http://127.0.0.1:${port}/`)).status).toBe(404);
      expect((await httpGet(`http://127.0.0.1:${port}/metricsx`)).status).toBe(404);
      // Another loopback address of the same host is not served (no wildcard bind).
      await expect(httpGet(`http://127.0.0.2:${port}/metrics`)).rejects.toThrow(/ECONNREFUSED/);
    } finally {
      await new Promise((r) => server.close(r));
    }
    await expect(metrics.serve('127.0.0.1:99999')).rejects.toThrow(/port 99999 is over 65535/);
  });
});

describe('gRPC metrics of a running server', () => {
  let dir: string;
  let running: RunningServer;
  let client: grpc.Client & Record<string, (...args: unknown[]) => unknown>;
  let metricsUrl: string;

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-metrics-'));
    const echo = echoService(dir);
    const config = loadConfig(['--listen', `unix:${dir}/vcpud.sock`, '--metrics-listen', '127.0.0.1:0'], {}, dir);
    const health = new Health();
    running = await createVcpudServer(config, { logger: silentLogger(), metrics: new Metrics(), health, services: [echo] });
    health.setServing();
    client = echo.client(running.addresses.api.address) as typeof client;
    metricsUrl = `http://127.0.0.1:${running.addresses.metrics?.port}/metrics`;
  });

  afterAll(async () => {
    client?.close();
    await running?.shutdown(100);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const say = (req: Partial<EchoRequest>) =>
    new Promise<{ err: grpc.ServiceError | null }>((resolve) => client.Say(req, (err: grpc.ServiceError | null) => resolve({ err })));

  test('handled_total by code, started, messages, latency, and zero series for registered methods', async () => {
    const before = await httpGet(metricsUrl);
    const sayLabels = { grpc_type: 'unary', grpc_service: 'vcpudtest.Echo', grpc_method: 'Say' };
    // Registered methods start at zero, so rate() works from the first scrape.
    expect(sample(before.body, 'grpc_server_started_total', sayLabels)).toBe(0);
    expect(sample(before.body, 'grpc_server_handled_total', { ...sayLabels, grpc_code: 'FailedPrecondition' })).toBe(0);

    expect((await say({ text: 'a' })).err).toBeNull();
    expect((await say({ text: 'b' })).err).toBeNull();
    expect((await say({ failCode: grpc.status.NOT_FOUND })).err?.code).toBe(grpc.status.NOT_FOUND);
    expect((await say({ failCode: grpc.status.FAILED_PRECONDITION })).err?.code).toBe(grpc.status.FAILED_PRECONDITION);
    const streamed: string[] = [];
    await new Promise<void>((resolve, reject) => {
      const s = client.Repeat({ text: 'x', count: 3 }) as grpc.ClientReadableStream<{ text: string }>;
      s.on('data', (m) => streamed.push(m.text));
      s.on('error', reject);
      s.on('end', () => resolve());
    });
    expect(streamed).toEqual(['x0', 'x1', 'x2']);

    const { status, body } = await httpGet(metricsUrl);
    expect(status).toBe(200);
    expect(sample(body, 'grpc_server_started_total', sayLabels)).toBe(4);
    expect(sample(body, 'grpc_server_handled_total', { ...sayLabels, grpc_code: 'OK' })).toBe(2);
    expect(sample(body, 'grpc_server_handled_total', { ...sayLabels, grpc_code: 'NotFound' })).toBe(1);
    expect(sample(body, 'grpc_server_handled_total', { ...sayLabels, grpc_code: 'FailedPrecondition' })).toBe(1);
    expect(sample(body, 'grpc_server_handling_seconds_count', sayLabels)).toBe(4);
    expect(sample(body, 'grpc_server_msg_received_total', sayLabels)).toBe(4);
    expect(sample(body, 'grpc_server_msg_sent_total', sayLabels)).toBe(2);

    const repeatLabels = { grpc_type: 'server_stream', grpc_service: 'vcpudtest.Echo', grpc_method: 'Repeat' };
    expect(sample(body, 'grpc_server_handled_total', { ...repeatLabels, grpc_code: 'OK' })).toBe(1);
    expect(sample(body, 'grpc_server_msg_sent_total', repeatLabels)).toBe(3);
    expect(sample(body, 'grpc_server_msg_received_total', repeatLabels)).toBe(1);
  });

  test('a call whose deadline expires on the server is counted once, as DeadlineExceeded', async () => {
    const labels = { grpc_type: 'unary', grpc_service: 'vcpudtest.Echo', grpc_method: 'Say', grpc_code: 'DeadlineExceeded' };
    const err = await new Promise<grpc.ServiceError>((resolve) =>
      client.Say({ text: 'late', delayMs: 300 }, { deadline: Date.now() + 50 }, (e: grpc.ServiceError) => resolve(e)),
    );
    expect(err.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    await new Promise((r) => setTimeout(r, 400)); // the handler answers late; that must not count again
    const { body } = await httpGet(metricsUrl);
    // Counted once. Which code depends on who notices first: the server's deadline timer
    // (DeadlineExceeded) or, on a loaded machine, the client's cancellation arriving before it (Canceled).
    const ended =
      (sample(body, 'grpc_server_handled_total', labels) ?? 0) + (sample(body, 'grpc_server_handled_total', { ...labels, grpc_code: 'Canceled' }) ?? 0);
    expect(ended).toBe(1);
    expect(sample(body, 'grpc_server_handled_total', { ...labels, grpc_code: 'OK' })).toBe(2);
  });
});
