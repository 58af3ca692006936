/**
 * The nested lab's QEMU runner: boots Debian's 6.1 kernel under QEMU software emulation of an AMD
 * CPU with SVM (-accel tcg -cpu max), whose /init (scripts/lab/init) loads kvm_amd nested=1 and
 * starts the real vcpud (the built dist/ and addon, inside the initramfs) once per port. Tests on
 * the host talk to those vcpuds over gRPC through QEMU user-networking forwards bound to 127.0.0.1.
 *
 * Transport: inside the guest, QEMU's forward arrives on 10.0.2.15, so vcpud must listen on a
 * non-loopback address, where it (rightly) refuses plaintext. Each run therefore makes a throwaway
 * PKI (test/support/pki.ts) and vcpud serves mTLS, exactly the production TCP configuration; the
 * certificates reach the guest through QEMU fw_cfg (opt/vcpud/*), so the cached initramfs holds
 * no secrets and no per-run state. Nothing leaves the machine: user networking with restrict=on.
 *
 * Shutdown: "stop" on the serial console makes /init SIGTERM every vcpud, report how each exited
 * and power off. QEMU runs under scripts/lab/qemu-guard.sh, which kills it if this process dies
 * without cleaning up; an exit handler here kills it too.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { packageRoot } from '../../src/package';
import { vcpudProto } from '../../src/api/proto';
import { makePki, type Pki } from '../support/pki';

const ROOT = packageRoot();
export const LAB_CACHE = path.join(ROOT, '.cache', 'lab');
export const LAB_JSON = path.join(LAB_CACHE, 'lab.json');
const GUARD = path.join(ROOT, 'scripts', 'lab', 'qemu-guard.sh');
const BUILD_INITRAMFS = path.join(ROOT, 'scripts', 'lab', 'build-initramfs.sh');
/** Where vcpud listens inside the guest: the first instance on GUEST_PORT_BASE, then +1, ... */
const GUEST_PORT_BASE = 7000;

export interface LabInfo {
  kernelVersion: string;
  kernel: string;
  initrd: string;
  key: string;
  bytes: number;
}

/** What scripts/provision-lab.sh recorded, or why the lab cannot run here. */
export function readLabInfo(): { info?: LabInfo; problem?: string } {
  let info: LabInfo;
  try {
    info = JSON.parse(fs.readFileSync(LAB_JSON, 'utf8')) as LabInfo;
  } catch {
    return { problem: `${path.relative(ROOT, LAB_JSON)} is missing: the lab is not provisioned (run bash scripts/provision-lab.sh as root)` };
  }
  for (const f of [info.kernel, info.initrd]) if (!fs.existsSync(f)) return { problem: `${f} is missing: run bash scripts/provision-lab.sh` };
  try {
    execFileSync('qemu-system-x86_64', ['--version'], { stdio: 'ignore' });
  } catch {
    return { problem: 'qemu-system-x86_64 is not installed: run bash scripts/provision-lab.sh as root' };
  }
  return { info };
}

export type Client = grpc.Client & Record<string, Function>;

export interface LabTimings {
  /** ms from spawning QEMU to /init's first line. */
  initMs: number;
  /** ms from spawning QEMU to the last vcpud's "vcpud serving". */
  servingMs: number;
  /** ms from "stop" to QEMU's exit (set by stop()). */
  stopMs?: number;
  /** Guest uptime (s) when /init started, as /init reported it. */
  guestInitS: number;
}

export interface LabVm {
  /** Host ports forwarding to each vcpud instance (index = instance). */
  hostPorts: number[];
  /** One vcpud.v1 client of instance `i` (mTLS, cached). */
  client(service: 'VcpuStateService' | 'VmService' | 'SnapshotService', instance?: number): Client;
  /** This run's PKI: a client certificate (`client`) that every instance accepts. */
  pki: Pki;
  /** The port instance `i` listens on inside the guest (for vcpud-to-vcpud calls such as MigrateVm). */
  guestPorts: number[];
  /** The serial console so far (kernel, /init and every vcpud's log lines). */
  console(): string;
  /** The "vcpud serving" log record of each instance. */
  serving: Record<string, unknown>[];
  timings: LabTimings;
  qemuPid: number;
  /**
   * SIGTERM to instance `i`'s vcpud and the same vcpud started again (its state directory kept:
   * the restart handover); resolves to the old process's exit status once the new one serves.
   */
  restart(instance: number): Promise<{ exit: number; servingMs: number }>;
  /** Powers off cleanly; resolves to each vcpud's exit status (by instance) and QEMU's. */
  stop(): Promise<{ vcpudExits: (number | null)[]; qemuExit: number | null }>;
}

export interface LabOptions {
  /** vcpud processes to start in the guest (default 1). */
  instances?: number;
  /** Extra vcpud flags for every instance. */
  vcpudArgs?: string[];
  /** Give up when the last vcpud is not serving after this long (default 180 s). */
  bootTimeoutMs?: number;
  /** Guest RAM (default 2048 MiB, the doc's size with Node inside). */
  memoryMiB?: number;
  /** Every vcpud gets --state-dir /run/state.PORT (tmpfs), so restart() hands its VMs over. */
  stateDirs?: boolean;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Resolves to 'timeout' after `ms` unless `p` settles first; never leaves a timer behind. */
async function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

const running = new Set<ChildProcess>();
const qemuPids = new Set<number>();
let exitHookInstalled = false;
function killEverything(): void {
  for (const pid of qemuPids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      /* already gone */
    }
  }
  for (const p of running) p.kill('SIGKILL');
}

