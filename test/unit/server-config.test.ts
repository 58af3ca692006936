/**
 * loadConfig: defaults, precedence (file < env < flags), size parsing, and every validation message,
 * collected into one ConfigError.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  ConfigError,
  HelpRequested,
  defaultConfig,
  isLoopbackHost,
  loadConfig,
  parseListenAddress,
  parseSize,
  usage,
  wantsHelp,
} from '../../src/server/config';
import { defaultRuntimeDir } from '../../src/address';
import { DEFAULT_LIMITS } from '../../src/vm/limits';

// Module level: describe blocks build argv lists from these paths when they are defined.
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-config-'));
const cert = path.join(dir, 'server.crt');
const key = path.join(dir, 'server.key');
const ca = path.join(dir, 'ca.crt');
// loadConfig only checks that TLS files are readable regular files; their content is not parsed here.
for (const f of [cert, key, ca]) fs.writeFileSync(f, 'pem\n');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const load = (argv: string[], env: NodeJS.ProcessEnv = {}) => loadConfig(argv, env, dir);

/** The problems of a configuration that must fail. */
function problems(argv: string[], env: NodeJS.ProcessEnv = {}): string[] {
  try {
    load(argv, env);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as ConfigError).problems;
  }
  throw new Error('expected a ConfigError');
}

function writeJson(name: string, data: unknown): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, typeof data === 'string' ? data : JSON.stringify(data));
  return f;
}

describe('defaults', () => {
  test('without XDG_RUNTIME_DIR: /run/vcpud as root, else /tmp/vcpud-UID; never the current directory', () => {
    const c = load([]);
    const runtimeDir = process.getuid!() === 0 ? '/run/vcpud' : `/tmp/vcpud-${process.getuid!()}`;
    expect(defaultRuntimeDir({}, 0)).toBe('/run/vcpud');
    expect(defaultRuntimeDir({}, 1000)).toBe('/tmp/vcpud-1000');
    expect(defaultRuntimeDir({ XDG_RUNTIME_DIR: '/run/user/1000' }, 1000)).toBe('/run/user/1000/vcpud');
    expect(c).toEqual({
      snapshotDir: path.join(runtimeDir, 'snapshots'),
      listen: `unix:${path.join(runtimeDir, 'vcpud.sock')}`,
      socketMode: 0o600,
      insecure: false,
      metricsListen: '127.0.0.1:9464',
      healthListen: '',
      kvmPath: '/dev/kvm',
      limits: DEFAULT_LIMITS,
      maxMessageBytes: 64 * 1024 * 1024,
      maxConcurrentStreams: 256,
      maxRequestBytesInFlight: 256 * 1024 * 1024,
      uploadStallTimeoutMs: 30_000,
      maxConnections: 256,
      handshakeTimeoutMs: 10_000,
      shutdownGraceMs: 5000,
      migrationStallTimeoutMs: 10_000,
      logLevel: 'info',
      exitOnKvmError: false,
      testAllowUnvalidatedNested: false,
    });
    expect(c.tls).toBeUndefined();
  });

  test('--migration-stall-timeout takes a duration (10s, 500ms, 2m) and refuses others', () => {
    expect(load(['--migration-stall-timeout', '3s']).migrationStallTimeoutMs).toBe(3000);
    expect(load(['--migration-stall-timeout', '750ms']).migrationStallTimeoutMs).toBe(750);
    expect(load(['--migration-stall-timeout', '2m']).migrationStallTimeoutMs).toBe(120_000);
    expect(() => load(['--migration-stall-timeout', '1500'])).toThrow(/migration-stall-timeout.*duration/);
    expect(() => load(['--migration-stall-timeout', 'soon'])).toThrow(/migration-stall-timeout.*duration/);
    expect(() => load(['--migration-stall-timeout', '0s'])).toThrow(/positive duration/);
  });

  test('with XDG_RUNTIME_DIR: $XDG_RUNTIME_DIR/vcpud/vcpud.sock', () => {
    expect(load([], { XDG_RUNTIME_DIR: '/run/user/1000' }).listen).toBe('unix:/run/user/1000/vcpud/vcpud.sock');
    expect(defaultConfig({ XDG_RUNTIME_DIR: '/run/user/5' }).listen).toBe('unix:/run/user/5/vcpud/vcpud.sock');
  });

  test('DEFAULT_LIMITS is not shared (a loaded config can be changed safely)', () => {
    const c = load([]);
    c.limits.maxVms = 1;
    expect(DEFAULT_LIMITS.maxVms).not.toBe(1);
  });
});

