/**
 * Server configuration: defaults < JSON config file (--config / VCPUD_CONFIG) < environment < flags.
 *
 * Every problem found is collected and thrown together as one ConfigError, each naming where the bad
 * value came from (a flag, a variable or a file key), so an operator fixes a deployment in one pass.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  DEFAULT_RUNTIME_DIR_RULE,
  DEFAULT_SOCKET_RULE,
  defaultRuntimeDir,
  defaultSocketAddress,
  formatAddress,
  isLoopbackHost,
  parseAddress,
  parseHostPort,
  type Address,
} from '../address';
import { parseByteSize, SIZE_SYNTAX } from '../size';
import { DEFAULT_LIMITS, type Limits } from '../vm/limits';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';
export const LOG_LEVELS: readonly LogLevel[] = ['debug', 'info', 'warn', 'error'];

export interface TlsConfig {
  certFile: string;
  keyFile: string;
  /** When set, clients must present a certificate signed by this CA (mTLS). */
  caFile?: string;
  /** Client certificate subject CNs or SAN URIs allowed to call; empty: any certificate the CA signed. */
  allowedClients: string[];
}

export interface Config {
  /** Where CreateSnapshot writes and RestoreSnapshot reads snapshots (names never leave it). */
  snapshotDir: string;
  /**
   * Guest memory as shared files here (tmpfs or hugetlbfs) instead of anonymous memory, and the
   * restart handover: SIGTERM saves every VM's state beside them, the next start resumes the VMs.
   */
  stateDir?: string;
  /** Client credentials MigrateVm presents to a destination vcpud when the request carries none. */
  migrationTls?: { caFile?: string; certFile?: string; keyFile?: string };
  /** A migration whose peer makes no progress for this long fails (the VM stays on the source). */
  migrationStallTimeoutMs: number;
  /** 'unix:/abs/path' or 'HOST:PORT' ([v6]:PORT). */
  listen: string;
  socketMode: number;
  tls?: TlsConfig;
  /** Plaintext TCP is allowed, and only on a loopback address. */
  insecure: boolean;
  /** 'HOST:PORT' of the Prometheus endpoint, '' to disable. */
  metricsListen: string;
  /** 'HOST:PORT' of a plaintext grpc.health.v1-only server (Kubernetes gRPC probes), '' for none. */
  healthListen: string;
  kvmPath: string;
  limits: Limits;
  maxMessageBytes: number;
  maxConcurrentStreams: number;
  /** Bytes of request messages larger than 64 KiB being received at once, over all calls (request-limits.ts). */
  maxRequestBytesInFlight: number;
  /** A request message or restore upload that receives nothing for this long is ended (UPLOAD_STALLED). */
  uploadStallTimeoutMs: number;
  /** Open connections on the API listener; more are closed at accept (connections.ts). */
  maxConnections: number;
  /** A TLS connection must finish its handshake within this, or it is closed. */
  handshakeTimeoutMs: number;
  shutdownGraceMs: number;
  logLevel: LogLevel;
  /** false: without /dev/kvm stay up with health NOT_SERVING (so probes say why) instead of exiting. */
  exitOnKvmError: boolean;
  /**
   * TEST ONLY (the nested lab): SetNestedState skips vcpud's own validation when a call carries the
   * header `x-vcpud-skip-validation: 1`, so tests can show what the kernel itself refuses. Never set
   * in production: a caller could then hand KVM unchecked blobs.
   */
  testAllowUnvalidatedNested: boolean;
}

export type ListenAddress = Address;
// The address rules are shared with vcpuctl (src/address.ts); the server's names for them:
export { isLoopbackHost, parseHostPort, parseAddress as parseListenAddress, formatAddress as formatListenAddress } from '../address';

/** All problems of one configuration; `problems` holds one sentence each. */
export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  - ${p}`).join('\n')}`);
    this.name = 'ConfigError';
  }
}

/** Thrown by loadConfig for --help / -h: print usage() and exit 0. */
export class HelpRequested extends Error {
  constructor() {
    super(usage());
    this.name = 'HelpRequested';
  }
}

// ---------------------------------------------------------------------------------------------
// Values

