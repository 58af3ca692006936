#!/usr/bin/env node
/**
 * Load generator for vcpud (or any grpc-js unary method): N clients, each its own channel and HTTP/2
 * connection, with M calls in flight each, for a fixed count or a duration; over a Unix socket or
 * TCP (plaintext, TLS or mTLS). Reports calls by status code, calls/s, latency percentiles and a
 * log-scale histogram, and with a metrics URL the server's grpc_server_handled_total delta beside
 * the client's own count.
 *
 * Requests are sent as pre-encoded bytes and responses are not decoded, so the client spends as
 * little CPU as possible on the machine it shares with the server.
 *
 *   node dist/bench/loadgen.js --target unix:/run/vcpud.sock --vm ID --clients 64 --duration 5
 *   node dist/bench/loadgen.js --help
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import { Options, UsageError, optionLines, parseCommandLine, type OptionSpec } from '../src/cli/vcpuctl/args';
import { channelCredentials, messageType, resolveTarget } from '../src/cli/vcpuctl/client';
import { parseSections } from '../src/cli/vcpuctl/edit';
import { grpcCodeName } from '../src/server/metrics';
import { samples } from '../test/support/prom';
import { table } from './floors';
import { histogramText, summarize, type LatencySummary } from './latency';

export const GET_STATE_PATH = '/vcpud.v1.VcpuStateService/GetState';

export interface LoadOptions {
  /** unix:/path or host:port. */
  target: string;
  /** PEM files: with any of them TCP uses TLS (mTLS with cert and key); with none, plaintext. */
  ca?: string;
  cert?: string;
  key?: string;
  /** Name checked against the server certificate instead of the target's host. */
  serverName?: string;
  /** Separate channels, hence HTTP/2 connections (default 1). */
  clients?: number;
  /** Calls in flight per client (default 1). */
  inFlight?: number;
  /** Stop after this many calls ... */
  count?: number;
  /** ... or stop starting calls after this many seconds (default 5 when no count). */
  durationSeconds?: number;
  /** Calls made, not counted, before the measurement starts (JIT, buffers). */
  warmupSeconds?: number;
  /** 'GetState' (default), or a full path '/pkg.Service/Method' sent `request` as is. */
  method?: string;
  /** Raw mode: the request message bytes (default: empty message). */
  request?: Buffer;
  /** GetState: the VM, vCPU (default 0) and sections (default all readable). */
  vmId?: string;
  vcpuId?: number;
  sections?: string[];
  /** Prometheus endpoint of the server (http://HOST:PORT/metrics or HOST:PORT) for the cross-check. */
  metricsUrl?: string;
  /** Deadline of each call in ms (default 30000; 0 = none). */
  deadlineMs?: number;
  /** Called once every client is connected, before warm-up. */
  onConnected?: () => void | Promise<void>;
  /** Called just before the measured calls start (after warm-up and the first metrics scrape). */
  onMeasuring?: () => void | Promise<void>;
}

export interface ServerCheck {
  /** grpc_server_handled_total of the method, after minus before, by grpc_code. */
  codes: Record<string, number>;
  calls: number;
  /** Same calls per code on both sides. */
  match: boolean;
}

export interface LoadResult {
  target: string;
  path: string;
  clients: number;
  inFlight: number;
  seconds: number;
  calls: number;
  callsPerSecond: number;
  /** Calls by status code, spelled as grpc_server_handled_total's grpc_code (OK, NotFound, ...). */
  codes: Record<string, number>;
  /** Up to five distinct error messages seen. */
  errors: string[];
  responseBytes: number;
  /** CPU this process spent while measuring: shows when the client, not the server, is the limit. */
  clientCpuSeconds: number;
  latencyMs: LatencySummary;
  server?: ServerCheck;
}

type Raw = (b: Buffer) => Buffer;
const raw: Raw = (b) => b;

/** A GetState request as the bytes on the wire (protobuf, without the gRPC frame). */
export function getStateRequest(vmId: string, vcpuId = 0, sections: string[] = []): Buffer {
  const T = messageType('vcpud.v1.GetStateRequest');
  return Buffer.from(T.encode(T.fromObject({ vmId, vcpuId, sections: parseSections(sections) })).finish());
}