describe('precedence: defaults < config file < environment < flags', () => {
  test('each layer overrides the one below, key by key', () => {
    const file = writeJson('layers.json', {
      listen: 'unix:/tmp/from-file.sock',
      logLevel: 'debug',
      limits: { maxVms: 1, maxVcpusPerVm: 7 },
      kvmPath: '/dev/kvm-file',
    });
    const env = { VCPUD_CONFIG: file, VCPUD_LISTEN: 'unix:/tmp/from-env.sock', VCPUD_MAX_VMS: '2', VCPUD_KVM_PATH: '/dev/kvm-env' };
    const c = load(['--max-vms', '3'], env);
    expect(c.listen).toBe('unix:/tmp/from-env.sock'); // env over file
    expect(c.limits.maxVms).toBe(3); // flag over env over file
    expect(c.limits.maxVcpusPerVm).toBe(7); // file over default
    expect(c.logLevel).toBe('debug'); // file over default
    expect(c.kvmPath).toBe('/dev/kvm-env');
    expect(load(['--kvm-path=/dev/kvm-flag'], env).kvmPath).toBe('/dev/kvm-flag');
  });

  test('--config wins over VCPUD_CONFIG', () => {
    const a = writeJson('a.json', { logLevel: 'warn' });
    const b = writeJson('b.json', { logLevel: 'error' });
    expect(load(['--config', b], { VCPUD_CONFIG: a }).logLevel).toBe('error');
    expect(load([], { VCPUD_CONFIG: a }).logLevel).toBe('warn');
  });

  test('relative paths in a config file are relative to the file; on the command line, to cwd', () => {
    const sub = path.join(dir, 'etc');
    fs.mkdirSync(sub, { recursive: true });
    for (const f of ['c.pem', 'k.pem', 'ca.pem']) fs.writeFileSync(path.join(sub, f), 'pem\n');
    const file = path.join(sub, 'vcpud.json');
    fs.writeFileSync(
      file,
      JSON.stringify({ listen: '127.0.0.1:7000', tls: { certFile: 'c.pem', keyFile: 'k.pem', caFile: 'ca.pem', allowedClients: ['orch'] } }),
    );
    const c = load(['--config', file]);
    expect(c.tls).toEqual({ certFile: path.join(sub, 'c.pem'), keyFile: path.join(sub, 'k.pem'), caFile: path.join(sub, 'ca.pem'), allowedClients: ['orch'] });
    expect(load(['--listen', 'unix:rel/x.sock']).listen).toBe(`unix:${path.join(dir, 'rel', 'x.sock')}`);
  });

  test('--allow-client repeats and replaces the environment list; VCPUD_ALLOWED_CLIENTS is comma-separated', () => {
    const tls = ['--listen', '127.0.0.1:7000', '--tls-cert', cert, '--tls-key', key, '--tls-ca', ca];
    expect(load(tls, { VCPUD_ALLOWED_CLIENTS: 'a, b,,c' }).tls?.allowedClients).toEqual(['a', 'b', 'c']);
    expect(load([...tls, '--allow-client', 'x', '--allow-client=spiffe://t/y'], { VCPUD_ALLOWED_CLIENTS: 'a' }).tls?.allowedClients).toEqual([
      'x',
      'spiffe://t/y',
    ]);
  });

  test('every flag and its variable', () => {
    const flags = load([
      '--listen',
      '127.0.0.1:0',
      '--insecure',
      '--metrics-listen',
      '',
      '--health-listen',
      '0.0.0.0:8081',
      '--socket-mode',
      '0660',
      '--max-vms',
      '5',
      '--max-vcpus-per-vm',
      '4',
      '--max-memory-per-vm',
      '512Mi',
      '--max-memory-total',
      '4Gi',
      '--max-message-bytes',
      '1Mi',
      '--max-concurrent-streams',
      '8',
      '--max-connections',
      '32',
      '--handshake-timeout',
      '1500ms',
      '--shutdown-grace-ms',
      '100',
      '--log-level',
      'warn',
      '--exit-on-kvm-error',
    ]);
    const env = load([], {
      VCPUD_LISTEN: '127.0.0.1:0',
      VCPUD_INSECURE: 'true',
      VCPUD_METRICS_LISTEN: '',
      VCPUD_HEALTH_LISTEN: '0.0.0.0:8081',
      VCPUD_SOCKET_MODE: '0660',
      VCPUD_MAX_VMS: '5',
      VCPUD_MAX_VCPUS_PER_VM: '4',
      VCPUD_MAX_MEMORY_PER_VM: '512Mi',
      VCPUD_MAX_MEMORY_TOTAL: '4Gi',
      VCPUD_MAX_MESSAGE_BYTES: '1Mi',
      VCPUD_MAX_CONCURRENT_STREAMS: '8',
      VCPUD_MAX_CONNECTIONS: '32',
      VCPUD_HANDSHAKE_TIMEOUT: '1500ms',
      VCPUD_SHUTDOWN_GRACE_MS: '100',
      VCPUD_LOG_LEVEL: 'warn',
      VCPUD_EXIT_ON_KVM_ERROR: '1',
    });
    const expected = {
      listen: '127.0.0.1:0',
      insecure: true,
      metricsListen: '',
      healthListen: '0.0.0.0:8081',
      socketMode: 0o660,
      limits: { maxVms: 5, maxVcpusPerVm: 4, maxMemoryPerVmBytes: 512 * 1024 ** 2, maxMemoryTotalBytes: 4 * 1024 ** 3 },
      maxMessageBytes: 1024 ** 2,
      maxConcurrentStreams: 8,
      maxConnections: 32,
      handshakeTimeoutMs: 1500,
      shutdownGraceMs: 100,
      logLevel: 'warn',
      exitOnKvmError: true,
    };
    expect(flags).toMatchObject(expected);
    expect(env).toMatchObject(expected);
    expect(load(['--insecure=false', '--exit-on-kvm-error=false'], { VCPUD_INSECURE: '1' })).toMatchObject({ insecure: false, exitOnKvmError: false });
  });

  test('--max-request-bytes-in-flight and --upload-stall-timeout (a duration: ms, s or m; a file number is ms)', () => {
    expect(load(['--max-request-bytes-in-flight', '128Mi', '--upload-stall-timeout', '1500ms'])).toMatchObject({
      maxRequestBytesInFlight: 128 * 1024 ** 2,
      uploadStallTimeoutMs: 1500,
    });
    expect(load([], { VCPUD_UPLOAD_STALL_TIMEOUT: '2m' }).uploadStallTimeoutMs).toBe(120_000);
    expect(load(['--config', writeJson('stall.json', { uploadStallTimeoutMs: 250 })]).uploadStallTimeoutMs).toBe(250);
    expect(problems(['--upload-stall-timeout', '30'])).toEqual(["--upload-stall-timeout: expected a positive duration such as 10s or 500ms, got '30'"]);
    expect(problems(['--max-request-bytes-in-flight', '0'])).toEqual(['--max-request-bytes-in-flight: must be at least 1, got 0']);
    expect(problems(['--max-request-bytes-in-flight', '8Mi', '--max-message-bytes', '16Mi'])).toEqual([
      '--max-request-bytes-in-flight (8388608) is below --max-message-bytes (16777216): a message of the largest size could never be received',
    ]);
  });

  test('--test-allow-unvalidated-nested: off by default, a test-only flag documented as such', () => {
    expect(load([]).testAllowUnvalidatedNested).toBe(false);
    expect(load(['--test-allow-unvalidated-nested']).testAllowUnvalidatedNested).toBe(true);
    expect(load([], { VCPUD_TEST_ALLOW_UNVALIDATED_NESTED: '1' }).testAllowUnvalidatedNested).toBe(true);
    expect(usage()).toMatch(/--test-allow-unvalidated-nested\s+TEST ONLY, never in production/);
  });

  test('a config file mirrors Config (sizes as numbers or strings, socketMode as octal string)', () => {
    const file = writeJson('full.json', {
      listen: 'unix:/tmp/v.sock',
      socketMode: '0640',
      metricsListen: '[::1]:9464',
      limits: { maxMemoryPerVmBytes: '1Gi', maxMemoryTotalBytes: 2147483648 },
      maxMessageBytes: '8Mi',
      exitOnKvmError: true,
    });
    expect(load(['--config', file])).toMatchObject({
      listen: 'unix:/tmp/v.sock',
      socketMode: 0o640,
      metricsListen: '[::1]:9464',
      limits: { maxMemoryPerVmBytes: 1024 ** 3, maxMemoryTotalBytes: 2 * 1024 ** 3 },
      maxMessageBytes: 8 * 1024 ** 2,
      exitOnKvmError: true,
    });
  });
});

