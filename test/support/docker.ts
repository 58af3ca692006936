/**
 * Docker for the container image test (test/docker): the gate, and a client that removes every
 * container and volume it made. scripts/provision-docker.sh (run by the test command) installs
 * Docker, starts a bridge-less dockerd and makes the stand-in base images, and writes
 * .cache/docker/docker.json. Without them the suite skips loudly, or fails when
 * VCPUD_REQUIRE_KVM=1 (CI): the image is where vcpud meets /dev/kvm in production.
 */
import { execFile, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { kvmUnavailable } from './kvm';

const ROOT = path.resolve(__dirname, '..', '..');
export const DOCKER_JSON = path.join(ROOT, '.cache', 'docker', 'docker.json');
/** Label on every container and volume the tests make; the test command removes leftovers by it. */
export const TEST_LABEL = 'vcpud.test';

export interface DockerInfo {
  docker: string;
  host: string;
  buildBase: string;
  runtimeBase: string;
  nodeVersion: string;
}

function readDockerInfo(): { info?: DockerInfo; problem?: string } {
  const provision = 'run bash scripts/provision-docker.sh as root';
  if (!fs.existsSync(DOCKER_JSON)) return { problem: `${path.relative(ROOT, DOCKER_JSON)} is missing: Docker is not provisioned (${provision})` };
  const j = JSON.parse(fs.readFileSync(DOCKER_JSON, 'utf8')) as Partial<DockerInfo> & { problem?: string };
  if (j.problem) return { problem: `Docker is not provisioned: ${j.problem}` };
  const info = j as DockerInfo;
  try {
    execFileSync(info.docker, ['version', '--format', '{{.Server.Version}}'], {
      env: { ...process.env, DOCKER_HOST: info.host },
      stdio: 'pipe',
      timeout: 10_000,
    });
  } catch (e) {
    return { problem: `no dockerd answers on ${info.host} (${provision}): ${(e as Error).message.split('\n')[0]}` };
  }
  return { info };
}

function dockerUnavailableReason(): { info?: DockerInfo; problem?: string } {
  if (process.env.VCPUD_SKIP_DOCKER === '1') return { problem: 'VCPUD_SKIP_DOCKER=1' };
  if (kvmUnavailable) return { problem: kvmUnavailable };
  return readDockerInfo();
}

const gate = dockerUnavailableReason();
export const dockerInfo = gate.info;

/** describe() for suites that need Docker (and /dev/kvm). */
export function describeDocker(name: string, fn: () => void): void {
  if (!gate.problem) return describe(name, fn);
  if (process.env.VCPUD_REQUIRE_KVM === '1') {
    return describe(name, () => {
      it('requires Docker and /dev/kvm (VCPUD_REQUIRE_KVM=1)', () => {
        throw new Error(`VCPUD_REQUIRE_KVM=1 but ${gate.problem}`);
      });
    });
  }
  console.warn(`\n*** SKIPPING "${name}": ${gate.problem} ***\n`);
  return describe.skip(name, fn);
}

export interface DockerResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** The docker CLI, bounded in time; remembers the containers and volumes it creates. */
export class DockerClient {
  private readonly containers = new Set<string>();
  private readonly volumes = new Set<string>();

  constructor(
    private readonly info: DockerInfo,
    readonly runId: string,
  ) {}

  /** The full name of a container or volume this client made as `name`. */
  nameOf(name: string): string {
    return `${this.runId}-${name}`;
  }

  exec(args: string[], timeoutMs = 60_000): Promise<DockerResult> {
    return new Promise((resolve) => {
      execFile(
        this.info.docker,
        args,
        { env: { ...process.env, DOCKER_HOST: this.info.host }, timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, encoding: 'utf8' },
        (err, stdout, stderr) => {
          const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : -1) : 0;
          resolve({ code, stdout, stderr: err && code === -1 ? `${stderr}\n${err.message}` : stderr });
        },
      );
    });
  }

  /** exec() that throws with docker's stderr unless it exits 0. */
  async ok(args: string[], timeoutMs?: number): Promise<string> {
    const r = await this.exec(args, timeoutMs);
    if (r.code !== 0) throw new Error(`docker ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
    return r.stdout;
  }

  async createVolume(name: string): Promise<string> {
    const full = this.nameOf(name);
    this.volumes.add(full);
    await this.ok(['volume', 'create', '--label', `${TEST_LABEL}=${this.runId}`, full]);
    return full;
  }

  /** `docker run -d` with the name and label; `runArgs` are the options after them. */
  async runDetached(name: string, runArgs: string[]): Promise<string> {
    const full = this.nameOf(name);
    this.containers.add(full);
    await this.ok(['run', '-d', '--name', full, '--label', `${TEST_LABEL}=${this.runId}`, ...runArgs]);
    return full;
  }

  /** Removes every container, then every volume, this client made (also after a failure). */
  async cleanup(): Promise<void> {
    if (this.containers.size) await this.exec(['rm', '-f', '-v', ...this.containers]);
    if (this.volumes.size) await this.exec(['volume', 'rm', '-f', ...this.volumes]);
    this.containers.clear();
    this.volumes.clear();
  }
}
