/**
 * The chart's pod as `docker run` options: the test runs the containers the chart renders, not a
 * hand-written copy of them. Each pod field the chart sets maps to what a kubelet with containerd
 * or CRI-O does with it; a field this translation does not know fails the test instead of being
 * dropped, so a chart change cannot silently escape the real run.
 *
 * - runAsUser/runAsGroup -> --user; fsGroup and supplementalGroups -> --group-add (the kubelet adds
 *   both to every container's groups).
 * - readOnlyRootFilesystem -> --read-only; capabilities -> --cap-drop/--cap-add;
 *   allowPrivilegeEscalation false -> no-new-privileges; seccomp RuntimeDefault -> Docker's default
 *   profile (the runtime's default, as in Kubernetes).
 * - the device plugin resource -> --device /dev/kvm: the plugin (KubeVirt's devices.kubevirt.io/kvm)
 *   answers Allocate with host path = container path = /dev/kvm and permissions "rw" and nothing
 *   else; containerd and CRI-O create the node with the host's owner and mode (unless their
 *   device_ownership_from_security_context option, off by default, is set), as Docker does.
 * - volumeMounts -> named volumes (an emptyDir shared by the pod's containers = one volume); an
 *   emptyDir with medium Memory the test gives no volume -> a tmpfs mount of its sizeLimit.
 * - no pod network at all: --network none (the API is the Unix socket; probes run in the container).
 */
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { parseAllDocuments } from 'yaml';
import { parseByteSize } from '../../src/size';

export type Obj = Record<string, any>;

const ROOT = path.resolve(__dirname, '..', '..');
export const HELM = path.join(ROOT, '.cache', 'helm', 'helm');
export const KVM_RESOURCE = 'devices.kubevirt.io/kvm';

/** The sidecar-mode example Deployment's pod spec, as `helm template` renders it. */
export function renderSidecarPod(set: string[]): Obj {
  const args = ['template', 'vcpud', path.join(ROOT, 'helm', 'vcpud'), '--set', 'mode=sidecar', ...set.flatMap((s) => ['--set', s])];
  const out = execFileSync(HELM, args, { cwd: ROOT, encoding: 'utf8', timeout: 60_000 });
  const objects = parseAllDocuments(out)
    .map((d) => d.toJSON() as Obj)
    .filter(Boolean);
  const deploy = objects.find((o) => o.kind === 'Deployment');
  if (!deploy) throw new Error('helm template rendered no Deployment in sidecar mode');
  return deploy.spec.template.spec;
}

const KNOWN_POD_SC = new Set(['runAsNonRoot', 'runAsUser', 'runAsGroup', 'fsGroup', 'supplementalGroups', 'seccompProfile']);
const KNOWN_CONTAINER_SC = new Set([
  'runAsNonRoot',
  'runAsUser',
  'runAsGroup',
  'allowPrivilegeEscalation',
  'readOnlyRootFilesystem',
  'capabilities',
  'seccompProfile',
]);

function unknownKeys(obj: Obj | undefined, known: Set<string>, what: string): void {
  const extra = Object.keys(obj ?? {}).filter((k) => !known.has(k));
  if (extra.length) throw new Error(`${what} sets ${extra.join(', ')}, which test/docker/chart-pod.ts does not translate`);
}

export interface DockerRunOptions {
  /** Pod volume name -> Docker volume name. */
  volumes: Record<string, string>;
  /** Extra `docker run` options the test adds (e.g. a read-only bind mount of the test guests). */
  extra?: string[];
  /** Replaces the container's args (the image's entry point stays). */
  args?: string[];
  /** Replaces the container's command (its first word becomes --entrypoint). */
  command?: string[];
}

/** `docker run` options (image and arguments included) for one container of the pod. */
export function dockerRunArgs(pod: Obj, container: Obj, opts: DockerRunOptions): string[] {
  unknownKeys(pod.securityContext, KNOWN_POD_SC, 'the pod securityContext');
  unknownKeys(container.securityContext, KNOWN_CONTAINER_SC, `container ${container.name}'s securityContext`);
  const sc = { ...pod.securityContext, ...container.securityContext };
  const out: string[] = ['--network', 'none'];
  if (sc.runAsUser === undefined || sc.runAsGroup === undefined) throw new Error(`container ${container.name} has no runAsUser/runAsGroup`);
  out.push('--user', `${sc.runAsUser}:${sc.runAsGroup}`);
  for (const g of new Set([pod.securityContext?.fsGroup, ...(pod.securityContext?.supplementalGroups ?? [])])) {
    if (g !== undefined) out.push('--group-add', String(g));
  }
  if (sc.readOnlyRootFilesystem) out.push('--read-only');
  for (const c of sc.capabilities?.drop ?? []) out.push('--cap-drop', c);
  for (const c of sc.capabilities?.add ?? []) out.push('--cap-add', c);
  if (sc.allowPrivilegeEscalation === false) out.push('--security-opt', 'no-new-privileges');
  if (sc.seccompProfile && sc.seccompProfile.type !== 'RuntimeDefault') throw new Error(`seccompProfile ${sc.seccompProfile.type} is not translated`);
  const limits: Obj = container.resources?.limits ?? {};
  if (limits[KVM_RESOURCE]) out.push('--device', '/dev/kvm:/dev/kvm:rw');
  if (limits.memory) out.push('--memory', String(limits.memory).replace(/i$/, '').toLowerCase());
  for (const m of container.volumeMounts ?? []) {
    const src = opts.volumes[m.name];
    if (src) {
      out.push('--mount', `type=volume,src=${src},dst=${m.mountPath}${m.readOnly ? ',readonly' : ''}`);
      continue;
    }
    // A memory-backed emptyDir only this container mounts (the handover state directory) is a tmpfs
    // of the sizeLimit, writable by the pod's users as the kubelet makes an emptyDir (mode 0777).
    const memory = (pod.volumes ?? []).find((v: Obj) => v.name === m.name)?.emptyDir;
    if (memory?.medium !== 'Memory') throw new Error(`no Docker volume given for the pod volume ${m.name}`);
    const size = memory.sizeLimit ? `,tmpfs-size=${parseByteSize(String(memory.sizeLimit))}` : '';
    out.push('--mount', `type=tmpfs,dst=${m.mountPath},tmpfs-mode=1777${size}`);
  }
  for (const e of container.env ?? []) out.push('--env', `${e.name}=${e.value}`);
  out.push(...(opts.extra ?? []));
  const command: string[] | undefined = opts.command ?? container.command;
  if (command) out.push('--entrypoint', command[0]);
  out.push(container.image);
  if (command) out.push(...command.slice(1));
  out.push(...(opts.args ?? container.args ?? []));
  return out;
}