describe('sizes and addresses', () => {
  test('parseSize: bytes, binary and decimal units', () => {
    expect(parseSize('1048576')).toBe(1048576);
    expect(parseSize('512Mi')).toBe(512 * 1024 ** 2);
    expect(parseSize('4Gi')).toBe(4 * 1024 ** 3);
    expect(parseSize('2Ki')).toBe(2048);
    expect(parseSize('1Ti')).toBe(1024 ** 4);
    expect(parseSize('1G')).toBe(1e9);
    expect(parseSize('3k')).toBe(3000);
    expect(parseSize(4096)).toBe(4096);
    // vcpuctl's syntax too (src/size.ts): B after a unit, hex
    expect(parseSize('4GB')).toBe(4e9);
    expect(parseSize('0x10')).toBe(16);
    for (const bad of ['', 'Gi', '1.5Gi', '4 gigs', '-1']) expect(() => parseSize(bad)).toThrow(/not a size/);
    expect(() => parseSize(1.5)).toThrow(/whole number/);
  });

  test('listen addresses: unix (both spellings), IPv4, IPv6, host names', () => {
    expect(parseListenAddress('unix:/a/b.sock')).toEqual({ kind: 'unix', path: '/a/b.sock' });
    expect(parseListenAddress('unix:///a/b.sock')).toEqual({ kind: 'unix', path: '/a/b.sock' });
    expect(parseListenAddress('unix:b.sock', '/x')).toEqual({ kind: 'unix', path: '/x/b.sock' });
    // a path is a unix socket, with or without unix:
    expect(parseListenAddress('/a/b.sock')).toEqual({ kind: 'unix', path: '/a/b.sock' });
    expect(parseListenAddress('./b.sock', '/x')).toEqual({ kind: 'unix', path: '/x/b.sock' });
    expect(load(['--listen', '/a/b.sock']).listen).toBe('unix:/a/b.sock');
    expect(() => parseListenAddress('b.sock')).toThrow(/expected unix:PATH, a socket path/);
    expect(parseListenAddress('127.0.0.1:50051')).toEqual({ kind: 'tcp', host: '127.0.0.1', port: 50051 });
    expect(parseListenAddress('[::1]:0')).toEqual({ kind: 'tcp', host: '::1', port: 0 });
    expect(parseListenAddress('vcpud.default.svc:443')).toEqual({ kind: 'tcp', host: 'vcpud.default.svc', port: 443 });
    expect(isLoopbackHost('127.0.0.9')).toBe(true);
    expect(isLoopbackHost('::1')).toBe(true);
    expect(isLoopbackHost('localhost')).toBe(true);
    expect(isLoopbackHost('0.0.0.0')).toBe(false);
    expect(isLoopbackHost('10.0.0.1')).toBe(false);
  });
});