/** A byte count from a flag, variable or config file (src/size.ts: 512Mi, 4GiB, 1G, 1048576); throws on anything else. */
export function parseSize(text: string | number): number {
  if (typeof text === 'number') {
    if (!Number.isSafeInteger(text)) throw new Error(`not a whole number of bytes: ${text}`);
    return text;
  }
  const bytes = parseByteSize(text);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`size too large: '${text}'`);
  return Number(bytes);
}

/** Where vcpud listens by default: a private runtime directory (src/address.ts), never a TCP port. */
export const defaultListen = (env: NodeJS.ProcessEnv): string => defaultSocketAddress(env);

/** The default snapshot directory: next to the default socket. */
export function defaultSnapshotDir(env: NodeJS.ProcessEnv): string {
  return path.join(defaultRuntimeDir(env), 'snapshots');
}

export function defaultConfig(env: NodeJS.ProcessEnv = {}): Config {
  return {
    snapshotDir: defaultSnapshotDir(env),
    listen: defaultListen(env),
    socketMode: 0o600,
    insecure: false,
    metricsListen: '127.0.0.1:9464',
    healthListen: '',
    kvmPath: '/dev/kvm',
    limits: { ...DEFAULT_LIMITS },
    maxMessageBytes: 64 * 1024 ** 2,
    maxConcurrentStreams: 256,
    maxRequestBytesInFlight: 256 * 1024 ** 2,
    uploadStallTimeoutMs: 30_000,
    maxConnections: 256,
    handshakeTimeoutMs: 10_000,
    shutdownGraceMs: 5000,
    migrationStallTimeoutMs: 10_000,
    logLevel: 'info',
    exitOnKvmError: false,
    testAllowUnvalidatedNested: false,
  };
}

// ---------------------------------------------------------------------------------------------
// Options: each one defined once, with its flag, variable and config-file key

/** Settings as gathered from one source, before defaults are applied and cross-checks run. */
interface Settings {
  snapshotDir?: string;
  stateDir?: string;
  migrationTlsCa?: string;
  migrationTlsCert?: string;
  migrationTlsKey?: string;
  migrationStallTimeoutMs?: number;
  listen?: string;
  socketMode?: number;
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  allowedClients?: string[];
  insecure?: boolean;
  metricsListen?: string;
  healthListen?: string;
  kvmPath?: string;
  maxVms?: number;
  maxVcpusPerVm?: number;
  maxMemoryPerVmBytes?: number;
  maxMemoryTotalBytes?: number;
  maxMessageBytes?: number;
  maxConcurrentStreams?: number;
  maxRequestBytesInFlight?: number;
  uploadStallTimeoutMs?: number;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  shutdownGraceMs?: number;
  logLevel?: LogLevel;
  exitOnKvmError?: boolean;
  testAllowUnvalidatedNested?: boolean;
}
type Key = keyof Settings;

/** Converts one raw value (string from argv/env, JSON value from the file); `base` resolves relative paths. */
type Parser = (raw: unknown, base: string) => unknown;

