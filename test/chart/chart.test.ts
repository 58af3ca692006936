/**
 * The Helm chart (helm/vcpud): scripts/chart-check.sh provisions helm, lints and renders every
 * ci/*-values.yaml into .cache/chart-render/, checks the generated schema for drift and runs
 * yamllint; then every rendered object is validated with kubernetes-models and the chart's
 * invariants are asserted: security context, gRPC probes on the health port, the KVM device
 * resource (or the explicit privileged fallback), standard labels, monitor port names, the native
 * sidecar sharing the socket, the test hook, the read-only TLS Secret, the snapshot directory
 * (--snapshot-dir on a mounted volume, in both modes and through the named templates), the connection,
 * request and migration flags (vcpud's defaults, every value rendered in both modes), the migration client
 * TLS Secret and the README's NetworkPolicy for the migration data port. Invalid values must be
 * rejected by values.schema.json, and the rendered vcpud flags must be accepted by vcpud's own
 * configuration parser.
 *
 * kubernetes-models 4.5 (and its cert-manager / prometheus-operator companions 4.4) ship CommonJS
 * beside ESM and support Node 20; 5.x is ESM-only and requires Node >= 22. So plain imports work
 * under jest's @swc/jest CommonJS transform without an ESM loader.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseAllDocuments } from 'yaml';
import { ServiceAccount } from 'kubernetes-models/v1/ServiceAccount';
import { Service } from 'kubernetes-models/v1/Service';
import { Pod } from 'kubernetes-models/v1/Pod';
import { DaemonSet } from 'kubernetes-models/apps/v1/DaemonSet';
import { Deployment } from 'kubernetes-models/apps/v1/Deployment';
import { Certificate } from '@kubernetes-models/cert-manager/cert-manager.io/v1/Certificate';
import { PodMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor';
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';
import { PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule';
import { NetworkPolicy } from 'kubernetes-models/networking.k8s.io/v1/NetworkPolicy';
import { ConfigError, defaultConfig, loadConfig, type Config } from '../../src/server/config';

type Obj = Record<string, any>;

const ROOT = path.resolve(__dirname, '..', '..');
const CHART = path.join(ROOT, 'helm', 'vcpud');
const RENDER = path.join(ROOT, '.cache', 'chart-render');
const HELM = path.join(ROOT, '.cache', 'helm', 'helm');
const RELEASE = 'vcpud';
const NAMESPACE = 'vcpud-system';
const KVM_RESOURCE = 'devices.kubevirt.io/kvm';
const HEALTH_PORT = 50052;
const SNAPSHOT_DIR = '/var/lib/vcpud/snapshots';
const SNAPSHOT_VOLUME = 'vcpud-snapshots';

/** apiVersion/kind -> the kubernetes-models class that validates it. */
const MODELS: Record<string, new (data: any) => { validate(): void }> = {
  'v1/ServiceAccount': ServiceAccount,
  'v1/Service': Service,
  'v1/Pod': Pod,
  'apps/v1/DaemonSet': DaemonSet,
  'apps/v1/Deployment': Deployment,
  'cert-manager.io/v1/Certificate': Certificate,
  'monitoring.coreos.com/v1/PodMonitor': PodMonitor,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor,
  'monitoring.coreos.com/v1/PrometheusRule': PrometheusRule,
};

const CI_FILES = fs
  .readdirSync(path.join(CHART, 'ci'))
  .filter((f) => f.endsWith('-values.yaml'))
  .sort();
const CASES = CI_FILES.map((f) => f.replace(/-values\.yaml$/, ''));

function parseManifests(text: string): Obj[] {
  // YAML 1.1, as Kubernetes reads manifests (0440 is octal there).
  return parseAllDocuments(text, { version: '1.1' })
    .map((d) => {
      if (d.errors.length) throw new Error(d.errors.map((e) => e.message).join('\n'));
      return d.toJS() as Obj | null;
    })
    .filter((o): o is Obj => o !== null && typeof o === 'object');
}

function helm(args: string[]): { status: number; stdout: string; stderr: string } {
  const r = spawnSync(HELM, args, { cwd: ROOT, encoding: 'utf8' });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function template(extra: string[]): Obj[] {
  const r = helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, ...extra]);
  if (r.status !== 0) throw new Error(`helm template ${extra.join(' ')} failed:\n${r.stderr}`);
  return parseManifests(r.stdout);
}

/** Pod specs of an object with their labels: Pods, and the templates of workloads. */
function podsOf(o: Obj): { labels: Obj; spec: Obj; owner: Obj }[] {
  if (o.kind === 'Pod') return [{ labels: o.metadata?.labels ?? {}, spec: o.spec, owner: o }];
  if (o.kind === 'DaemonSet' || o.kind === 'Deployment') return [{ labels: o.spec.template.metadata?.labels ?? {}, spec: o.spec.template.spec, owner: o }];
  return [];
}

const allContainers = (spec: Obj): Obj[] => [...(spec.initContainers ?? []), ...(spec.containers ?? [])];
const vcpudContainers = (spec: Obj): Obj[] => allContainers(spec).filter((c) => c.name === 'vcpud');
const isTestHook = (o: Obj): boolean => o.metadata?.annotations?.['helm.sh/hook'] === 'test';
const portNamed = (c: Obj, name: string): Obj | undefined => (c.ports ?? []).find((p: Obj) => p.name === name);
const argValue = (c: Obj, flag: string): string | undefined => (c.args ?? []).find((a: string) => a.startsWith(`${flag}=`))?.slice(flag.length + 1);
const matches = (selector: Obj, labels: Obj): boolean => Object.entries(selector).every(([k, v]) => labels[k] === v);

/** The securityContext a container effectively runs with: its own over the pod's. */
function effectiveSecurity(spec: Obj, c: Obj): Obj {
  return { ...(spec.securityContext ?? {}), ...(c.securityContext ?? {}) };
}