describe('validation messages', () => {
  const tcpTls = ['--listen', '127.0.0.1:7000', '--tls-cert', cert, '--tls-key', key];

  test('unknown flag, stray argument, flag without value', () => {
    expect(problems(['--lisen', 'x'])).toContain('unknown flag --lisen (see --help)');
    expect(problems(['serve'])).toEqual(["unexpected argument 'serve' (flags start with --; see --help)"]);
    expect(problems(['--listen'])).toEqual(['--listen needs a value']);
    expect(problems(['--listen', '--insecure'])).toEqual(['--listen needs a value']);
  });

  test('malformed addresses name their source', () => {
    expect(problems(['--listen', 'localhost'])).toEqual([
      "--listen: malformed address 'localhost': expected unix:PATH, a socket path (/abs/path or ./rel/path) or HOST:PORT ([IPv6]:PORT for IPv6)",
    ]);
    expect(problems(['--listen', '127.0.0.1:70000'])).toEqual(["--listen: malformed address '127.0.0.1:70000': port 70000 is over 65535"]);
    expect(problems([], { VCPUD_LISTEN: '[not-v6]:1' })).toEqual(["VCPUD_LISTEN: malformed address '[not-v6]:1': 'not-v6' is not a host name or IP address"]);
    expect(problems(['--listen', 'unix:'])).toEqual(["--listen: malformed address 'unix:': unix: needs a path"]);
    expect(problems(['--metrics-listen', '9464'])).toEqual(["--metrics-listen: malformed address '9464': expected HOST:PORT ([IPv6]:PORT for IPv6)"]);
    expect(problems(['--health-listen', 'unix:/x'])[0]).toMatch(/^--health-listen: malformed address 'unix:\/x'/);
    expect(problems(['--listen', `unix:/${'x'.repeat(120)}`])[0]).toMatch(/is 121 bytes; the kernel limit is 107/);
  });

  test('TCP needs TLS, or --insecure on loopback only', () => {
    expect(problems(['--listen', '127.0.0.1:7000'])).toEqual(['TCP requires --tls-cert/--tls-key (or --insecure on a loopback address)']);
    expect(problems(['--listen', '0.0.0.0:7000', '--insecure'])).toEqual([
      '--insecure is only allowed on a loopback address (127.0.0.0/8, ::1, localhost), not 0.0.0.0',
    ]);
    expect(problems([...tcpTls, '--insecure'])).toEqual(['--insecure conflicts with --tls-cert/--tls-key: choose plaintext or TLS']);
    expect(load(['--listen', '[::1]:7000', '--insecure']).insecure).toBe(true);
    expect(load(['--listen', 'localhost:7000', '--insecure']).listen).toBe('localhost:7000');
    expect(load(tcpTls).tls).toEqual({ certFile: cert, keyFile: key, allowedClients: [] });
  });

  test('TLS files: pairs, readability, CA for the allowlist, TCP only', () => {
    expect(problems(['--listen', '127.0.0.1:7000', '--tls-cert', cert])).toEqual([
      '--tls-cert and --tls-key must be given together',
      'TCP requires --tls-cert/--tls-key (or --insecure on a loopback address)',
    ]);
    expect(problems(['--listen', '127.0.0.1:7000', '--tls-cert', cert, '--tls-key', path.join(dir, 'missing.key')])).toEqual([
      `--tls-key: cannot read ${path.join(dir, 'missing.key')}: ENOENT`,
    ]);
    expect(problems([...tcpTls, '--tls-ca', dir])).toEqual([`--tls-ca: ${dir} is not a regular file`]);
    expect(problems([...tcpTls, '--allow-client', 'orch'])).toEqual([
      '--allow-client: an allowlist needs --tls-ca (client certificates are verified against it)',
    ]);
    expect(problems(['--tls-ca', ca])).toEqual([`--tls-ca: --tls-ca needs --tls-cert/--tls-key`]);
    expect(problems(['--listen', 'unix:/tmp/x.sock', '--tls-cert', cert, '--tls-key', key])).toEqual([
      '--tls-cert/--tls-key apply to a TCP --listen address; a unix socket is guarded by its file mode',
    ]);
  });

  test('limits and numbers', () => {
    expect(problems(['--max-vms', '-1'])).toEqual(['--max-vms: must not be negative, got -1']);
    expect(problems(['--max-vcpus-per-vm', 'many'])).toEqual(["--max-vcpus-per-vm: expected a whole number, got 'many'"]);
    expect(problems(['--max-memory-per-vm', '-4Gi'])[0]).toMatch(/^--max-memory-per-vm: not a size: '-4Gi'/);
    expect(problems([], { VCPUD_MAX_MEMORY_TOTAL: 'lots' })[0]).toMatch(/^VCPUD_MAX_MEMORY_TOTAL: not a size: 'lots'/);
    expect(problems(['--max-concurrent-streams', '0'])).toEqual(['--max-concurrent-streams: must be at least 1, got 0']);
    expect(problems(['--max-connections', '0'])).toEqual(['--max-connections: must be at least 1, got 0']);
    expect(problems(['--handshake-timeout', '10'])).toEqual(["--handshake-timeout: expected a positive duration such as 10s or 500ms, got '10'"]);
    expect(load(['--handshake-timeout', '2m']).handshakeTimeoutMs).toBe(120_000);
    expect(problems(['--max-message-bytes', '0'])).toEqual(['--max-message-bytes: must be at least 1, got 0']);
    expect(problems(['--socket-mode', '0999'])).toEqual(["--socket-mode: expected an octal file mode such as 0600, got '0999'"]);
    expect(problems(['--log-level', 'verbose'])).toEqual(["--log-level: must be one of debug, info, warn, error, got 'verbose'"]);
    expect(problems([], { VCPUD_INSECURE: 'maybe' })).toEqual(["VCPUD_INSECURE: expected true or false, got 'maybe'"]);
    expect(load(['--max-vms', '0']).limits.maxVms).toBe(0);
  });

  test('config file problems: unreadable, not JSON, unknown keys, bad values', () => {
    const missing = path.join(dir, 'nope.json');
    expect(problems(['--config', missing])[0]).toMatch(new RegExp(`^config file ${missing}: ENOENT`));
    const notJson = writeJson('bad.json', '{ listen: ');
    expect(problems(['--config', notJson])[0]).toMatch(/^config file .*bad\.json: .*JSON/);
    const arr = writeJson('arr.json', []);
    expect(problems(['--config', arr])).toEqual([`config file ${arr}: expected a JSON object`]);
    const unknown = writeJson('unknown.json', { listen: 'unix:/tmp/a.sock', limit: {}, limits: { maxVm: 1 }, tls: { cert: 'x' } });
    expect(problems(['--config', unknown])).toEqual([
      `config file ${unknown}: unknown key 'limit'`,
      `config file ${unknown}: unknown key 'limits.maxVm'`,
      `config file ${unknown}: unknown key 'tls.cert'`,
    ]);
    const bad = writeJson('values.json', { limits: { maxVms: -3 }, insecure: 'sometimes', listen: 42 });
    expect(problems(['--config', bad])).toEqual([
      `config file ${bad}: listen: expected a string, got 42`,
      `config file ${bad}: insecure: expected true or false, got 'sometimes'`,
      `config file ${bad}: limits.maxVms: must not be negative, got -3`,
    ]);
  });

  test('two listeners on one fixed address', () => {
    expect(problems(['--listen', '127.0.0.1:9464', '--insecure'])).toEqual(['address 127.0.0.1:9464 is configured for two listeners']);
  });

  test('all problems are reported together, in one error message', () => {
    let error: ConfigError | undefined;
    try {
      load(['--bogus', '--max-vms', '-2', '--listen', '10.0.0.1:7000', '--insecure', '--log-level', 'loud']);
    } catch (e) {
      error = e as ConfigError;
    }
    expect(error?.problems).toEqual([
      'unknown flag --bogus (see --help)',
      '--max-vms: must not be negative, got -2',
      "--log-level: must be one of debug, info, warn, error, got 'loud'",
      '--insecure is only allowed on a loopback address (127.0.0.0/8, ::1, localhost), not 10.0.0.1',
    ]);
    expect(error?.message).toBe(`invalid configuration:\n${error?.problems.map((p) => `  - ${p}`).join('\n')}`);
  });
});

describe('help', () => {
  test('--help and -h throw HelpRequested carrying usage()', () => {
    expect(wantsHelp(['--listen', 'x', '-h'])).toBe(true);
    expect(() => load(['--help'])).toThrow(HelpRequested);
    expect(() => load(['--bogus', '-h'])).toThrow(usage());
  });

  test('usage() lists every flag with its variable', () => {
    const text = usage();
    for (const flag of [
      '--listen',
      '--metrics-listen',
      '--health-listen',
      '--config',
      '--kvm-path',
      '--tls-cert',
      '--tls-key',
      '--tls-ca',
      '--allow-client',
      '--insecure',
      '--max-vms',
      '--max-vcpus-per-vm',
      '--max-memory-per-vm',
      '--max-memory-total',
      '--log-level',
      '--exit-on-kvm-error',
      '--help',
    ])
      expect(text).toContain(flag);
    expect(text).toContain('[VCPUD_ALLOWED_CLIENTS]');
    expect(text).toContain('[VCPUD_CONFIG]');
  });
});