const str: Parser = (raw) => {
  if (typeof raw !== 'string') throw new Error(`expected a string, got ${JSON.stringify(raw)}`);
  return raw;
};
const filePath: Parser = (raw, base) => {
  const s = str(raw, base) as string;
  if (!s) throw new Error('expected a file path, got an empty string');
  return path.resolve(base, s);
};
const bool: Parser = (raw) => {
  if (typeof raw === 'boolean') return raw;
  const s = String(raw).trim().toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(s)) return true;
  if (['0', 'false', 'no', 'off', ''].includes(s)) return false;
  throw new Error(`expected true or false, got '${raw}'`);
};
const count: Parser = (raw) => {
  const n = typeof raw === 'number' ? raw : /^\s*-?\d+\s*$/.test(String(raw)) ? Number(raw) : NaN;
  if (!Number.isSafeInteger(n)) throw new Error(`expected a whole number, got '${raw}'`);
  if (n < 0) throw new Error(`must not be negative, got ${n}`);
  return n;
};
const positive: Parser = (raw, base) => {
  const n = count(raw, base) as number;
  if (n === 0) throw new Error('must be at least 1, got 0');
  return n;
};
const size: Parser = (raw) => {
  if (typeof raw !== 'string' && typeof raw !== 'number') throw new Error(`expected a size, got ${JSON.stringify(raw)}`);
  const n = parseSize(raw);
  if (n < 0) throw new Error(`must not be negative, got ${raw}`);
  return n;
};
const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000 };
/** '10s', '500ms', '2m'; a JSON number is milliseconds. A bare number string is refused (which unit?). */
const duration: Parser = (raw) => {
  if (typeof raw === 'number' && Number.isSafeInteger(raw) && raw > 0) return raw;
  const m = /^\s*(\d+)\s*(ms|s|m)\s*$/.exec(String(raw));
  const ms = m ? Number(m[1]) * DURATION_UNITS_MS[m[2]] : NaN;
  if (!Number.isSafeInteger(ms) || ms <= 0) throw new Error(`expected a positive duration such as 10s or 500ms, got '${raw}'`);
  return ms;
};
const mode: Parser = (raw) => {
  // Strings are octal as in chmod ('0660', '660'); JSON numbers are taken as they are (0o660 === 432).
  const n = typeof raw === 'number' ? raw : /^\s*0?[0-7]{1,4}\s*$/.test(String(raw)) ? parseInt(String(raw), 8) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > 0o777) throw new Error(`expected an octal file mode such as 0600, got '${raw}'`);
  return n;
};
const level: Parser = (raw) => {
  if (!LOG_LEVELS.includes(raw as LogLevel)) throw new Error(`must be one of ${LOG_LEVELS.join(', ')}, got '${raw}'`);
  return raw;
};
const list: Parser = (raw) => {
  if (Array.isArray(raw)) return raw.map((x) => str(x, '') as string);
  return String(raw)
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
};

interface OptionSpec {
  key: Key;
  flag: string;
  env: string;
  /** Path in the JSON config file, which mirrors Config. */
  file: string;
  parse: Parser;
  /** Flags taking no value. */
  boolean?: boolean;
  /** Repeatable flag whose values accumulate (flags only; env and file give the whole list). */
  repeatable?: boolean;
  help: string;
  arg?: string;
}

