/**
 * Runs the real vcpud executable (dist/src/server/main.js, built by the test command) as a child
 * process and gives tests real grpc-js clients to it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { protoPath as healthProtoPath } from 'grpc-health-check';
import { packageRoot } from '../../src/package';
import { vcpudProto } from '../../src/api/proto';

const ROOT = packageRoot();
/** VCPUD_MAIN in the environment runs another build (e.g. an unfixed one, to see a test fail before a fix). */
export const VCPUD_MAIN = process.env.VCPUD_MAIN ?? path.join(ROOT, 'dist', 'src', 'server', 'main.js');

export interface ServingLine {
  api: string;
  metrics: string;
  health: string;
  kvm: string;
}

export interface VcpudProcess {
  proc: ChildProcess;
  dir: string;
  serving: ServingLine;
  logs: () => string;
  /** A client of `service` over the API listener (unix socket unless `target` says otherwise). */
  client<S extends 'VcpuStateService' | 'VmService' | 'SnapshotService' | 'MigrationService'>(
    service: S,
    creds?: grpc.ChannelCredentials,
    target?: string,
  ): ClientOf<S>;
  health(target?: string, creds?: grpc.ChannelCredentials): grpc.Client & Record<string, Function>;
  scrape(): Promise<string>;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

type ClientOf<_S> = grpc.Client & Record<string, Function>;

/**
 * Starts vcpud with `args` and waits for its "vcpud serving" log line. `how.as`: run it under that
 * uid and gid (the test runs as root), its socket directory owned by them. `how.launcher` runs
 * before node and must exec it (keeping the pid), e.g. ['prlimit', '--nofile=64:64', '--'] for a
 * low descriptor limit. `how.main`: another build's main.js (bench/compare-builds.ts).
 */
export async function startVcpud(
  args: string[] = [],
  env: NodeJS.ProcessEnv = {},
  nodeArgs: string[] = [],
  how: { as?: { uid: number; gid: number }; launcher?: string[]; main?: string } = {},
): Promise<VcpudProcess> {
  const { as, launcher = [], main = VCPUD_MAIN } = how;
  if (!fs.existsSync(main)) throw new Error(`${main} is missing: run the build (npm test runs tsc first)`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-e2e-'));
  if (as) fs.chownSync(dir, as.uid, as.gid);
  // VCPUD_TEST_STATE_DIR=1 runs every suite's vcpud with guest memory in a state directory (tmpfs).
  const stateDir =
    process.env.VCPUD_TEST_STATE_DIR === '1' && !args.includes('--state-dir') ? ['--state-dir', fs.mkdtempSync('/dev/shm/vcpud-e2e-state-')] : [];
  const full = [`--listen`, `unix:${path.join(dir, 'vcpud.sock')}`, '--metrics-listen', '127.0.0.1:0', ...stateDir, ...args];
  const [exe, ...exeArgs] = [...launcher, process.execPath];
  const proc = spawn(exe, [...exeArgs, ...nodeArgs, main, ...full], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], ...(as ?? {}) });
  let out = '';
  proc.stdout!.on('data', (d) => (out += d));
  proc.stderr!.on('data', (d) => (out += d));
  const serving = await new Promise<ServingLine>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL'); // not left running behind a failed test (e.g. a log level that hides the line)
      reject(new Error(`vcpud did not start within 15 s (or its "vcpud serving" line was not logged):\n${out}`));
    }, 15_000);
    const check = () => {
      for (const line of out.split('\n')) {
        if (!line.includes('"vcpud serving"')) continue;
        clearTimeout(timer);
        resolve(JSON.parse(line) as ServingLine);
        return;
      }
    };
    proc.stderr!.on('data', check);
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`vcpud exited with ${code} before serving:\n${out}`));
    });
  });
  const clients: grpc.Client[] = [];
  const proto = vcpudProto();
  const api = serving.api;
  const track = <C extends grpc.Client>(c: C) => (clients.push(c), c);
  return {
    proc,
    dir,
    serving,
    logs: () => out,
    client(service, creds = grpc.credentials.createInsecure(), target = api) {
      const Ctor = proto.vcpud.v1[service] as unknown as grpc.ServiceClientConstructor;
      return track(new Ctor(target, creds)) as ClientOf<typeof service>;
    },
    health(target = api, creds = grpc.credentials.createInsecure()) {
      const def = grpc.loadPackageDefinition(protoLoader.loadSync(healthProtoPath, { enums: String })) as unknown as {
        grpc: { health: { v1: { Health: grpc.ServiceClientConstructor } } };
      };
      return track(new def.grpc.health.v1.Health(target, creds)) as grpc.Client & Record<string, Function>;
    },
    async scrape() {
      const res = await fetch(`http://${serving.metrics}/metrics`);
      return res.text();
    },
    async stop(signal = 'SIGTERM') {
      for (const c of clients) c.close();
      if (proc.exitCode !== null) return proc.exitCode;
      // A process killed by a signal (a test's kill -9) has exited with signalCode set, exitCode null.
      if (proc.signalCode === null) {
        const exited = new Promise<void>((r) => proc.once('exit', () => r()));
        proc.kill(signal);
        await exited;
      }
      fs.rmSync(dir, { recursive: true, force: true });
      if (stateDir.length) fs.rmSync(stateDir[1], { recursive: true, force: true });
      return proc.exitCode;
    },
  };
}

/** Promisified unary call. */
export function call<Res = Record<string, unknown>>(
  client: grpc.Client & Record<string, Function>,
  method: string,
  req: object,
  metadata = new grpc.Metadata(),
): Promise<Res> {
  return new Promise((resolve, reject) =>
    client[method](req, metadata, { deadline: Date.now() + 20_000 }, (err: grpc.ServiceError | null, res: Res) => (err ? reject(err) : resolve(res))),
  );
}

/** Collects every message of a server stream. */
export function collect<Res = Record<string, unknown>>(client: grpc.Client & Record<string, Function>, method: string, req: object): Promise<Res[]> {
  return new Promise((resolve, reject) => {
    const out: Res[] = [];
    const s = client[method](req) as grpc.ClientReadableStream<Res>;
    s.on('data', (m: Res) => out.push(m));
    s.on('error', reject);
    s.on('end', () => resolve(out));
  });
}

/** The error a call rejects with (fails the test when it succeeds). */
export async function callError(client: grpc.Client & Record<string, Function>, method: string, req: object): Promise<grpc.ServiceError> {
  try {
    await call(client, method, req);
  } catch (e) {
    return e as grpc.ServiceError;
  }
  throw new Error(`${method} succeeded but an error was expected`);
}