/** One GetState answered by `target` (plaintext), as the response bytes on the wire: nothing decoded. */
export function rawGetState(target: string, vmId: string, vcpuId = 0): Promise<Buffer> {
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  return new Promise<Buffer>((resolve, reject) =>
    client.makeUnaryRequest(GET_STATE_PATH, raw, raw, getStateRequest(vmId, vcpuId), (e, r) => (e ? reject(e) : resolve(r!))),
  ).finally(() => client.close());
}

/** A message in gRPC's length-prefixed framing: flag 0 (uncompressed), u32 BE length, bytes. */
export function grpcFrame(message: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head.writeUInt32BE(message.length, 1);
  return Buffer.concat([head, message]);
}

function resolveRequest(o: LoadOptions): { path: string; request: Buffer } {
  const method = o.method ?? 'GetState';
  if (method.startsWith('/')) return { path: method, request: o.request ?? Buffer.alloc(0) };
  if (method !== 'GetState') throw new UsageError(`--method ${method}: use GetState or a full path /package.Service/Method`);
  if (!o.vmId) throw new UsageError('GetState needs --vm ID');
  return { path: GET_STATE_PATH, request: getStateRequest(o.vmId, o.vcpuId ?? 0, o.sections ?? []) };
}

// ---------------------------------------------------------------------------------------------
// Server-side count

export function metricsEndpoint(url: string): string {
  const withScheme = /^https?:\/\//.test(url) ? url : `http://${url}`;
  return new URL(withScheme).pathname === '/' ? `${withScheme.replace(/\/$/, '')}/metrics` : withScheme;
}

/** grpc_server_handled_total of one method path, by grpc_code. */
export async function scrapeHandled(metricsUrl: string, path: string): Promise<Record<string, number>> {
  const [, service, method] = path.split('/');
  const res = await fetch(metricsEndpoint(metricsUrl));
  if (!res.ok) throw new Error(`GET ${metricsEndpoint(metricsUrl)}: HTTP ${res.status}`);
  const out: Record<string, number> = {};
  for (const s of samples(await res.text(), 'grpc_server_handled_total'))
    if (s.labels.grpc_service === service && s.labels.grpc_method === method) out[s.labels.grpc_code] = (out[s.labels.grpc_code] ?? 0) + s.value;
  return out;
}

/** after - before, without the codes that did not move. */
export function handledDelta(before: Record<string, number>, after: Record<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [code, v] of Object.entries(after)) if (v - (before[code] ?? 0) !== 0) out[code] = v - (before[code] ?? 0);
  return out;
}

const total = (codes: Record<string, number>) => Object.values(codes).reduce((a, b) => a + b, 0);

function sameCounts(a: Record<string, number>, b: Record<string, number>): boolean {
  const keys = new Set([...Object.keys(a), ...Object.keys(b)]);
  return [...keys].every((k) => (a[k] ?? 0) === (b[k] ?? 0));
}

/**
 * The delta since `before`. The server counts a call before sending its status, but a call the
 * client gave up on (deadline, cancel) is counted when the server notices: retry briefly for those.
 */