const OPTIONS: OptionSpec[] = [
  {
    key: 'snapshotDir',
    flag: '--snapshot-dir',
    env: 'VCPUD_SNAPSHOT_DIR',
    file: 'snapshotDir',
    parse: filePath,
    arg: 'DIR',
    help: `snapshot directory (default DIR/snapshots with DIR = ${DEFAULT_RUNTIME_DIR_RULE})`,
  },
  {
    key: 'stateDir',
    flag: '--state-dir',
    env: 'VCPUD_STATE_DIR',
    file: 'stateDir',
    parse: filePath,
    arg: 'DIR',
    help: 'guest memory as files here (tmpfs/hugetlbfs); VMs survive a SIGTERM restart (default: anonymous memory, no handover)',
  },
  {
    key: 'migrationTlsCa',
    flag: '--migration-tls-ca',
    env: 'VCPUD_MIGRATION_TLS_CA',
    file: 'migrationTls.caFile',
    parse: filePath,
    arg: 'FILE',
    help: 'MigrateVm: CA to verify destination vcpuds with (PEM)',
  },
  {
    key: 'migrationTlsCert',
    flag: '--migration-tls-cert',
    env: 'VCPUD_MIGRATION_TLS_CERT',
    file: 'migrationTls.certFile',
    parse: filePath,
    arg: 'FILE',
    help: 'MigrateVm: client certificate presented to destinations (PEM)',
  },
  {
    key: 'migrationTlsKey',
    flag: '--migration-tls-key',
    env: 'VCPUD_MIGRATION_TLS_KEY',
    file: 'migrationTls.keyFile',
    parse: filePath,
    arg: 'FILE',
    help: 'MigrateVm: its private key (PEM)',
  },
  {
    key: 'migrationStallTimeoutMs',
    flag: '--migration-stall-timeout',
    env: 'VCPUD_MIGRATION_STALL_TIMEOUT',
    file: 'migrationStallTimeoutMs',
    parse: duration,
    arg: 'DURATION',
    help: 'a migration whose peer makes no progress this long fails; the VM stays on the source (default 10s)',
  },
  {
    key: 'listen',
    flag: '--listen',
    env: 'VCPUD_LISTEN',
    file: 'listen',
    parse: str,
    arg: 'ADDR',
    help: 'unix:PATH (or just a path), or HOST:PORT, to serve the API on',
  },
  {
    key: 'socketMode',
    flag: '--socket-mode',
    env: 'VCPUD_SOCKET_MODE',
    file: 'socketMode',
    parse: mode,
    arg: 'MODE',
    help: 'file mode of the unix socket (default 0600)',
  },
  { key: 'tlsCert', flag: '--tls-cert', env: 'VCPUD_TLS_CERT', file: 'tls.certFile', parse: filePath, arg: 'FILE', help: 'server certificate chain (PEM)' },
  { key: 'tlsKey', flag: '--tls-key', env: 'VCPUD_TLS_KEY', file: 'tls.keyFile', parse: filePath, arg: 'FILE', help: 'server private key (PEM)' },
  { key: 'tlsCa', flag: '--tls-ca', env: 'VCPUD_TLS_CA', file: 'tls.caFile', parse: filePath, arg: 'FILE', help: 'CA for client certificates: turns on mTLS' },
  {
    key: 'allowedClients',
    flag: '--allow-client',
    env: 'VCPUD_ALLOWED_CLIENTS',
    file: 'tls.allowedClients',
    parse: list,
    repeatable: true,
    arg: 'NAME',
    help: 'client cert CN or SAN URI allowed to call (repeatable; env: comma-separated)',
  },
  {
    key: 'insecure',
    flag: '--insecure',
    env: 'VCPUD_INSECURE',
    file: 'insecure',
    parse: bool,
    boolean: true,
    help: 'allow plaintext TCP (loopback addresses only)',
  },
  {
    key: 'metricsListen',
    flag: '--metrics-listen',
    env: 'VCPUD_METRICS_LISTEN',
    file: 'metricsListen',
    parse: str,
    arg: 'HOST:PORT',
    help: "Prometheus /metrics endpoint, '' to disable (default 127.0.0.1:9464)",
  },
  {
    key: 'healthListen',
    flag: '--health-listen',
    env: 'VCPUD_HEALTH_LISTEN',
    file: 'healthListen',
    parse: str,
    arg: 'HOST:PORT',
    help: 'plaintext grpc.health.v1-only server, for Kubernetes gRPC probes',
  },
  { key: 'kvmPath', flag: '--kvm-path', env: 'VCPUD_KVM_PATH', file: 'kvmPath', parse: filePath, arg: 'PATH', help: 'KVM device (default /dev/kvm)' },
  {
    key: 'maxVms',
    flag: '--max-vms',
    env: 'VCPUD_MAX_VMS',
    file: 'limits.maxVms',
    parse: count,
    arg: 'N',
    help: `VMs at once (default ${DEFAULT_LIMITS.maxVms})`,
  },
  {
    key: 'maxVcpusPerVm',
    flag: '--max-vcpus-per-vm',
    env: 'VCPUD_MAX_VCPUS_PER_VM',
    file: 'limits.maxVcpusPerVm',
    parse: count,
    arg: 'N',
    help: `vCPUs per VM (default ${DEFAULT_LIMITS.maxVcpusPerVm})`,
  },
  {
    key: 'maxMemoryPerVmBytes',
    flag: '--max-memory-per-vm',
    env: 'VCPUD_MAX_MEMORY_PER_VM',
    file: 'limits.maxMemoryPerVmBytes',
    parse: size,
    arg: 'SIZE',
    help: 'guest memory per VM (default 4Gi)',
  },
  {
    key: 'maxMemoryTotalBytes',
    flag: '--max-memory-total',
    env: 'VCPUD_MAX_MEMORY_TOTAL',
    file: 'limits.maxMemoryTotalBytes',
    parse: size,
    arg: 'SIZE',
    help: 'guest memory of all VMs (default 16Gi)',
  },
  {
    key: 'maxMessageBytes',
    flag: '--max-message-bytes',
    env: 'VCPUD_MAX_MESSAGE_BYTES',
    file: 'maxMessageBytes',
    parse: (r, b) => positive(size(r, b), b),
    arg: 'SIZE',
    help: 'largest gRPC message sent or received (default 64Mi)',
  },
  {
    key: 'maxConcurrentStreams',
    flag: '--max-concurrent-streams',
    env: 'VCPUD_MAX_CONCURRENT_STREAMS',
    file: 'maxConcurrentStreams',
    parse: positive,
    arg: 'N',
    help: 'HTTP/2 streams per connection (default 256)',
  },
  {
    key: 'maxRequestBytesInFlight',
    flag: '--max-request-bytes-in-flight',
    env: 'VCPUD_MAX_REQUEST_BYTES_IN_FLIGHT',
    file: 'maxRequestBytesInFlight',
    parse: (r, b) => positive(size(r, b), b),
    arg: 'SIZE',
    help: 'request messages over 64 KiB being received at once, all calls together (default 256Mi)',
  },
  {
    key: 'uploadStallTimeoutMs',
    flag: '--upload-stall-timeout',
    env: 'VCPUD_UPLOAD_STALL_TIMEOUT',
    file: 'uploadStallTimeoutMs',
    parse: duration,
    arg: 'DURATION',
    help: 'end a request message or restore upload that receives nothing for this long (default 30s)',
  },
  {
    key: 'maxConnections',
    flag: '--max-connections',
    env: 'VCPUD_MAX_CONNECTIONS',
    file: 'maxConnections',
    parse: positive,
    arg: 'N',
    help: 'open connections on the API listener; more are closed at accept (default 256)',
  },
  {
    key: 'handshakeTimeoutMs',
    flag: '--handshake-timeout',
    env: 'VCPUD_HANDSHAKE_TIMEOUT',
    file: 'handshakeTimeoutMs',
    parse: duration,
    arg: 'DURATION',
    help: 'TLS handshake deadline; also how long a probe or scrape connection may idle (default 10s)',
  },
  {
    key: 'shutdownGraceMs',
    flag: '--shutdown-grace-ms',
    env: 'VCPUD_SHUTDOWN_GRACE_MS',
    file: 'shutdownGraceMs',
    parse: count,
    arg: 'MS',
    help: 'time in-flight calls get on shutdown (default 5000)',
  },
  {
    key: 'logLevel',
    flag: '--log-level',
    env: 'VCPUD_LOG_LEVEL',
    file: 'logLevel',
    parse: level,
    arg: 'LEVEL',
    help: 'debug, info, warn or error (default info)',
  },
  {
    key: 'exitOnKvmError',
    flag: '--exit-on-kvm-error',
    env: 'VCPUD_EXIT_ON_KVM_ERROR',
    file: 'exitOnKvmError',
    parse: bool,
    boolean: true,
    help: 'exit when KVM is unusable instead of serving health NOT_SERVING',
  },
  {
    key: 'testAllowUnvalidatedNested',
    flag: '--test-allow-unvalidated-nested',
    env: 'VCPUD_TEST_ALLOW_UNVALIDATED_NESTED',
    file: 'testAllowUnvalidatedNested',
    parse: bool,
    boolean: true,
    help: 'TEST ONLY, never in production: SetNestedState calls with header x-vcpud-skip-validation: 1 skip validation (the kernel alone judges the blob)',
  },
];

