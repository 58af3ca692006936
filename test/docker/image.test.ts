/**
 * The container image, built from the Dockerfile and run the way the chart runs it (issue 18).
 *
 * The image is built with the local stand-ins for the public node base images (no registry is
 * reachable here; scripts/provision-docker.sh makes them), then the chart's sidecar-mode pod is
 * rendered with `helm template` and its containers are run by test/docker/chart-pod.ts's
 * translation: uid/gid 10001, read-only root filesystem, every capability dropped,
 * no-new-privileges, /dev/kvm as the device plugin passes it (the node's owner and mode) plus the
 * chart's kvm.groupId, the socket and snapshots on volumes, and no network at all. The probe is the
 * kubelet's gRPC health check, run inside the container on the health port.
 *
 * Prints the image size, the build time and the start-to-SERVING time (BENCHMARKS.md, "The
 * container image"). Bounded: each docker command has a deadline, every wait polls at most 60 s.
 */
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { GUESTS, GUEST_BUILD_DIR } from '../guests/guests';
import { describeDocker, dockerInfo, DockerClient, type DockerInfo } from '../support/docker';
import { dockerRunArgs, renderSidecarPod, type Obj } from './chart-pod';

const ROOT = path.resolve(__dirname, '..', '..');
const VCPUCTL = '/app/dist/src/cli/vcpuctl.js';
const SOCKET_DIR = '/run/vcpud';
const SERVING = 1;
const NOT_SERVING = 2;

/**
 * The kubelet's gRPC probe (grpc.health.v1.Health/Check, service ""), run by the image's node in
 * the container's network namespace: prints the status number (0 when the answer is empty) or
 * "error CODE".
 */
const PROBE = (port: number) => `
const grpc = require('@grpc/grpc-js');
const c = new grpc.Client('127.0.0.1:${port}', grpc.credentials.createInsecure());
c.makeUnaryRequest('/grpc.health.v1.Health/Check', (b) => b, (b) => b, Buffer.alloc(0), { deadline: Date.now() + 2000 },
  (err, res) => { console.log(err ? 'error ' + err.code : String(res.length >= 2 && res[0] === 8 ? res[1] : 0)); process.exit(0); });`;