function expectRestricted(spec: Obj, c: Obj, where: string): void {
  const sc = effectiveSecurity(spec, c);
  expect({ where, runAsNonRoot: sc.runAsNonRoot }).toEqual({ where, runAsNonRoot: true });
  expect({ where, uid: typeof sc.runAsUser === 'number' && sc.runAsUser > 0 }).toEqual({ where, uid: true });
  expect({ where, readOnlyRootFilesystem: sc.readOnlyRootFilesystem }).toEqual({ where, readOnlyRootFilesystem: true });
  expect({ where, drop: sc.capabilities?.drop }).toEqual({ where, drop: ['ALL'] });
  expect({ where, add: sc.capabilities?.add }).toEqual({ where, add: undefined });
  expect({ where, seccomp: sc.seccompProfile?.type }).toEqual({ where, seccomp: 'RuntimeDefault' });
}

describe('helm chart helm/vcpud', () => {
  const rendered = new Map<string, Obj[]>();

  beforeAll(() => {
    // Provisions helm (first run: an npm pack of ~34 MB) and yamllint, then lints and renders.
    execFileSync('bash', [path.join(ROOT, 'scripts', 'chart-check.sh')], { cwd: ROOT, stdio: ['ignore', 'inherit', 'inherit'] });
    for (const name of CASES) rendered.set(name, parseManifests(fs.readFileSync(path.join(RENDER, `${name}.yaml`), 'utf8')));
  }, 600_000);

  test('the ci values cover daemonset, cert-manager + monitors, sidecar and the privileged fallback', () => {
    expect(CASES).toEqual(expect.arrayContaining(['daemonset', 'daemonset-certmanager-monitoring', 'sidecar', 'privileged-fallback']));
  });

  describe.each(CASES)('ci/%s-values.yaml', (name) => {
    const objects = (): Obj[] => rendered.get(name) as Obj[];
    const values = fs.readFileSync(path.join(CHART, 'ci', `${name}-values.yaml`), 'utf8');
    const fallback = /privilegedHostPath:\s*true/.test(values);
    const mode = /^mode:\s*sidecar/m.test(values) ? 'sidecar' : 'daemonset';
    const pods = (): { labels: Obj; spec: Obj; owner: Obj }[] => objects().flatMap(podsOf);

    test('every object validates against kubernetes-models', () => {
      expect(objects().length).toBeGreaterThan(0);
      for (const o of objects()) {
        const model = MODELS[`${o.apiVersion}/${o.kind}`];
        if (!model) throw new Error(`no kubernetes-models class for ${o.apiVersion} ${o.kind} (add it to MODELS)`);
        try {
          new model(o).validate();
        } catch (e) {
          throw new Error(`${o.kind} ${o.metadata?.name}: ${(e as Error).message}`);
        }
      }
    });

    test('every object carries the standard app.kubernetes.io labels', () => {
      for (const o of objects()) {
        const labels = o.metadata?.labels ?? {};
        expect({ kind: o.kind, labels }).toMatchObject({
          kind: o.kind,
          labels: {
            'app.kubernetes.io/name': 'vcpud',
            'app.kubernetes.io/instance': RELEASE,
            'app.kubernetes.io/version': '0.1.0',
            'app.kubernetes.io/managed-by': 'Helm',
            'app.kubernetes.io/component': expect.any(String),
            'helm.sh/chart': 'vcpud-0.1.0',
          },
        });
        expect(o.metadata.namespace).toBe(NAMESPACE);
      }
      for (const { labels, owner } of pods()) {
        if (owner.kind === 'Pod') continue;
        expect(labels).toMatchObject(owner.spec.selector.matchLabels);
        expect(labels['app.kubernetes.io/version']).toBe('0.1.0');
      }
    });

    test('vcpud containers: non-root, no capabilities, read-only root, seccomp; privileged only under the fallback', () => {
      const all = pods();
      expect(all.some(({ spec }) => vcpudContainers(spec).length > 0)).toBe(true);
      for (const { spec, owner } of all) {
        for (const c of allContainers(spec)) {
          const where = `${owner.kind}/${owner.metadata.name}/${c.name}`;
          const sc = effectiveSecurity(spec, c);
          expectRestricted(spec, c, where);
          if (c.name === 'vcpud') expect({ where, uid: sc.runAsUser }).toEqual({ where, uid: 10001 });
          if (fallback && c.name === 'vcpud') {
            expect({ where, privileged: sc.privileged, escalation: sc.allowPrivilegeEscalation }).toEqual({
              where,
              privileged: true,
              escalation: true, // Kubernetes rejects privileged with allowPrivilegeEscalation false
            });
          } else {
            expect({ where, privileged: sc.privileged ?? false }).toEqual({ where, privileged: false });
            expect({ where, escalation: sc.allowPrivilegeEscalation }).toEqual({ where, escalation: false });
          }
        }
        expect(spec.hostNetwork ?? false).toBe(false);
        expect(spec.hostPID ?? false).toBe(false);
        expect(spec.automountServiceAccountToken).toBe(false);
      }
    });

    test('every volumeMount names a volume of its pod (kubernetes-models checks shapes, not references)', () => {
      for (const { spec, owner } of pods()) {
        const volumes = (spec.volumes ?? []).map((v: Obj) => v.name);
        for (const c of allContainers(spec)) {
          for (const m of c.volumeMounts ?? []) {
            const where = `${owner.kind}/${owner.metadata.name}/${c.name}`;
            expect({ where, mount: m.name, found: volumes.includes(m.name) }).toEqual({ where, mount: m.name, found: true });
          }
        }
      }
    });

    test('probes are gRPC on the integer health port vcpud serves plaintext health on', () => {
      for (const { spec } of pods()) {
        for (const c of vcpudContainers(spec)) {
          const health = portNamed(c, 'health');
          expect(health?.containerPort).toBe(HEALTH_PORT);
          expect(argValue(c, '--health-listen')).toBe(`0.0.0.0:${health?.containerPort}`);
          for (const probe of ['livenessProbe', 'readinessProbe', 'startupProbe']) {
            const p = c[probe];
            expect(p).toBeDefined();
            expect(Object.keys(p).filter((k) => ['grpc', 'httpGet', 'tcpSocket', 'exec'].includes(k))).toEqual(['grpc']);
            expect(Number.isInteger(p.grpc.port)).toBe(true);
            expect(p.grpc.port).toBe(health?.containerPort);
          }
          const metrics = portNamed(c, 'metrics');
          expect(metrics).toBeDefined();
          expect(argValue(c, '--metrics-listen')).toBe(`0.0.0.0:${metrics?.containerPort}`);
        }
      }
    });

    test(fallback ? '/dev/kvm: hostPath + privileged fallback, no device resource' : '/dev/kvm: the device-plugin resource', () => {
      for (const { spec, owner } of pods()) {
        for (const c of vcpudContainers(spec)) {
          const where = `${owner.kind}/${owner.metadata.name}`;
          const limits = c.resources?.limits ?? {};
          const kvmVolumes = (spec.volumes ?? []).filter((v: Obj) => v.hostPath);
          if (fallback) {
            expect({ where, limit: limits[KVM_RESOURCE] }).toEqual({ where, limit: undefined });
            expect(kvmVolumes).toEqual([{ name: 'kvm', hostPath: { path: '/dev/kvm', type: 'CharDevice' } }]);
            expect(c.volumeMounts).toContainEqual({ name: 'kvm', mountPath: '/dev/kvm' });
          } else {
            expect({ where, limit: limits[KVM_RESOURCE] }).toEqual({ where, limit: '1' });
            if (c.resources?.requests) expect(c.resources.requests[KVM_RESOURCE]).toBe('1');
            expect({ where, hostPath: kvmVolumes }).toEqual({ where, hostPath: [] });
          }
        }
      }
    });

    test('the rendered vcpud flags are accepted by vcpud itself (only the TLS files are missing here)', () => {
      for (const { spec } of pods()) {
        for (const c of vcpudContainers(spec)) {
          let problems: string[] = [];
          try {
            loadConfig(c.args, {}, '/');
          } catch (e) {
            if (!(e instanceof ConfigError)) throw e;
            problems = e.problems;
          }
          expect(problems.filter((p) => !/cannot read \/etc\/vcpud\/(migration-)?tls\/(tls\.crt|tls\.key|ca\.crt)/.test(p))).toEqual([]);
        }
      }
    });

    test("a PrometheusRule, when enabled, holds files/alerts.yaml's groups as they are", () => {
      const rules = objects().filter((o) => o.kind === 'PrometheusRule');
      expect(rules.length).toBe(/prometheusRule:\s*\n\s*enabled:\s*true/.test(values) ? 1 : 0);
      const file = parseAllDocuments(fs.readFileSync(path.join(CHART, 'files/alerts.yaml'), 'utf8'))[0].toJS() as { groups: unknown[] };
      for (const r of rules) expect(r.spec).toEqual({ groups: file.groups });
    });

    test('monitor port names match a container or Service port name', () => {
      const monitors = objects().filter((o) => o.kind === 'PodMonitor' || o.kind === 'ServiceMonitor');
      if (/podMonitor:\s*\n\s*enabled:\s*true/.test(values)) expect(monitors.some((m) => m.kind === 'PodMonitor')).toBe(true);
      if (/serviceMonitor:\s*\n\s*enabled:\s*true/.test(values)) expect(monitors.some((m) => m.kind === 'ServiceMonitor')).toBe(true);
      for (const m of monitors) {
        const selector = m.spec.selector.matchLabels;
        if (m.kind === 'PodMonitor') {
          const selected = pods().filter(({ labels, owner }) => !isTestHook(owner) && matches(selector, labels));
          expect(selected.length).toBeGreaterThan(0);
          for (const ep of m.spec.podMetricsEndpoints) {
            for (const { spec } of selected) {
              expect(allContainers(spec).some((c) => portNamed(c, ep.port))).toBe(true);
            }
          }
        } else {
          const services = objects().filter((o) => o.kind === 'Service' && matches(selector, o.metadata.labels));
          expect(services.length).toBeGreaterThan(0);
          for (const ep of m.spec.endpoints) {
            for (const s of services) {
              const sp = s.spec.ports.find((p: Obj) => p.name === ep.port);
              expect(sp).toBeDefined();
              // ...and the Service port reaches the container port of that name.
              const backends = pods().filter(({ labels }) => matches(s.spec.selector, labels));
              for (const { spec } of backends) expect(vcpudContainers(spec).some((c) => portNamed(c, sp.targetPort))).toBe(true);
            }
          }
        }
      }
    });

    test('a helm test hook runs vcpuctl caps against the release', () => {
      const hooks = objects().filter(isTestHook);
      expect(hooks).toHaveLength(1);
      const [hook] = hooks;
      expect(hook.kind).toBe('Pod');
      expect(hook.spec.restartPolicy).toBe('Never');
      const ctl = hook.spec.containers.find((c: Obj) => c.name === 'vcpuctl');
      expect(ctl.command).toEqual(['node', '/app/dist/src/cli/vcpuctl.js']);
      expect(ctl.args[ctl.args.length - 1]).toBe('caps');
      const server = argValue(ctl, '--server') as string;
      if (mode === 'daemonset') {
        // mTLS through the Service, whose certificate names it, with a client certificate.
        const service = objects().find((o) => o.kind === 'Service') as Obj;
        expect(server).toBe(`${service.metadata.name}.${NAMESPACE}.svc:${service.spec.ports[0].port}`);
        expect(service.spec.ports[0].name).toBe('grpc');
        for (const f of ['ca.crt', 'tls.crt', 'tls.key'])
          expect(ctl.args).toContain(`--tls-${f === 'ca.crt' ? 'ca' : f === 'tls.crt' ? 'cert' : 'key'}=/etc/vcpud/client-tls/${f}`);
        expect(ctl.volumeMounts).toContainEqual({ name: 'client-tls', mountPath: '/etc/vcpud/client-tls', readOnly: true });
        const cert = objects().find((o) => o.kind === 'Certificate' && o.spec.usages.includes('server auth'));
        if (cert) expect(cert.spec.dnsNames).toContain(server.split(':')[0]);
      } else {
        // Its own vcpud sidecar, called over the shared socket from another uid.
        expect(server).toBe('unix:/run/vcpud/vcpud.sock');
        expect(vcpudContainers(hook.spec)[0].restartPolicy).toBe('Always');
        expect(effectiveSecurity(hook.spec, ctl).runAsUser).not.toBe(10001);
      }
    });

    if (mode === 'daemonset') {
      test('daemonset: mTLS on TCP with the TLS Secret mounted read-only, a Service in front', () => {
        const ds = objects().find((o) => o.kind === 'DaemonSet') as Obj;
        expect(ds).toBeDefined();
        const spec = ds.spec.template.spec;
        const [c] = vcpudContainers(spec);
        expect(argValue(c, '--listen')).toBe(`0.0.0.0:${portNamed(c, 'grpc')?.containerPort}`);
        expect(argValue(c, '--tls-cert')).toBe('/etc/vcpud/tls/tls.crt');
        expect(argValue(c, '--tls-key')).toBe('/etc/vcpud/tls/tls.key');
        expect(argValue(c, '--tls-ca')).toBe('/etc/vcpud/tls/ca.crt');
        expect(c.args).not.toContain('--insecure');
        expect(c.volumeMounts).toContainEqual({ name: 'tls', mountPath: '/etc/vcpud/tls', readOnly: true });
        const tls = spec.volumes.find((v: Obj) => v.name === 'tls');
        expect(tls.secret.secretName).toMatch(/.+/);
        expect(tls.secret.defaultMode).toBe(0o440);
        const cert = objects().find((o) => o.kind === 'Certificate' && o.spec.usages.includes('server auth'));
        if (/certManager:\s*\n\s*enabled:\s*true/.test(values)) expect(cert?.spec.secretName).toBe(tls.secret.secretName);
        const svc = objects().find((o) => o.kind === 'Service') as Obj;
        expect(svc.spec.selector).toEqual(ds.spec.selector.matchLabels);
        for (const p of svc.spec.ports) expect(portNamed(c, p.targetPort)).toBeDefined();
      });
    } else {
      test('sidecar: vcpud is a native sidecar sharing an emptyDir socket with the app container', () => {
        const deploy = objects().find((o) => o.kind === 'Deployment') as Obj;
        expect(deploy).toBeDefined();
        const spec = deploy.spec.template.spec;
        expect(spec.containers.map((c: Obj) => c.name)).toEqual(['app']);
        const [sidecar] = spec.initContainers;
        expect(sidecar.name).toBe('vcpud');
        expect(sidecar.restartPolicy).toBe('Always');
        expect(argValue(sidecar, '--listen')).toBe('unix:/run/vcpud/vcpud.sock');
        expect(argValue(sidecar, '--socket-mode')).toBe('0660');
        const mount = sidecar.volumeMounts.find((m: Obj) => m.mountPath === '/run/vcpud');
        const volume = spec.volumes.find((v: Obj) => v.name === mount.name);
        expect(volume.emptyDir).toBeDefined();
        const [app] = spec.containers;
        expect(app.volumeMounts).toContainEqual({ name: mount.name, mountPath: '/run/vcpud' });
        expect(app.env).toContainEqual({ name: 'VCPUD_ADDR', value: 'unix:/run/vcpud/vcpud.sock' });
        // Another uid reaches the 0660 socket through the pod's fsGroup, vcpud's group.
        expect(effectiveSecurity(spec, app).runAsUser).not.toBe(10001);
        expect(spec.securityContext.fsGroup).toBe(effectiveSecurity(spec, sidecar).runAsGroup);
        expect(objects().some((o) => o.kind === 'Service' || o.kind === 'DaemonSet')).toBe(false);
      });
    }
  });

  test('monitors and certificates are gated on their APIs being served', () => {
    const objects = template(['-f', path.join(CHART, 'ci', 'daemonset-certmanager-monitoring-values.yaml')]);
    const kinds = objects.map((o) => o.kind);
    expect(kinds).toEqual(expect.arrayContaining(['DaemonSet', 'Service', 'Pod']));
    expect(kinds).not.toContain('Certificate');
    expect(kinds).not.toContain('PodMonitor');
    expect(kinds).not.toContain('ServiceMonitor');
  });

  test.each([
    ['mode: bogus', ['--set', 'mode=bogus'], /mode.*(daemonset|one of)/],
    ['a string for a port', ['--set-string', 'ports.health=abc'], /ports\.health.*integer/],
    ['a port out of range', ['--set', 'ports.grpc=70000'], /ports\.grpc/],
    ['an unknown log level', ['--set', 'vcpud.logLevel=verbose'], /vcpud\.logLevel/],
    ['a size that is no size', ['--set', 'vcpud.limits.maxMemoryTotal=lots'], /maxMemoryTotal/],
    ['a non-octal socket mode', ['--set', 'sidecar.socketMode=0999'], /socketMode/],
    ['a relative snapshot dir', ['--set', 'snapshots.dir=var/lib/vcpud/snapshots'], /snapshots\.dir/],
    ['a snapshot dir with a ".." component', ['--set', 'snapshots.dir=/var/lib/../snapshots'], /snapshots\.dir/],
    ['the root as snapshot dir', ['--set', 'snapshots.dir=/'], /snapshots\.dir/],
    ['two snapshot volume sources', ['--set', 'snapshots.volume.hostPath.path=/x,snapshots.volume.persistentVolumeClaim.claimName=y'], /snapshots\.volume/],
    ['a snapshot volume source that is no object', ['--set', 'snapshots.volume.persistentVolumeClaim=x'], /snapshots\.volume\.persistentVolumeClaim/],
    ['no snapshot volume at all', ['--set', 'snapshots.volume=null'], /snapshots: volume is required/],
    ['zero connections', ['--set', 'vcpud.maxConnections=0'], /vcpud\.maxConnections/],
    ['a duration without a unit', ['--set-string', 'vcpud.handshakeTimeout=10'], /vcpud\.handshakeTimeout/],
    ['a zero duration', ['--set', 'vcpud.uploadStallTimeout=0s'], /vcpud\.uploadStallTimeout/],
    ['a duration in hours (vcpud takes ms, s, m)', ['--set', 'vcpud.migrationStallTimeout=1h'], /vcpud\.migrationStallTimeout/],
    ['an in-flight budget that is no size', ['--set', 'vcpud.maxRequestBytesInFlight=lots'], /maxRequestBytesInFlight/],
    ['a migration client Secret that is no Secret name', ['--set', 'migration.clientSecret=Bad_Name'], /migration\.clientSecret/],
    ['an emptyDir sizeLimit that is no quantity', ['--set', 'snapshots.volume.emptyDir.sizeLimit=lots'], /sizeLimit/],
    ['a relative state dir', ['--set', 'stateDir.dir=run/vcpud-state'], /stateDir\.dir/],
  ])('values.schema.json rejects %s', (_what, args, message) => {
    const r = helm(['template', RELEASE, CHART, '-f', path.join(CHART, 'ci', 'daemonset-values.yaml'), ...args]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/values don't meet the specifications of the schema/);
    expect(r.stderr).toMatch(message);
  });

  test('daemonset mode without TLS material fails with the reason', () => {
    const r = helm(['template', RELEASE, CHART]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/tls\.existingSecret.*certManager\.enabled/);
  });

  test('NOTES.txt renders for every ci values file and warns when an enabled API is missing', () => {
    // helm template does not print NOTES.txt: a copy of the chart wraps it in a YAML document.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-notes-'));
    try {
      const chart = path.join(dir, 'vcpud');
      fs.cpSync(CHART, chart, { recursive: true });
      fs.writeFileSync(path.join(chart, 'templates', 'zz-notes.yaml'), 'notes: {{ include "vcpud/templates/NOTES.txt" . | toJson }}\n');
      const notes = (values: string, extra: string[] = []): string => {
        const r = helm(['template', RELEASE, chart, '-n', NAMESPACE, '-f', path.join(CHART, 'ci', values), ...extra, '--show-only', 'templates/zz-notes.yaml']);
        if (r.status !== 0) throw new Error(r.stderr);
        return parseManifests(r.stdout)[0].notes as string;
      };
      for (const file of CI_FILES) expect(notes(file)).toMatch(new RegExp(`helm test ${RELEASE} -n ${NAMESPACE}`));
      expect(notes('sidecar-values.yaml')).toMatch(/native sidecar/);
      expect(notes('privileged-fallback-values.yaml')).toMatch(/FALLBACK: hostPath/);
      const bare = notes('daemonset-certmanager-monitoring-values.yaml');
      expect(bare).toMatch(/WARNING: certManager\.enabled .* not served/);
      expect(bare).toMatch(/WARNING: metrics\.podMonitor\.enabled/);
      expect(bare).toMatch(/WARNING: metrics\.serviceMonitor\.enabled/);
      const full = notes('daemonset-certmanager-monitoring-values.yaml', [
        '--api-versions',
        'cert-manager.io/v1',
        '--api-versions',
        'monitoring.coreos.com/v1',
      ]);
      expect(full).not.toMatch(/WARNING/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  describe('snapshots: --snapshot-dir on a volume of the pod', () => {
    const ciValues = (mode: string): string[] => ['-f', path.join(CHART, 'ci', `${mode}-values.yaml`)];
    /** The workload (DaemonSet or example Deployment) and the helm test pod. */
    const workload = (objects: Obj[]): Obj => objects.find((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment') as Obj;
    const testPod = (objects: Obj[]): Obj | undefined => objects.find(isTestHook);
    const vcpudOf = (spec: Obj): Obj => vcpudContainers(spec)[0];
    const snapshotVolume = (spec: Obj): Obj | undefined => (spec.volumes ?? []).find((v: Obj) => v.name === SNAPSHOT_VOLUME);
    const snapshotArgs = (c: Obj): string[] => (c.args ?? []).filter((a: string) => a.startsWith('--snapshot-dir'));

    /** vcpud gets exactly one --snapshot-dir=DIR, a writable mount of DIR, and the pod the volume. */
    function expectSnapshots(spec: Obj, dir: string, volume: Obj): void {
      const c = vcpudOf(spec);
      expect(snapshotArgs(c)).toEqual([`--snapshot-dir=${dir}`]);
      expect(c.volumeMounts).toContainEqual({ name: SNAPSHOT_VOLUME, mountPath: dir });
      expect(snapshotVolume(spec)).toEqual({ name: SNAPSHOT_VOLUME, ...volume });
    }

    test.each(['daemonset', 'sidecar'])('%s, default values: an emptyDir with a sizeLimit at /var/lib/vcpud/snapshots', (mode) => {
      const objects = template(ciValues(mode));
      const spec = workload(objects).spec.template.spec;
      expectSnapshots(spec, SNAPSHOT_DIR, { emptyDir: { sizeLimit: '16Gi' } });
      // Only vcpud mounts it; the app containers share the socket alone.
      for (const c of spec.containers.filter((c: Obj) => c.name !== 'vcpud')) {
        expect((c.volumeMounts ?? []).map((m: Obj) => m.name)).not.toContain(SNAPSHOT_VOLUME);
      }
      if (mode === 'sidecar') {
        // vcpud's own parser takes the rendered flag (no TLS files in sidecar mode).
        expect(loadConfig(vcpudOf(spec).args, { XDG_RUNTIME_DIR: '/run' }, '/').snapshotDir).toBe(SNAPSHOT_DIR);
        expectSnapshots((testPod(objects) as Obj).spec, SNAPSHOT_DIR, { emptyDir: { sizeLimit: '64Mi' } });
      }
    });

    test.each(['daemonset', 'sidecar'])('%s, a PVC from a values file replaces the default emptyDir (no second source left)', (mode) => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-snapshots-'));
      try {
        const file = path.join(dir, 'pvc-values.yaml');
        fs.writeFileSync(file, 'snapshots:\n  dir: /data/snapshots\n  volume:\n    persistentVolumeClaim:\n      claimName: vcpud-snapshots\n');
        const objects = template([...ciValues(mode), '-f', file]);
        const owner = workload(objects);
        new MODELS[`${owner.apiVersion}/${owner.kind}`](owner).validate();
        expectSnapshots(owner.spec.template.spec, '/data/snapshots', { persistentVolumeClaim: { claimName: 'vcpud-snapshots' } });
        // The sidecar-mode test pod's own vcpud leaves the workload's PVC alone.
        if (mode === 'sidecar') expectSnapshots((testPod(objects) as Obj).spec, '/data/snapshots', { emptyDir: { sizeLimit: '64Mi' } });
      } finally {
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });

    test('daemonset, a hostPath per node', () => {
      const objects = template([
        ...ciValues('daemonset'),
        '--set',
        'snapshots.volume.hostPath.path=/var/lib/vcpud/snapshots',
        '--set',
        'snapshots.volume.hostPath.type=Directory',
      ]);
      expectSnapshots(workload(objects).spec.template.spec, SNAPSHOT_DIR, { hostPath: { path: '/var/lib/vcpud/snapshots', type: 'Directory' } });
    });

    test.each(['daemonset', 'sidecar'])('%s, snapshots.enabled=false: neither the flag nor the volume, in any pod', (mode) => {
      const objects = template([...ciValues(mode), '--set', 'snapshots.enabled=false']);
      const all = objects.flatMap(podsOf);
      expect(all.length).toBeGreaterThan(0);
      for (const { spec } of all) {
        expect(snapshotVolume(spec)).toBeUndefined();
        for (const c of allContainers(spec)) {
          expect(snapshotArgs(c)).toEqual([]);
          expect((c.volumeMounts ?? []).map((m: Obj) => m.name)).not.toContain(SNAPSHOT_VOLUME);
        }
      }
      if (mode === 'sidecar') {
        // What the values document: vcpud's default then lies inside the 1Mi socket emptyDir.
        const spec = workload(objects).spec.template.spec;
        expect(loadConfig(vcpudOf(spec).args, { XDG_RUNTIME_DIR: '/run' }, '/').snapshotDir).toBe('/run/vcpud/snapshots');
      }
    });

    test('a snapshot dir on a path the chart already mounts fails with the reason', () => {
      const r = helm(['template', RELEASE, CHART, ...ciValues('daemonset'), '--set', 'snapshots.dir=/run/vcpud']);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/snapshots\.dir \/run\/vcpud is a path the chart already mounts/);
    });
  });

  describe('restart handover: --state-dir on a memory emptyDir of the pod', () => {
    const STATE_VOLUME = 'vcpud-state';
    const ciValues = (mode: string): string[] => ['-f', path.join(CHART, 'ci', `${mode}-values.yaml`)];
    const workload = (objects: Obj[]): Obj => objects.find((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment') as Obj;
    const stateVolume = (spec: Obj): Obj | undefined => (spec.volumes ?? []).find((v: Obj) => v.name === STATE_VOLUME);
    const stateArgs = (c: Obj): string[] => (c.args ?? []).filter((a: string) => a.startsWith('--state-dir'));

    test.each(['daemonset', 'sidecar'])(
      '%s, default values: a tmpfs emptyDir at /run/vcpud-state, mounted by vcpud alone; the test pod gets its own',
      (mode) => {
        const objects = template(ciValues(mode));
        const spec = workload(objects).spec.template.spec;
        const c = vcpudContainers(spec)[0];
        expect(stateArgs(c)).toEqual(['--state-dir=/run/vcpud-state']);
        expect(c.volumeMounts).toContainEqual({ name: STATE_VOLUME, mountPath: '/run/vcpud-state' });
        expect(stateVolume(spec)).toEqual({ name: STATE_VOLUME, emptyDir: { medium: 'Memory', sizeLimit: '16Gi' } });
        for (const other of spec.containers.filter((x: Obj) => x.name !== 'vcpud'))
          expect((other.volumeMounts ?? []).map((m: Obj) => m.name)).not.toContain(STATE_VOLUME);
        if (mode === 'sidecar') {
          expect(loadConfig(c.args, { XDG_RUNTIME_DIR: '/run' }, '/').stateDir).toBe('/run/vcpud-state');
          expect(stateVolume(objects.find(isTestHook)!.spec)).toEqual({ name: STATE_VOLUME, emptyDir: { medium: 'Memory', sizeLimit: '64Mi' } });
        }
      },
    );

    test.each(['daemonset', 'sidecar'])('%s, stateDir.enabled=false: neither the flag nor the volume', (mode) => {
      for (const { spec } of template([...ciValues(mode), '--set', 'stateDir.enabled=false']).flatMap(podsOf)) {
        expect(stateVolume(spec)).toBeUndefined();
        for (const c of allContainers(spec)) expect(stateArgs(c)).toEqual([]);
      }
    });

    test('a hugetlbfs emptyDir replaces the default one', () => {
      const spec = workload(template([...ciValues('daemonset'), '--set', 'stateDir.volume.emptyDir.medium=HugePages-2Mi'])).spec.template.spec;
      expect(stateVolume(spec)).toEqual({ name: STATE_VOLUME, emptyDir: { medium: 'HugePages-2Mi', sizeLimit: '16Gi' } });
    });

    test('a state dir on the snapshot dir fails with the reason', () => {
      const r = helm(['template', RELEASE, CHART, ...ciValues('daemonset'), '--set', 'stateDir.dir=/var/lib/vcpud/snapshots']);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(/stateDir\.dir \/var\/lib\/vcpud\/snapshots is a path the chart already mounts/);
    });
  });

  describe('connections, requests and migration: flags, client TLS, data port', () => {
    const ciValues = (mode: string): string[] => ['-f', path.join(CHART, 'ci', `${mode}-values.yaml`)];
    /** value path -> [flag, Config key, the chart's default, another valid value, that value as vcpud parses it]. */
    const FLAGS: [string, string, keyof Config, string, string, number][] = [
      ['vcpud.maxConnections', '--max-connections', 'maxConnections', '256', '32', 32],
      ['vcpud.handshakeTimeout', '--handshake-timeout', 'handshakeTimeoutMs', '10s', '1500ms', 1500],
      ['vcpud.maxRequestBytesInFlight', '--max-request-bytes-in-flight', 'maxRequestBytesInFlight', '256Mi', '1Gi', 1024 ** 3],
      ['vcpud.uploadStallTimeout', '--upload-stall-timeout', 'uploadStallTimeoutMs', '30s', '2m', 120_000],
      ['vcpud.migrationStallTimeout', '--migration-stall-timeout', 'migrationStallTimeoutMs', '10s', '45s', 45_000],
    ];
    /** Every vcpud container of the rendered objects: the workload's and, in sidecar mode, the test pod's. */
    const vcpuds = (objects: Obj[]): Obj[] => objects.flatMap(podsOf).flatMap(({ spec }) => vcpudContainers(spec));
    /** What vcpud makes of just these flags of `c` (the others need TLS files or sockets). */
    const parsed = (c: Obj): Config =>
      loadConfig(
        FLAGS.map(([, flag]) => `${flag}=${argValue(c, flag)}`),
        { XDG_RUNTIME_DIR: '/run' },
        '/',
      );

    test.each(['daemonset', 'sidecar'])("%s: the defaults are vcpud's own, each flag once", (mode) => {
      const containers = vcpuds(template(ciValues(mode)));
      expect(containers.length).toBeGreaterThanOrEqual(mode === 'sidecar' ? 2 : 1);
      const defaults = defaultConfig({ XDG_RUNTIME_DIR: '/run' });
      for (const c of containers) {
        for (const [, flag, key, chartDefault] of FLAGS) {
          expect({ flag, args: c.args.filter((a: string) => a.startsWith(`${flag}=`)) }).toEqual({ flag, args: [`${flag}=${chartDefault}`] });
          expect({ flag, value: parsed(c)[key] }).toEqual({ flag, value: defaults[key] });
        }
      }
    });

    test.each(['daemonset', 'sidecar'])('%s: every value reaches its flag', (mode) => {
      // --set-string keeps '1500ms' & co. strings; maxConnections stays an integer, as the schema types it.
      const sets = FLAGS.flatMap(([value, , , , other]) => [/^\d+$/.test(other) ? '--set' : '--set-string', `${value}=${other}`]);
      const containers = vcpuds(template([...ciValues(mode), ...sets]));
      expect(containers.length).toBeGreaterThan(0);
      for (const c of containers) {
        const config = parsed(c);
        for (const [, flag, key, , other, value] of FLAGS) {
          expect({ flag, arg: argValue(c, flag), value: config[key] }).toEqual({ flag, arg: other, value });
        }
      }
    });

    const migrationArgs = (c: Obj): string[] => c.args.filter((a: string) => a.startsWith('--migration-tls-'));
    const MIGRATION_TLS = ['ca.crt', 'tls.crt', 'tls.key'].map((f, i) => `--migration-tls-${['ca', 'cert', 'key'][i]}=/etc/vcpud/migration-tls/${f}`);

    test.each([
      ['cert-manager issues the client certificate', 'daemonset-certmanager-monitoring', [], 'vcpud-client-tls'],
      ['a Secret of your own', 'daemonset', ['--set', 'migration.clientSecret=vcpud-migration-tls'], 'vcpud-migration-tls'],
      ['neither: calls bring their TLS', 'daemonset', [], undefined],
      ['cert-manager without its client certificate', 'daemonset-certmanager-monitoring', ['--set', 'certManager.clientCertificate.enabled=false'], undefined],
    ])('daemonset, migration client TLS: %s', (_what, ci, extra, secret) => {
      const objects = template([...ciValues(ci), ...(extra as string[]), '--api-versions', 'cert-manager.io/v1']);
      const ds = objects.find((o) => o.kind === 'DaemonSet') as Obj;
      new DaemonSet(ds as any).validate();
      const spec = ds.spec.template.spec;
      const [c] = vcpudContainers(spec);
      const volume = spec.volumes.find((v: Obj) => v.name === 'migration-tls');
      const mount = c.volumeMounts.find((m: Obj) => m.name === 'migration-tls');
      if (secret === undefined) {
        expect({ args: migrationArgs(c), volume, mount }).toEqual({ args: [], volume: undefined, mount: undefined });
        return;
      }
      expect(migrationArgs(c)).toEqual(MIGRATION_TLS);
      expect(volume).toEqual({ name: 'migration-tls', secret: { secretName: secret, defaultMode: 0o440 } });
      expect(mount).toEqual({ name: 'migration-tls', mountPath: '/etc/vcpud/migration-tls', readOnly: true });
      // The cert-manager Secret is the client Certificate's, whose name the allowlist carries.
      const client = objects.find((o) => o.kind === 'Certificate' && o.spec.usages.includes('client auth'));
      if (ci === 'daemonset-certmanager-monitoring') {
        expect(client?.spec.secretName).toBe(secret);
        expect(c.args).toContain(`--allow-client=${client?.spec.commonName}`);
      }
    });

    test('sidecar: no migration client TLS (a Unix socket cannot be reached from another pod)', () => {
      const objects = template([...ciValues('sidecar'), '--set', 'migration.clientSecret=vcpud-migration-tls']);
      for (const c of vcpuds(objects)) expect(migrationArgs(c)).toEqual([]);
      for (const { spec } of objects.flatMap(podsOf)) {
        expect((spec.volumes ?? []).map((v: Obj) => v.name)).not.toContain('migration-tls');
      }
    });

    test("the chart README's NetworkPolicy admits the vcpud pods to ports.grpc and the data port range", () => {
      const readme = fs.readFileSync(path.join(CHART, 'README.md'), 'utf8');
      const blocks = [...readme.matchAll(/```yaml\n([\s\S]*?)```/g)].map((m) => m[1]).filter((b) => /kind: NetworkPolicy/.test(b));
      expect(blocks).toHaveLength(1);
      const [policy] = parseManifests(blocks[0]);
      new NetworkPolicy(policy as any).validate();
      const objects = template(ciValues('daemonset'));
      const ds = objects.find((o) => o.kind === 'DaemonSet') as Obj;
      const labels = ds.spec.template.metadata.labels;
      expect(policy.metadata.namespace).toBe(NAMESPACE);
      expect(matches(policy.spec.podSelector.matchLabels, labels)).toBe(true);
      const [rule] = policy.spec.ingress;
      expect(rule.from.every((f: Obj) => matches(f.podSelector.matchLabels, labels))).toBe(true);
      const [c] = vcpudContainers(ds.spec.template.spec);
      // The API port, and Linux's default ephemeral range (net.ipv4.ip_local_port_range of a new
      // network namespace), from which the destination's data port comes (port 0 on the API host).
      expect(rule.ports).toEqual([
        { protocol: 'TCP', port: portNamed(c, 'grpc')?.containerPort },
        { protocol: 'TCP', port: 32768, endPort: 60999 },
      ]);
      expect(argValue(c, '--listen')).toBe(`0.0.0.0:${portNamed(c, 'grpc')?.containerPort}`);
    });

    test("the README's narrower data port range: podSecurityContext.sysctls reaches the vcpud pods", () => {
      const readme = fs.readFileSync(path.join(CHART, 'README.md'), 'utf8');
      const m = /`podSecurityContext\.sysctls: \[\{name: (net\.ipv4\.ip_local_port_range), value: "(\d+) (\d+)"\}\]`/.exec(readme);
      expect(m).not.toBeNull();
      const [, name, low, high] = m as RegExpExecArray;
      expect(readme).toContain(`\`port: ${low}\`, \`endPort: ${high}\``);
      const objects = template([
        ...ciValues('daemonset'),
        '--set',
        `podSecurityContext.sysctls[0].name=${name}`,
        '--set-string',
        `podSecurityContext.sysctls[0].value=${low} ${high}`,
      ]);
      const ds = objects.find((o) => o.kind === 'DaemonSet') as Obj;
      new DaemonSet(ds as any).validate();
      expect(ds.spec.template.spec.securityContext.sysctls).toEqual([{ name, value: `${low} ${high}` }]);
    });
  });

  test("kvm.groupId (the node's kvm group) joins the pod's supplementalGroups in both modes, after the user's own", () => {
    // The device plugin's /dev/kvm keeps the node's owner and mode (0660 root:kvm on Debian 12):
    // uid 10001 needs the group, and test/docker proves it on a real container.
    const workload = (objects: Obj[]): Obj => objects.find((o) => o.kind === 'DaemonSet' || o.kind === 'Deployment') as Obj;
    for (const mode of ['daemonset', 'sidecar']) {
      const values = ['-f', path.join(CHART, 'ci', `${mode}-values.yaml`)];
      const groups = (extra: string[]) => workload(template([...values, ...extra])).spec.template.spec.securityContext.supplementalGroups;
      expect(groups([])).toEqual([]);
      expect(groups(['--set', 'kvm.groupId=107', '--set', 'podSecurityContext.supplementalGroups={5000}'])).toEqual([5000, 107]);
      expect(groups(['--set', 'kvm.groupId=107', '--set', 'podSecurityContext.supplementalGroups={107}'])).toEqual([107]);
    }
    expect(helm(['template', RELEASE, CHART, '--namespace', NAMESPACE, '--set', 'mode=sidecar', '--set', 'kvm.groupId=-1']).status).not.toBe(0);
  });

  test('a parent chart adds the sidecar to its own workload with the documented named templates', () => {
    // The README's example, verbatim in substance: a chart depending on vcpud (mode sidecar, no
    // example) whose Deployment includes vcpud.sidecar & co. through .Subcharts.vcpud.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-parent-'));
    try {
      fs.mkdirSync(path.join(dir, 'charts'));
      fs.mkdirSync(path.join(dir, 'templates'));
      fs.cpSync(CHART, path.join(dir, 'charts', 'vcpud'), { recursive: true });
      fs.writeFileSync(
        path.join(dir, 'Chart.yaml'),
        'apiVersion: v2\nname: my-app\nversion: 1.0.0\nappVersion: "1.0"\ndependencies:\n  - name: vcpud\n    version: 0.1.0\n',
      );
      fs.writeFileSync(
        path.join(dir, 'values.yaml'),
        'vcpud:\n  mode: sidecar\n  sidecar:\n    example:\n      enabled: false\n  tests:\n    enabled: false\n',
      );
      fs.writeFileSync(
        path.join(dir, 'templates', 'deployment.yaml'),
        [
          'apiVersion: apps/v1',
          'kind: Deployment',
          'metadata:',
          '  name: my-app',
          'spec:',
          '  selector:',
          '    matchLabels: {app: my-app}',
          '  template:',
          '    metadata:',
          '      labels: {app: my-app}',
          '    spec:',
          '      securityContext:',
          '        {{- include "vcpud.podSecurityContext" .Subcharts.vcpud | nindent 8 }}',
          '      initContainers:',
          '        {{- include "vcpud.sidecar" .Subcharts.vcpud | nindent 8 }}',
          '      containers:',
          '        - name: app',
          '          image: my-app:1.0',
          '          env:',
          '            - name: VCPUD_ADDR',
          '              value: unix:/run/vcpud/vcpud.sock',
          '          volumeMounts:',
          '            {{- include "vcpud.socketVolumeMount" .Subcharts.vcpud | nindent 12 }}',
          '      volumes:',
          '        {{- include "vcpud.socketVolume" .Subcharts.vcpud | nindent 8 }}',
          '',
        ].join('\n'),
      );
      const r = helm(['template', 'app', dir, '--namespace', NAMESPACE]);
      expect(r.stderr).toBe('');
      expect(r.status).toBe(0);
      const objects = parseManifests(r.stdout);
      // Only the workload (and vcpud's ServiceAccount): no DaemonSet, Service or example.
      expect(objects.map((o) => o.kind).sort()).toEqual(['Deployment', 'ServiceAccount']);
      const deploy = objects.find((o) => o.kind === 'Deployment') as Obj;
      new Deployment(deploy as any).validate();
      const spec = deploy.spec.template.spec;
      const [sidecar] = spec.initContainers;
      expect(sidecar).toMatchObject({ name: 'vcpud', image: 'vcpud:0.1.0', restartPolicy: 'Always' });
      expect(argValue(sidecar, '--listen')).toBe('unix:/run/vcpud/vcpud.sock');
      expect(sidecar.resources.limits[KVM_RESOURCE]).toBe('1');
      expect(spec.securityContext.fsGroup).toBe(10001);
      expect(spec.containers[0].volumeMounts).toEqual([{ name: 'vcpud-socket', mountPath: '/run/vcpud' }]);
      // vcpud.socketVolume brings the snapshot and state volumes too: a parent including only it stays valid.
      expect(spec.volumes.map((v: Obj) => v.name)).toEqual(['vcpud-socket', SNAPSHOT_VOLUME, 'vcpud-state']);
      expect(argValue(sidecar, '--snapshot-dir')).toBe(SNAPSHOT_DIR);
      expect(sidecar.volumeMounts).toContainEqual({ name: SNAPSHOT_VOLUME, mountPath: SNAPSHOT_DIR });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