const CONFIG_FLAG = '--config';
const CONFIG_ENV = 'VCPUD_CONFIG';
const HELP_FLAGS = ['--help', '-h'];

/** Where each setting came from, for messages: '--listen', 'VCPUD_LISTEN', 'vcpud.json: listen'. */
type Origins = Partial<Record<Key, string>>;

interface Layer {
  settings: Settings;
  origins: Origins;
}

function setParsed(layer: Layer, spec: OptionSpec, raw: unknown, base: string, origin: string, problems: string[]): void {
  try {
    const value = spec.parse(raw, base);
    const settings = layer.settings as Record<Key, unknown>;
    if (spec.repeatable && Array.isArray(settings[spec.key]) && origin === spec.flag) {
      settings[spec.key] = [...(settings[spec.key] as unknown[]), ...(value as unknown[])];
    } else {
      settings[spec.key] = value;
    }
    layer.origins[spec.key] = origin;
  } catch (e) {
    problems.push(`${origin}: ${(e as Error).message}`);
  }
}

interface ParsedArgs {
  layer: Layer;
  configFile?: string;
  help: boolean;
}

function parseArgs(argv: string[], cwd: string, problems: string[]): ParsedArgs {
  const layer: Layer = { settings: {}, origins: {} };
  let configFile: string | undefined;
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (HELP_FLAGS.includes(arg)) {
      help = true;
      continue;
    }
    if (!arg.startsWith('--')) {
      problems.push(`unexpected argument '${arg}' (flags start with --; see --help)`);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq < 0 ? arg : arg.slice(0, eq);
    const inline = eq < 0 ? undefined : arg.slice(eq + 1);
    const spec = OPTIONS.find((o) => o.flag === name);
    if (name !== CONFIG_FLAG && !spec) {
      problems.push(`unknown flag ${name} (see --help)`);
      continue;
    }
    let value: string | undefined = inline;
    if (value === undefined && !spec?.boolean) {
      if (i + 1 >= argv.length || argv[i + 1].startsWith('--')) {
        problems.push(`${name} needs a value`);
        continue;
      }
      value = argv[++i];
    }
    if (name === CONFIG_FLAG) configFile = path.resolve(cwd, value as string);
    else setParsed(layer, spec as OptionSpec, value ?? 'true', cwd, name, problems);
  }
  return { layer, configFile, help };
}