async function serverCheck(metricsUrl: string, path: string, before: Record<string, number>, client: Record<string, number>): Promise<ServerCheck> {
  let codes: Record<string, number> = {};
  for (let i = 0; i < 20; i++) {
    codes = handledDelta(before, await scrapeHandled(metricsUrl, path));
    if (total(codes) >= total(client)) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return { codes, calls: total(codes), match: sameCounts(codes, client) };
}

// ---------------------------------------------------------------------------------------------
// The run

function connect(o: LoadOptions, n: number): grpc.Client[] {
  const target = resolveTarget(o.target);
  const tls = o.ca !== undefined || o.cert !== undefined || o.key !== undefined;
  const creds = channelCredentials(target, {
    server: o.target,
    tlsCa: o.ca,
    tlsCert: o.cert,
    tlsKey: o.key,
    insecure: target.kind === 'tcp' && !tls,
    timeoutMs: 0,
  });
  const options: grpc.ChannelOptions = {
    'grpc.max_receive_message_length': 64 << 20,
    // A channel-private subchannel pool: without it grpc-js shares one connection among all
    // channels with equal target and options, and N clients would be N channels on 1 connection.
    'grpc.use_local_subchannel_pool': 1,
  };
  if (o.serverName) options['grpc.ssl_target_name_override'] = o.serverName;
  return Array.from({ length: n }, () => new grpc.Client(target.address, creds, options));
}

function ready(client: grpc.Client, ms: number): Promise<void> {
  return new Promise((resolve, reject) =>
    client.waitForReady(Date.now() + ms, (e) => (e ? reject(new Error(`connecting to ${client.getChannel().getTarget()}: ${e.message}`)) : resolve())),
  );
}

interface Outcome {
  code: number;
  bytes: number;
  details?: string;
}

function unary(client: grpc.Client, path: string, request: Buffer, deadlineMs: number): Promise<Outcome> {
  const options: grpc.CallOptions = deadlineMs > 0 ? { deadline: Date.now() + deadlineMs } : {};
  return new Promise((resolve) =>
    client.makeUnaryRequest<Buffer, Buffer>(path, raw, raw, request, options, (err, res) =>
      resolve(err ? { code: err.code, bytes: 0, details: err.details } : { code: grpc.status.OK, bytes: res?.length ?? 0 }),
    ),
  );
}

/** Runs every client's in-flight loops while `more()` grants another call; `done` sees each outcome. */
async function drive(
  clients: grpc.Client[],
  inFlight: number,
  more: () => boolean,
  call: (c: grpc.Client) => Promise<Outcome>,
  done: (o: Outcome, ms: number) => void,
): Promise<void> {
  const loop = async (c: grpc.Client) => {
    while (more()) {
      const t = performance.now();
      const o = await call(c);
      done(o, performance.now() - t);
    }
  };
  await Promise.all(clients.flatMap((c) => Array.from({ length: inFlight }, () => loop(c))));
}

export async function runLoad(o: LoadOptions): Promise<LoadResult> {
  const nClients = o.clients ?? 1;
  const inFlight = o.inFlight ?? 1;
  if (!(nClients >= 1 && inFlight >= 1)) throw new UsageError('--clients and --in-flight must be at least 1');
  if (o.count !== undefined && o.durationSeconds !== undefined) throw new UsageError('give --count or --duration, not both');
  const { path, request } = resolveRequest(o);
  const deadlineMs = o.deadlineMs ?? 30_000;
  const call = (c: grpc.Client) => unary(c, path, request, deadlineMs);
  const clients = connect(o, nClients);
  try {
    await Promise.all(clients.map((c) => ready(c, 10_000)));
    await o.onConnected?.();
    if (o.warmupSeconds) {
      const end = performance.now() + o.warmupSeconds * 1000;
      await drive(
        clients,
        inFlight,
        () => performance.now() < end,
        call,
        () => {},
      );
    }
    const before = o.metricsUrl ? await scrapeHandled(o.metricsUrl, path) : {};

    await o.onMeasuring?.();
    let issued = 0;
    const end = performance.now() + (o.durationSeconds ?? 5) * 1000;
    const more = o.count !== undefined ? () => issued++ < o.count! : () => performance.now() < end;
    let latencies = new Float64Array(1 << 16);
    let calls = 0;
    let responseBytes = 0;
    const byCode = new Map<number, number>();
    const errors = new Set<string>();
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    await drive(clients, inFlight, more, call, (out, ms) => {
      if (calls === latencies.length) {
        const grown = new Float64Array(latencies.length * 2);
        grown.set(latencies);
        latencies = grown;
      }
      latencies[calls++] = ms;
      responseBytes += out.bytes;
      byCode.set(out.code, (byCode.get(out.code) ?? 0) + 1);
      if (out.code !== grpc.status.OK && errors.size < 5) errors.add(`${grpcCodeName(out.code)}: ${out.details ?? ''}`);
    });
    const seconds = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);

    const codes = Object.fromEntries([...byCode].sort((a, b) => a[0] - b[0]).map(([c, n]) => [grpcCodeName(c), n]));
    const result: LoadResult = {
      target: o.target,
      path,
      clients: nClients,
      inFlight,
      seconds,
      calls,
      callsPerSecond: calls / seconds,
      codes,
      errors: [...errors],
      responseBytes,
      clientCpuSeconds: (cpu.user + cpu.system) / 1e6,
      latencyMs: summarize(latencies.subarray(0, calls)),
    };
    if (o.metricsUrl) result.server = await serverCheck(o.metricsUrl, path, before, codes);
    return result;
  } finally {
    for (const c of clients) c.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Output

const codesText = (codes: Record<string, number>) =>
  Object.entries(codes)
    .map(([c, n]) => `${c} ${n}`)
    .join(', ') || '(none)';

/** True when every call was OK and, when checked, the server counted exactly the same. */
export function loadOk(r: LoadResult): boolean {
  return r.calls > 0 && r.calls === (r.codes.OK ?? 0) && (r.server?.match ?? true);
}

export function formatResult(r: LoadResult): string {
  const l = r.latencyMs;
  const lines = [
    `${r.path} -> ${r.target}`,
    `${r.clients} clients x ${r.inFlight} in flight: ${r.calls} calls in ${r.seconds.toFixed(2)} s = ${r.callsPerSecond.toFixed(0)} calls/s` +
      (r.calls ? `, ${(r.responseBytes / r.calls).toFixed(0)} response bytes/call` : ''),
    `codes: ${codesText(r.codes)}`,
    `client CPU: ${r.clientCpuSeconds.toFixed(2)} s (${r.calls ? ((r.clientCpuSeconds / r.calls) * 1e6).toFixed(0) : '-'} us/call)`,
    ...r.errors.map((e) => `  error: ${e}`),
    `latency ms: p50 ${l.p50.toFixed(3)}  p90 ${l.p90.toFixed(3)}  p99 ${l.p99.toFixed(3)}  max ${l.max.toFixed(3)}  mean ${l.mean.toFixed(3)}`,
    histogramText(l.histogram),
  ];
  if (r.server) {
    lines.push(
      '',
      table(
        [`count of ${r.path.split('/')[2]}`, 'calls', 'by code'],
        [
          ['client', String(r.calls), codesText(r.codes)],
          ['server grpc_server_handled_total delta', String(r.server.calls), codesText(r.server.codes)],
        ],
      ),
      r.server.match ? 'cross-check: client and server agree' : 'cross-check: MISMATCH between the client and the server',
    );
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// CLI

const OPTIONS: OptionSpec[] = [
  { name: 'target', type: 'string', arg: 'ADDR', help: 'unix:/path/to/socket or host:port (required)' },
  { name: 'ca', type: 'string', arg: 'FILE', help: 'CA to verify the server with: TLS on TCP (plaintext when no --ca/--cert/--key)' },
  { name: 'cert', type: 'string', arg: 'FILE', help: 'client certificate for mTLS' },
  { name: 'key', type: 'string', arg: 'FILE', help: 'client private key for mTLS' },
  { name: 'server-name', type: 'string', arg: 'NAME', help: 'name to verify the server certificate against (default: the host)' },
  { name: 'clients', type: 'int', arg: 'N', help: 'clients, each its own channel and HTTP/2 connection (default 1)' },
  { name: 'in-flight', type: 'int', arg: 'M', help: 'calls in flight per client (default 1)' },
  { name: 'count', type: 'int', arg: 'N', help: 'total calls to make' },
  { name: 'duration', type: 'seconds', arg: 'SECONDS', help: 'or start calls for this long (default 5)' },
  { name: 'warmup', type: 'seconds', arg: 'SECONDS', help: 'uncounted calls first (default 0)' },
  { name: 'method', type: 'string', arg: 'NAME|PATH', help: 'GetState (default), or /package.Service/Method sent the raw request' },
  { name: 'vm', type: 'string', arg: 'ID', help: 'GetState: the VM' },
  { name: 'vcpu', type: 'int', arg: 'N', help: 'GetState: the vCPU (default 0)' },
  { name: 'section', type: 'string', repeat: true, arg: 'NAME', help: 'GetState: a section (regs, sregs, msrs, ...); default every readable one' },
  { name: 'request-hex', type: 'string', arg: 'HEX', help: 'raw mode: the request message bytes in hex (default empty)' },
  { name: 'request-file', type: 'string', arg: 'FILE', help: 'raw mode: the request message bytes from a file' },
  { name: 'metrics', type: 'string', arg: 'URL', help: "server's Prometheus endpoint (http://127.0.0.1:9464/metrics): cross-check grpc_server_handled_total" },
  { name: 'timeout', type: 'seconds', arg: 'SECONDS', help: 'deadline of each call (default 30; 0 = none)' },
  { name: 'json', type: 'bool', help: 'print the result as JSON' },
  { name: 'help', type: 'bool', help: 'show this help' },
];

export function usage(): string {
  return [
    'usage: loadgen --target ADDR [--clients N] [--in-flight M] [--count N | --duration S] [--method GetState --vm ID | --method /pkg.Svc/Method] [--json]',
    '',
    'Drives one unary gRPC method from N clients (separate HTTP/2 connections) x M calls in flight, then prints',
    'calls by status code, calls/s, latency percentiles and a log-scale histogram. With --metrics, the',
    "server's grpc_server_handled_total delta for the method is compared with the client's count.",
    'Exit code: 0 every call OK (and the counts agree), 1 otherwise, 2 usage error.',
    '',
    'options:',
    ...optionLines(OPTIONS),
  ].join('\n');
}

export function parseArgs(argv: string[]): { load: LoadOptions; json: boolean } | 'help' {
  const parsed = parseCommandLine(argv, OPTIONS, []);
  const o = new Options(parsed.options);
  if (parsed.help || o.bool('help')) return 'help';
  const target = o.string('target');
  if (!target) throw new UsageError('--target is required');
  if (o.has('request-hex') && o.has('request-file')) throw new UsageError('--request-hex and --request-file: choose one');
  let request: Buffer | undefined;
  if (o.has('request-hex')) {
    const hex = o.string('request-hex')!.replace(/^0x/i, '');
    if (!/^([0-9a-f]{2})*$/i.test(hex)) throw new UsageError('--request-hex: not an even number of hex digits');
    request = Buffer.from(hex, 'hex');
  }
  if (o.has('request-file')) request = fs.readFileSync(o.string('request-file')!);
  const load: LoadOptions = {
    target,
    ca: o.string('ca'),
    cert: o.string('cert'),
    key: o.string('key'),
    serverName: o.string('server-name'),
    clients: o.int('clients'),
    inFlight: o.int('in-flight'),
    count: o.int('count'),
    durationSeconds: o.has('duration') ? Number(o.values.duration) : undefined,
    warmupSeconds: o.has('warmup') ? Number(o.values.warmup) : undefined,
    method: o.string('method'),
    request,
    vmId: o.string('vm'),
    vcpuId: o.int('vcpu'),
    sections: o.strings('section'),
    metricsUrl: o.string('metrics'),
    deadlineMs: o.has('timeout') ? Math.round(Number(o.values.timeout) * 1000) : undefined,
  };
  return { load, json: o.bool('json') };
}

async function main(argv: string[]): Promise<number> {
  try {
    const args = parseArgs(argv);
    if (args === 'help') {
      console.log(usage());
      return 0;
    }
    const r = await runLoad(args.load);
    console.log(args.json ? JSON.stringify(r, null, 2) : formatResult(r));
    return loadOk(r) ? 0 : 1;
  } catch (e) {
    console.error(`loadgen: ${(e as Error).message}`);
    if (e instanceof UsageError) {
      console.error('(see --help)');
      return 2;
    }
    return 1;
  }
}

if (require.main === module) main(process.argv.slice(2)).then((code) => (process.exitCode = code));