/** Boots the lab VM and waits until every vcpud instance in it serves. */
export async function startLabVm(opts: LabOptions = {}): Promise<LabVm> {
  const { info, problem } = readLabInfo();
  if (!info) throw new Error(problem);
  // Keep the initramfs in step with the current dist/ and addon (about a second when unchanged).
  execFileSync('bash', [BUILD_INITRAMFS, info.kernelVersion], { stdio: ['ignore', 'ignore', 'pipe'] });
  const fresh = readLabInfo().info!;
  // A host port found free can be taken before QEMU binds it: then try again with new ports.
  for (let attempt = 1; ; attempt++) {
    try {
      return await boot(fresh, opts);
    } catch (e) {
      if (attempt >= 3 || !/Could not set up host forwarding rule/.test((e as Error).message)) throw e;
    }
  }
}

async function boot(fresh: LabInfo, opts: LabOptions): Promise<LabVm> {
  const instances = opts.instances ?? 1;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-lab-'));
  const pki = makePki(path.join(dir, 'pki'));
  pki.issue('client', '/CN=lab-client', 'extendedKeyUsage=clientAuth\n');
  const guestPorts = Array.from({ length: instances }, (_, i) => GUEST_PORT_BASE + i);
  const hostPorts: number[] = [];
  for (let i = 0; i < instances; i++) hostPorts.push(await freePort());
  const env = path.join(dir, 'lab.env');
  fs.writeFileSync(
    env,
    `VCPUD_PORTS="${guestPorts.join(' ')}"\nVCPUD_ARGS="${(opts.vcpudArgs ?? []).join(' ')}"\nVCPUD_STATE_DIRS=${opts.stateDirs ? 1 : 0}\n`,
  );
  const pidfile = path.join(dir, 'qemu.pid');

  const fwd = guestPorts.map((g, i) => `hostfwd=tcp:127.0.0.1:${hostPorts[i]}-:${g}`).join(',');
  const fwcfg = (name: string, file: string) => ['-fw_cfg', `name=opt/vcpud/${name},file=${file}`];
  const qemuArgs = [
    '-accel',
    'tcg',
    '-machine',
    'q35',
    '-cpu',
    'max',
    '-smp',
    '1',
    '-m',
    String(opts.memoryMiB ?? 2048),
    '-nodefaults',
    '-no-user-config',
    '-nographic',
    '-no-reboot',
    '-serial',
    'stdio',
    '-kernel',
    fresh.kernel,
    '-initrd',
    fresh.initrd,
    '-append',
    'console=ttyS0 panic=-1 loglevel=4 mitigations=off',
    '-netdev',
    `user,id=n0,restrict=on,${fwd}`,
    // romfile=: no iPXE option ROM (we boot -kernel directly; the ROM only costs boot time).
    '-device',
    'virtio-net-pci,netdev=n0,romfile=',
    ...fwcfg('lab.env', env),
    ...fwcfg('ca.crt', pki.file('ca.crt')),
    ...fwcfg('server.crt', pki.file('server.crt')),
    ...fwcfg('server.key', pki.file('server.key')),
    '-pidfile',
    pidfile,
  ];

  const t0 = Date.now();
  const proc = spawn('bash', [GUARD, String(process.pid), 'qemu-system-x86_64', ...qemuArgs], { stdio: ['pipe', 'pipe', 'pipe'] });
  running.add(proc);
  if (!exitHookInstalled) {
    exitHookInstalled = true;
    process.on('exit', killEverything);
  }
  let out = '';
  let initMs = 0;
  let guestInitS = 0;
  const serving: Record<string, unknown>[] = new Array(instances);
  /** "vcpud serving" lines seen per instance (a restart adds one), and each restart's exit status. */
  const servedCount: number[] = new Array(instances).fill(0);
  const restartExits: (number | undefined)[] = new Array(instances);
  const exits: (number | null)[] = new Array(instances).fill(null);
  let qemuExit: number | null | undefined;
  const exited = new Promise<number | null>((resolve) =>
    proc.on('exit', (code) => {
      running.delete(proc);
      qemuExit = code;
      resolve(code);
    }),
  );
  let pending = '';
  const onLine = (line: string) => {
    // (SeaBIOS leaves terminal escapes in front of /init's first line)
    let m = /lab: init at ([\d.]+) s/.exec(line);
    if (m) {
      initMs = Date.now() - t0;
      guestInitS = Number(m[1]);
    }
    m = /^lab: vcpud\[(\d+)\] exited (\d+)/.exec(line);
    if (m) exits[guestPorts.indexOf(Number(m[1]))] = Number(m[2]);
    m = /^lab: vcpud\[(\d+)\] restarting after exit (\d+)/.exec(line);
    if (m) restartExits[guestPorts.indexOf(Number(m[1]))] = Number(m[2]);
    m = /^vcpud\[(\d+)\]: (\{.*"msg":"vcpud serving".*\})\s*$/.exec(line);
    if (m) {
      serving[guestPorts.indexOf(Number(m[1]))] = JSON.parse(m[2]);
      servedCount[guestPorts.indexOf(Number(m[1]))]++;
    }
  };
  const onData = (d: Buffer) => {
    const s = d.toString('latin1');
    out += s;
    pending += s;
    const lines = pending.split(/\r?\n/);
    pending = lines.pop()!;
    for (const l of lines) onLine(l.replace(/\r/g, ''));
  };
  proc.stdout!.on('data', onData);
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString('latin1')));

  const tail = () => out.slice(-6000);
  const qemuPid = await new Promise<number>((resolve, reject) => {
    const deadline = Date.now() + 10_000;
    const poll = () => {
      try {
        const pid = Number(fs.readFileSync(pidfile, 'utf8').trim());
        if (pid > 0) return resolve(pid);
      } catch {
        /* not yet */
      }
      if (qemuExit !== undefined) return reject(new Error(`QEMU exited with ${qemuExit} at start:\n${tail()}`));
      if (Date.now() > deadline) return reject(new Error(`QEMU wrote no pidfile within 10 s:\n${tail()}`));
      setTimeout(poll, 50);
    };
    poll();
  });
  qemuPids.add(qemuPid);

  const cleanupFailed = async () => {
    proc.kill('SIGTERM');
    await within(exited, 5000);
    killEverything();
    qemuPids.delete(qemuPid);
    fs.rmSync(dir, { recursive: true, force: true });
  };

  try {
    await new Promise<void>((resolve, reject) => {
      const deadline = Date.now() + (opts.bootTimeoutMs ?? 180_000);
      const poll = () => {
        const failed = /^lab: FAILED: .*$/m.exec(out);
        if (failed) return reject(new Error(`the lab VM's /init failed (${failed[0]}):\n${tail()}`));
        if (qemuExit !== undefined) return reject(new Error(`QEMU exited with ${qemuExit} before every vcpud served:\n${tail()}`));
        if (serving.filter(Boolean).length === instances) return resolve();
        if (Date.now() > deadline) return reject(new Error(`vcpud did not serve within ${opts.bootTimeoutMs ?? 180_000} ms:\n${tail()}`));
        setTimeout(poll, 50);
      };
      poll();
    });
  } catch (e) {
    await cleanupFailed();
    throw e;
  }
  const timings: LabTimings = { initMs, servingMs: Date.now() - t0, guestInitS };

  const proto = vcpudProto();
  const creds = grpc.credentials.createSsl(pki.pem('ca.crt'), pki.pem('client.key'), pki.pem('client.crt'));
  const clients = new Map<string, Client>();
  return {
    pki,
    guestPorts,
    hostPorts,
    serving,
    timings,
    qemuPid,
    console: () => out,
    client(service, instance = 0) {
      const k = `${service}/${instance}`;
      let c = clients.get(k);
      if (!c) {
        const Ctor = proto.vcpud.v1[service] as unknown as grpc.ServiceClientConstructor;
        c = new Ctor(`127.0.0.1:${hostPorts[instance]}`, creds, {
          // The server certificate names localhost (and 127.0.0.1); an IP as TLS SNI is not allowed.
          'grpc.ssl_target_name_override': 'localhost',
          'grpc.max_receive_message_length': 64 * 1024 * 1024,
          'grpc.max_send_message_length': 64 * 1024 * 1024,
        }) as Client;
        clients.set(k, c);
      }
      return c;
    },
    async restart(instance) {
      // The old process's connections end with it: clients of it are made anew.
      for (const [k, c] of clients) {
        if (!k.endsWith(`/${instance}`)) continue;
        c.close();
        clients.delete(k);
      }
      const before = servedCount[instance];
      restartExits[instance] = undefined;
      const t = Date.now();
      proc.stdin!.write(`restart ${guestPorts[instance]}\n`);
      const deadline = t + 120_000;
      while (servedCount[instance] === before) {
        if (qemuExit !== undefined) throw new Error(`QEMU exited during the restart:\n${tail()}`);
        if (Date.now() > deadline) throw new Error(`vcpud[${guestPorts[instance]}] did not serve again within 120 s:\n${tail()}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      return { exit: restartExits[instance] ?? -1, servingMs: Date.now() - t };
    },
    async stop() {
      for (const c of clients.values()) c.close();
      const s0 = Date.now();
      if (qemuExit === undefined) {
        proc.stdin!.write('stop\n');
        if ((await within(exited, 60_000)) === 'timeout') {
          proc.kill('SIGTERM');
          await within(exited, 5000);
          killEverything();
        }
      }
      timings.stopMs = Date.now() - s0;
      qemuPids.delete(qemuPid);
      fs.rmSync(dir, { recursive: true, force: true });
      return { vcpudExits: exits, qemuExit: qemuExit ?? null };
    },
  };
}

/** True while a process with this pid exists. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