function envLayer(env: NodeJS.ProcessEnv, cwd: string, problems: string[]): Layer {
  const layer: Layer = { settings: {}, origins: {} };
  for (const spec of OPTIONS) {
    const raw = env[spec.env];
    // An unset variable means "not configured here"; an empty one is a value ('' disables metrics).
    if (raw !== undefined) setParsed(layer, spec, raw, cwd, spec.env, problems);
  }
  return layer;
}

function lookup(obj: Record<string, unknown>, dotted: string): unknown {
  return dotted.split('.').reduce<unknown>((o, k) => (o && typeof o === 'object' ? (o as Record<string, unknown>)[k] : undefined), obj);
}

/** The keys a config file may hold: every OptionSpec.file path and the objects containing them. */
function knownFileKeys(): Set<string> {
  const keys = new Set<string>();
  for (const o of OPTIONS) {
    const parts = o.file.split('.');
    for (let i = 1; i <= parts.length; i++) keys.add(parts.slice(0, i).join('.'));
  }
  return keys;
}

function fileLayer(file: string, problems: string[]): Layer {
  const layer: Layer = { settings: {}, origins: {} };
  let data: unknown;
  try {
    data = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    problems.push(`config file ${file}: ${(e as Error).message}`);
    return layer;
  }
  if (!data || typeof data !== 'object' || Array.isArray(data)) {
    problems.push(`config file ${file}: expected a JSON object`);
    return layer;
  }
  const known = knownFileKeys();
  const walk = (obj: Record<string, unknown>, prefix: string) => {
    for (const [k, v] of Object.entries(obj)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (!known.has(key)) problems.push(`config file ${file}: unknown key '${key}'`);
      else if (v && typeof v === 'object' && !Array.isArray(v)) walk(v as Record<string, unknown>, key);
    }
  };
  walk(data as Record<string, unknown>, '');
  // Relative paths in a file mean relative to the file, wherever vcpud was started from.
  const base = path.dirname(file);
  for (const spec of OPTIONS) {
    const raw = lookup(data as Record<string, unknown>, spec.file);
    if (raw !== undefined) setParsed(layer, spec, raw, base, `config file ${file}: ${spec.file}`, problems);
  }
  return layer;
}