async function waitFor<T>(what: string, fn: () => Promise<T | undefined>, ms = 60_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The chart's args with --listen (and nothing else) replaced. */
function withListen(args: string[], listen: string): string[] {
  return args.map((a) => (a.startsWith('--listen=') ? `--listen=${listen}` : a));
}

/**
 * Builds the image as `tags[0]` and its build stage as `tags[1]` (all cached after the first), then
 * removes the images those tags named before, when they changed: without this every source change
 * would leave the previous runtime image and build stage behind, untagged, on the machine's disk.
 * The build stage keeps a tag so that the newest one stays as the build cache.
 */
async function buildReplacing(docker: DockerClient, context: string, tags: [string, string], buildArgs: string[]): Promise<void> {
  const idOf = async (tag: string) => (await docker.exec(['image', 'inspect', '--format', '{{.Id}}', tag])).stdout.trim();
  const before = await Promise.all(tags.map(idOf));
  await docker.ok(['build', ...buildArgs, '-t', tags[0], context], 20 * 60_000);
  await docker.ok(['build', ...buildArgs, '--target', 'build', '-t', tags[1], context], 5 * 60_000);
  const after = await Promise.all(tags.map(idOf));
  const stale = before.filter((id) => id && !after.includes(id));
  if (stale.length) await docker.exec(['rmi', ...stale], 120_000);
}

describeDocker('the container image, built and run as the chart runs it', () => {
  const info = dockerInfo as DockerInfo;
  const docker = new DockerClient(info, `vcpud-test-${process.pid}`);
  const kvm = fs.statSync('/dev/kvm');
  const measured: Record<string, string | number> = {};
  let pod: Obj;
  let vcpud: Obj;
  let app: Obj;
  let image: string;
  let healthPort: number;
  let socketVolume: string;
  let source: string;
  let appName: string;
  let vmId: string;

  const probe = async (container: string): Promise<string> => (await docker.exec(['exec', container, 'node', '-e', PROBE(healthPort)], 30_000)).stdout.trim();
  const waitServing = (container: string) => waitFor(`${container} SERVING`, async () => ((await probe(container)) === String(SERVING) ? true : undefined));
  const ctl = async (...args: string[]) => {
    const r = await docker.exec(['exec', appName, 'node', VCPUCTL, ...args], 120_000);
    if (r.code !== 0) throw new Error(`vcpuctl ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
    return r.stdout;
  };
  const ctlJson = async (...args: string[]) => JSON.parse(await ctl('--json', ...args));
  const rbx = async (server: string, vm: string) => BigInt((await ctlJson('--server', server, 'state', 'get', vm, '--section', 'regs')).state.regs.rbx);

  /** Starts the chart's vcpud container; returns its name once the probe says SERVING. */
  async function startVcpud(name: string, podSpec: Obj, volumes: Record<string, string>, args?: string[]): Promise<{ name: string; ms: number }> {
    const container = podSpec.initContainers.find((c: Obj) => c.name === 'vcpud');
    const t0 = Date.now();
    const full = await docker.runDetached(name, dockerRunArgs(podSpec, container, { volumes, args }));
    await waitServing(full);
    return { name: full, ms: Date.now() - t0 };
  }

  beforeAll(async () => {
    execFileSync('bash', [path.join(ROOT, 'scripts', 'provision-helm.sh')], { stdio: ['ignore', 'ignore', 'inherit'], timeout: 300_000 });
    // The chart with the kvm group of this host's /dev/kvm (what `kvm.groupId` is for).
    pod = renderSidecarPod([`kvm.groupId=${kvm.gid}`]);
    vcpud = pod.initContainers.find((c: Obj) => c.name === 'vcpud');
    app = pod.containers.find((c: Obj) => c.name === 'app');
    image = vcpud.image;
    expect(app.image).toBe(image);
    healthPort = vcpud.ports.find((p: Obj) => p.name === 'health').containerPort;
    const t0 = Date.now();
    await buildReplacing(
      docker,
      ROOT,
      [image, `${image}-build`],
      ['--network', 'host', '--build-arg', `BUILD_IMAGE=${info.buildBase}`, '--build-arg', `RUNTIME_IMAGE=${info.runtimeBase}`],
    );
    measured['build (this run; cached when nothing changed)'] = `${Date.now() - t0} ms`;
  }, 21 * 60_000);

  afterAll(async () => {
    await docker.cleanup();
    const left = await docker.exec(['ps', '-a', '-q', '--filter', 'label=vcpud.test']);
    expect(left.stdout.trim()).toBe('');
    console.log(
      `container image measurements:\n${Object.entries(measured)
        .map(([k, v]) => `  ${k}: ${v}`)
        .join('\n')}`,
    );
  }, 120_000);

  test('the runtime image holds only what vcpud runs, owned by root, run as uid 10001', async () => {
    const [user, size] = (await docker.ok(['image', 'inspect', '--format', '{{.Config.User}} {{.Size}}', image])).trim().split(' ');
    expect(user).toBe('10001:10001');
    measured['image size'] = `${(Number(size) / 1e6).toFixed(1)} MB (base ${info.runtimeBase})`;
    const list = await docker.ok(
      [
        'run',
        '--rm',
        '--network',
        'none',
        '--entrypoint',
        '/bin/sh',
        image,
        '-c',
        'for t in gcc cc g++ c++ make python3 node-gyp tsc; do command -v $t || true; done; echo ---; ls /app; echo ---; ' +
          'cd /app/node_modules && ls -d * @*/*; echo ---; stat -c "%u %n" /app /app/dist /app/node_modules',
      ],
      60_000,
    );
    const [tools, appDir, modules, owners] = list.split('---\n').map((s) => s.trim().split('\n').filter(Boolean));
    expect(tools).toEqual([]);
    expect(appDir.sort()).toEqual(['build', 'dist', 'node_modules', 'package.json', 'protos']);
    const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
    // No devDependency, nor what only compilers read (type declarations, the addon's C++ headers).
    expect(modules.filter((m) => m in pkg.devDependencies || m.startsWith('@types/') || m === 'node-addon-api')).toEqual([]);
    expect(modules).toEqual(expect.arrayContaining(['@grpc/grpc-js', '@grpc/proto-loader']));
    expect(owners.map((l) => l.split(' ')[0])).toEqual(['0', '0', '0']);
  }, 120_000);

  test("vcpud runs as the chart's sidecar with no network, /dev/kvm through the kvm group, and serves", async () => {
    socketVolume = await docker.createVolume('socket');
    const snapshots = await docker.createVolume('snapshots-a');
    const started = await startVcpud('a', pod, { 'vcpud-socket': socketVolume, 'vcpud-snapshots': snapshots });
    source = started.name;
    measured['start to SERVING (docker run -d to the probe answering SERVING)'] = `${started.ms} ms`;

    const [netMode, readOnly, user, capDrop, secOpt, groups] = JSON.parse(
      await docker.ok([
        'inspect',
        '--format',
        '[{{json .HostConfig.NetworkMode}},{{json .HostConfig.ReadonlyRootfs}},{{json .Config.User}},{{json .HostConfig.CapDrop}},{{json .HostConfig.SecurityOpt}},{{json .HostConfig.GroupAdd}}]',
        source,
      ]),
    );
    expect({ netMode, readOnly, user, capDrop, secOpt }).toEqual({
      netMode: 'none',
      readOnly: true,
      user: '10001:10001',
      capDrop: ['ALL'],
      secOpt: ['no-new-privileges'],
    });
    expect(groups).toContain(String(kvm.gid));
    // Inside: the process's ids and capabilities, the device as the runtime made it (the host's
    // owner and mode), and no network interface but loopback.
    const inside = await docker.ok([
      'exec',
      source,
      '/bin/sh',
      '-c',
      'id -u; id -g; id -G; grep -E "^Cap(Eff|Prm|Bnd):|^NoNewPrivs:" /proc/1/status; stat -c "%a %u %g" /dev/kvm; ' +
        'tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d " "; touch /app/x 2>&1 || true',
    ]);
    const lines = inside.trim().split('\n');
    expect(lines.slice(0, 2)).toEqual(['10001', '10001']);
    expect(lines[2].split(' ')).toEqual(expect.arrayContaining(['10001', String(kvm.gid)]));
    expect(lines.slice(3, 7).map((l) => l.replace(/\s+/g, ' '))).toEqual([
      'CapPrm: 0000000000000000',
      'CapEff: 0000000000000000',
      'CapBnd: 0000000000000000',
      'NoNewPrivs: 1',
    ]);
    expect(lines[7]).toBe(`${(kvm.mode & 0o777).toString(8)} ${kvm.uid} ${kvm.gid}`);
    expect(lines[8]).toBe('lo');
    expect(lines[9]).toMatch(/Read-only file system/);
    expect(lines).toHaveLength(10);

    // The daemon made no bridge: no docker0 on the host, no bridge network to attach anything to.
    expect(fs.existsSync('/sys/class/net/docker0')).toBe(false);
    expect((await docker.ok(['network', 'ls', '--format', '{{.Driver}}'])).trim().split('\n').sort()).toEqual(['host', 'null']);
  }, 120_000);

  test('without kvm.groupId the same pod cannot open a 0660 /dev/kvm: NOT_SERVING, and the log says why', async () => {
    if ((kvm.mode & 0o006) === 0o006) {
      console.warn('/dev/kvm is world read-write here: the kvm group is not needed, nothing to show');
      return;
    }
    const bare = renderSidecarPod([]);
    const volumes = { 'vcpud-socket': await docker.createVolume('socket-nogroup'), 'vcpud-snapshots': await docker.createVolume('snapshots-nogroup') };
    const name = await docker.runDetached('nogroup', dockerRunArgs(bare, bare.initContainers[0], { volumes }));
    const status = await waitFor('an answer from the probe', async () => {
      const s = await probe(name);
      return /^\d+$/.test(s) ? Number(s) : undefined;
    });
    expect(status).toBe(NOT_SERVING);
    const logs = await docker.exec(['logs', name]);
    expect(logs.stdout + logs.stderr).toMatch(/EACCES|permission denied/i);
  }, 120_000);

  test("vcpuctl from the image, as the chart's app container: caps, create, load, run, GetState, snapshot to the volume", async () => {
    const guestDir = '/guests';
    appName = await docker.runDetached(
      'app',
      dockerRunArgs(pod, app, {
        volumes: { 'vcpud-socket': socketVolume },
        extra: ['--mount', `type=bind,src=${GUEST_BUILD_DIR},dst=${guestDir},readonly`],
      }),
    );
    // The chart's command prints `vcpuctl caps` through the socket, then idles.
    await waitFor('caps in the app container log', async () => {
      const l = await docker.exec(['logs', appName]);
      return /nested/i.test(l.stdout) ? true : undefined;
    });
    const caps = await ctlJson('caps');
    expect(JSON.stringify(caps)).toMatch(/KVM_CAP|capabilit/i);

    const created = await ctlJson('vm', 'create', '--memory', '2Mi', '--vcpus', '1', '--name', 'in-docker');
    vmId = created.vm.id;
    await ctl('load', vmId, `${guestDir}/${path.basename(GUESTS.counter64.file)}`);
    await ctl('run', vmId);
    const server = `unix:${SOCKET_DIR}/vcpud.sock`;
    const first = await waitFor('the counter guest counting', async () => {
      const v = await rbx(server, vmId);
      return v > 0n ? v : undefined;
    });
    await waitFor('the counter advancing', async () => ((await rbx(server, vmId)) > first ? true : undefined));

    await ctl('snapshot', 'create', vmId, 'snap-1');
    expect((await ctl('snapshot', 'list')).toString()).toContain('snap-1');
    // The file is on the snapshot volume, written by uid 10001.
    const mountpoint = (await docker.ok(['volume', 'inspect', '--format', '{{.Mountpoint}}', docker.nameOf('snapshots-a')])).trim();
    const files = fs.readdirSync(mountpoint).filter((f) => f.startsWith('snap-1'));
    expect(files.length).toBeGreaterThan(0);
    expect(fs.statSync(path.join(mountpoint, files[0])).uid).toBe(10001);
  }, 180_000);

  test('a running VM migrates between two containers through the shared socket volume', async () => {
    const snapshots = await docker.createVolume('snapshots-b');
    await startVcpud('b', pod, { 'vcpud-socket': socketVolume, 'vcpud-snapshots': snapshots }, withListen(vcpud.args, `unix:${SOCKET_DIR}/vcpud-b.sock`));
    const from = `unix:${SOCKET_DIR}/vcpud.sock`;
    const to = `unix:${SOCKET_DIR}/vcpud-b.sock`;
    const before = await rbx(from, vmId);
    const t0 = Date.now();
    await ctl('--server', from, 'migrate', vmId, '--to', to, '--dest-name', 'migrated');
    measured['live migration of a 2 MiB VM between the containers (vcpuctl migrate)'] = `${Date.now() - t0} ms`;
    const onDest = (await ctlJson('--server', to, 'vm', 'list')).vms as Obj[];
    expect(onDest).toHaveLength(1);
    const destId: string = onDest[0].id;
    expect((await ctlJson('--server', from, 'vm', 'list')).vms ?? []).toEqual([]);
    const after = await rbx(to, destId);
    expect(after).toBeGreaterThanOrEqual(before);
    await waitFor('the counter advancing on the destination', async () => ((await rbx(to, destId)) > after ? true : undefined));
  }, 180_000);

  test("SIGTERM (docker stop with the pod's grace) ends each vcpud with exit 0, a running VM included", async () => {
    const grace = pod.terminationGracePeriodSeconds ?? 30; // Kubernetes' default when the pod sets none
    for (const name of [docker.nameOf('b'), source]) {
      const t0 = Date.now();
      await docker.ok(['stop', '--time', String(grace), name], (grace + 30) * 1000);
      measured[`SIGTERM to exit, ${name.endsWith('-b') ? 'with a running VM' : 'idle'}`] = `${Date.now() - t0} ms`;
      // 0, not 137: vcpud exited on its own before the grace ran out and SIGKILL came.
      const state = JSON.parse(await docker.ok(['inspect', '--format', '{{json .State}}', name]));
      expect({ exitCode: state.ExitCode, oom: state.OOMKilled, running: state.Running }).toEqual({ exitCode: 0, oom: false, running: false });
    }
  }, 240_000);
});