function merge(layers: Layer[]): Layer {
  const out: Layer = { settings: {}, origins: {} };
  for (const l of layers) {
    Object.assign(out.settings, l.settings);
    Object.assign(out.origins, l.origins);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Cross-checks

function checkReadableFile(file: string, origin: string, problems: string[]): void {
  try {
    if (!fs.statSync(file).isFile()) {
      problems.push(`${origin}: ${file} is not a regular file`);
      return;
    }
    fs.closeSync(fs.openSync(file, 'r'));
  } catch (e) {
    problems.push(`${origin}: cannot read ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
}

function build(merged: Layer, env: NodeJS.ProcessEnv, cwd: string, problems: string[]): Config {
  const s = merged.settings;
  const from = (k: Key, fallback: string) => merged.origins[k] ?? fallback;
  const config = defaultConfig(env);

  let listen: ListenAddress | undefined;
  try {
    listen = parseAddress(s.listen ?? config.listen, cwd);
    config.listen = formatAddress(listen);
  } catch (e) {
    problems.push(`${from('listen', 'default --listen')}: ${(e as Error).message}`);
  }

  for (const k of ['metricsListen', 'healthListen'] as const) {
    const v = s[k];
    if (v === undefined) continue;
    if (v !== '') {
      try {
        parseHostPort(v);
      } catch (e) {
        problems.push(`${from(k, k)}: ${(e as Error).message}`);
        continue;
      }
    }
    config[k] = v;
  }

  const hasCert = s.tlsCert !== undefined;
  const hasKey = s.tlsKey !== undefined;
  if (hasCert !== hasKey) problems.push('--tls-cert and --tls-key must be given together');
  if (!hasCert && !hasKey && s.tlsCa !== undefined) problems.push(`${from('tlsCa', '--tls-ca')}: --tls-ca needs --tls-cert/--tls-key`);
  const allowed = s.allowedClients ?? [];
  if (allowed.length > 0 && s.tlsCa === undefined)
    problems.push(`${from('allowedClients', '--allow-client')}: an allowlist needs --tls-ca (client certificates are verified against it)`);
  if (hasCert && hasKey) {
    checkReadableFile(s.tlsCert as string, from('tlsCert', '--tls-cert'), problems);
    checkReadableFile(s.tlsKey as string, from('tlsKey', '--tls-key'), problems);
    if (s.tlsCa !== undefined) checkReadableFile(s.tlsCa, from('tlsCa', '--tls-ca'), problems);
    config.tls = { certFile: s.tlsCert as string, keyFile: s.tlsKey as string, allowedClients: allowed };
    if (s.tlsCa !== undefined) config.tls.caFile = s.tlsCa;
  }

  config.insecure = s.insecure ?? false;
  if (listen?.kind === 'tcp') {
    if (config.insecure && config.tls) problems.push('--insecure conflicts with --tls-cert/--tls-key: choose plaintext or TLS');
    else if (config.insecure && !isLoopbackHost(listen.host))
      problems.push(`--insecure is only allowed on a loopback address (127.0.0.0/8, ::1, localhost), not ${listen.host}`);
    else if (!config.insecure && !config.tls) problems.push('TCP requires --tls-cert/--tls-key (or --insecure on a loopback address)');
  } else if (listen?.kind === 'unix' && config.tls) {
    problems.push('--tls-cert/--tls-key apply to a TCP --listen address; a unix socket is guarded by its file mode');
  }

  // Two of our listeners on one fixed port would fail at bind time with a less helpful EADDRINUSE.
  const fixed = [config.listen, config.metricsListen, config.healthListen].filter((a) => a && !a.startsWith('unix:') && !a.endsWith(':0'));
  for (const [i, a] of fixed.entries()) if (fixed.indexOf(a) !== i) problems.push(`address ${a} is configured for two listeners`);

  if (s.snapshotDir !== undefined) config.snapshotDir = s.snapshotDir;
  if (s.stateDir !== undefined) config.stateDir = s.stateDir;
  if ((s.migrationTlsCert === undefined) !== (s.migrationTlsKey === undefined))
    problems.push('--migration-tls-cert and --migration-tls-key must be given together');
  if (s.migrationTlsCa !== undefined || s.migrationTlsCert !== undefined || s.migrationTlsKey !== undefined) {
    for (const k of ['migrationTlsCa', 'migrationTlsCert', 'migrationTlsKey'] as const)
      if (s[k] !== undefined) checkReadableFile(s[k] as string, from(k, k), problems);
    config.migrationTls = { caFile: s.migrationTlsCa, certFile: s.migrationTlsCert, keyFile: s.migrationTlsKey };
  }
  if (s.socketMode !== undefined) config.socketMode = s.socketMode;
  if (s.kvmPath !== undefined) config.kvmPath = s.kvmPath;
  if (s.maxVms !== undefined) config.limits.maxVms = s.maxVms;
  if (s.maxVcpusPerVm !== undefined) config.limits.maxVcpusPerVm = s.maxVcpusPerVm;
  if (s.maxMemoryPerVmBytes !== undefined) config.limits.maxMemoryPerVmBytes = s.maxMemoryPerVmBytes;
  if (s.maxMemoryTotalBytes !== undefined) config.limits.maxMemoryTotalBytes = s.maxMemoryTotalBytes;
  if (s.maxMessageBytes !== undefined) config.maxMessageBytes = s.maxMessageBytes;
  if (s.maxConcurrentStreams !== undefined) config.maxConcurrentStreams = s.maxConcurrentStreams;
  if (s.maxRequestBytesInFlight !== undefined) config.maxRequestBytesInFlight = s.maxRequestBytesInFlight;
  if (s.uploadStallTimeoutMs !== undefined) config.uploadStallTimeoutMs = s.uploadStallTimeoutMs;
  if (config.maxRequestBytesInFlight < config.maxMessageBytes)
    problems.push(
      `${from('maxRequestBytesInFlight', 'default --max-request-bytes-in-flight')} (${config.maxRequestBytesInFlight}) is below --max-message-bytes (${config.maxMessageBytes}): a message of the largest size could never be received`,
    );
  if (s.maxConnections !== undefined) config.maxConnections = s.maxConnections;
  if (s.handshakeTimeoutMs !== undefined) config.handshakeTimeoutMs = s.handshakeTimeoutMs;
  if (s.shutdownGraceMs !== undefined) config.shutdownGraceMs = s.shutdownGraceMs;
  if (s.migrationStallTimeoutMs !== undefined) config.migrationStallTimeoutMs = s.migrationStallTimeoutMs;
  if (s.logLevel !== undefined) config.logLevel = s.logLevel;
  if (s.exitOnKvmError !== undefined) config.exitOnKvmError = s.exitOnKvmError;
  if (s.testAllowUnvalidatedNested !== undefined) config.testAllowUnvalidatedNested = s.testAllowUnvalidatedNested;
  return config;
}

// ---------------------------------------------------------------------------------------------
// Entry points

/** True when argv asks for --help / -h (main prints usage() and exits 0 before anything else). */
export function wantsHelp(argv: string[]): boolean {
  return argv.some((a) => HELP_FLAGS.includes(a));
}

/**
 * The configuration from `argv` (process.argv.slice(2)) and `env`, over the defaults and an optional
 * JSON config file (--config FILE, else VCPUD_CONFIG). Relative paths resolve against `cwd`, or
 * against the config file's directory for values from the file.
 * Throws HelpRequested for --help, ConfigError listing every problem otherwise.
 */
export function loadConfig(argv: string[], env: NodeJS.ProcessEnv, cwd: string = process.cwd()): Config {
  const problems: string[] = [];
  const args = parseArgs(argv, cwd, problems);
  if (args.help) throw new HelpRequested();
  const envRaw = env[CONFIG_ENV];
  const configFile = args.configFile ?? (envRaw ? path.resolve(cwd, envRaw) : undefined);
  const layers: Layer[] = [];
  if (configFile) layers.push(fileLayer(configFile, problems));
  layers.push(envLayer(env, cwd, problems), args.layer);
  const config = build(merge(layers), env, cwd, problems);
  if (problems.length) throw new ConfigError(problems);
  return config;
}

export function usage(): string {
  const rows = OPTIONS.map((o) => [`${o.flag}${o.arg ? ` ${o.arg}` : ''}`, o.help, o.env]);
  rows.unshift([`${CONFIG_FLAG} FILE`, 'JSON config file (keys mirror the Config object: listen, tls.certFile, limits.maxVms, ...)', CONFIG_ENV]);
  rows.push(['--help, -h', 'print this help', '']);
  const width = Math.max(...rows.map((r) => r[0].length)) + 2;
  const lines = rows.map(([flag, help, env]) => `  ${flag.padEnd(width)}${help}${env ? ` [${env}]` : ''}`);
  return [
    'usage: vcpud [flags]',
    '',
    'Owns KVM VMs and serves their vCPU state over gRPC (vcpud.v1.VcpuStateService, vcpud.v1.VmService, vcpud.v1.SnapshotService).',
    `Precedence: defaults < config file < environment < flags. Sizes: ${SIZE_SYNTAX} (the same in vcpuctl).`,
    '',
    'flags:',
    ...lines,
    '',
    `The default --listen is ${DEFAULT_SOCKET_RULE}. A path (/abs or ./rel) is a unix socket too.`,
    'TCP needs --tls-cert/--tls-key (add --tls-ca for mTLS, --allow-client to restrict callers), or --insecure on loopback.',
    '',
  ].join('\n');
}
