/**
 * The README's vcpuctl walkthroughs, run as written (issue 15, item 7): every `console` block of the
 * "A vcpuctl session" section is read from README.md at run time, its `$ ` lines run verbatim by one
 * bash (so `ID=$(...)` carries over), and each command's output (stdout and stderr together) is
 * compared by shape with the lines the README shows under it; every pipeline must exit 0 (pipefail)
 * unless the README shows a `vcpuctl: CODE` error for it.
 *
 * The blocks start their own vcpuds (`npm start &`, on /run and 127.0.0.1:9464/9465 as written): bash
 * runs in private mount, network and pid namespaces (a tmpfs on /run, its own loopback), so nothing
 * the host uses is touched and every process it started dies with it. A background command's output
 * goes to a log, and the next command waits until that vcpud answers (bounded).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { packageRoot } from '../../src/package';
import { GUEST_BUILD_DIR } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { parseWalkthroughs, shapeMismatch, type Step } from '../support/readme-blocks';

const ROOT = packageRoot();
/** Bounds the whole run (every vcpud dies with the namespace when bash ends or is killed). */
const RUN_TIMEOUT_MS = 300_000;
/** How long a command after `... &` waits for that vcpud to answer. */
const SERVER_WAIT_S = 20;

const namespacesWork = spawnSync('unshare', ['--mount', '--net', '--pid', '--fork', 'true']).status === 0;

/** The bash script: each step between markers, background ones logged and waited for. */
function script(steps: Step[], logDir: string): string {
  const lines = ['set -o pipefail', 'exec 2>&1'];
  steps.forEach((step, i) => {
    lines.push(`printf '\\n@@STEP ${i}@@\\n'`);
    const background = /&\s*$/.test(step.command);
    if (background) {
      lines.push(`{ ${step.command}\n} >${logDir}/background-${i}.log 2>&1`);
      const listen = /--listen[ =](\S+)/.exec(step.command)?.[1];
      const server = listen ? `--server ${listen}` : '';
      lines.push(
        `for _ in $(seq ${SERVER_WAIT_S * 10}); do vcpuctl ${server} --timeout 1 caps >/dev/null 2>&1 && break; sleep 0.1; done`,
        `printf '\\n@@RC ${i} 0@@\\n'`,
      );
    } else {
      lines.push(step.command, `printf '\\n@@RC ${i} %d@@\\n' $?`);
    }
  });
  return `${lines.join('\n')}\n`;
}

/** Output and exit code of each step, from the markers. */
function splitOutput(out: string, count: number): { text: string; code: number | undefined }[] {
  const results = [];
  for (let i = 0; i < count; i++) {
    const m = new RegExp(`\\n@@STEP ${i}@@\\n([\\s\\S]*?)\\n?@@RC ${i} (\\d+)@@`).exec(out);
    results.push(m ? { text: m[1], code: Number(m[2]) } : { text: '', code: undefined });
  }
  return results;
}

/** A directory that looks like the checkout to the README's commands, but keeps their files out of it. */
function workDir(): string {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'readme-walkthrough-'));
  for (const name of ['package.json', 'dist', 'node_modules']) fs.symlinkSync(path.join(ROOT, name), path.join(work, name));
  fs.mkdirSync(path.join(work, 'test', 'guests'), { recursive: true });
  fs.symlinkSync(GUEST_BUILD_DIR, path.join(work, 'test', 'guests', 'build'));
  fs.mkdirSync(path.join(work, 'bin'));
  for (const [cmd, main] of [
    ['vcpuctl', 'dist/src/cli/vcpuctl.js'],
    ['vcpud', 'dist/src/server/main.js'],
  ])
    fs.writeFileSync(path.join(work, 'bin', cmd), `#!/bin/sh\nexec ${JSON.stringify(process.execPath)} ${JSON.stringify(path.join(ROOT, main))} "$@"\n`, {
      mode: 0o755,
    });
  fs.mkdirSync(path.join(work, 'logs'));
  return work;
}

const readme = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');

describeKvm('the README walkthroughs, pasted into bash', () => {
  const blocks = parseWalkthroughs(readme, 'A vcpuctl session');

  it('finds both walkthroughs', () => {
    expect(blocks.length).toBe(2);
    expect(blocks.every((b) => b.length > 5)).toBe(true);
  });

  // One bash for both, as a reader pastes the second block into the shell of the first.
  it('both run as written and print what the README shows', () => {
    const steps = blocks.flat();
    if (!namespacesWork) {
      if (process.env.VCPUD_REQUIRE_KVM === '1') throw new Error('unshare --mount --net --pid failed: the walkthrough test needs root (CAP_SYS_ADMIN)');
      console.warn('SKIPPED: the README walkthrough test needs private namespaces (unshare as root)');
      return;
    }
    const work = workDir();
    try {
      const logDir = path.join(work, 'logs');
      fs.writeFileSync(path.join(work, 'walkthrough.sh'), script(steps, logDir));
      // A fresh machine's view: tmpfs /run (the default socket dir as root), its own loopback.
      const inner = 'mount -t tmpfs tmpfs /run && ip link set lo up && exec bash walkthrough.sh';
      const env: NodeJS.ProcessEnv = { ...process.env, PATH: `${path.join(work, 'bin')}:${process.env.PATH}`, npm_config_update_notifier: 'false' };
      for (const k of ['XDG_RUNTIME_DIR', 'VCPUD_ADDR', 'VCPUD_LISTEN', 'VCPUD_METRICS_LISTEN', 'VCPUD_SNAPSHOT_DIR']) delete env[k];
      const started = Date.now();
      const r = spawnSync('unshare', ['--mount', '--net', '--pid', '--fork', '--propagation', 'private', 'bash', '-c', inner], {
        cwd: work,
        env,
        encoding: 'utf8',
        timeout: RUN_TIMEOUT_MS,
        killSignal: 'SIGKILL',
      });
      console.log(`walkthrough: ${steps.length} commands in ${Date.now() - started} ms`);
      const results = splitOutput(r.stdout, steps.length);
      const logs = () =>
        fs
          .readdirSync(logDir)
          .map((f) => `--- ${f}\n${fs.readFileSync(path.join(logDir, f), 'utf8').slice(-2000)}`)
          .join('\n');
      const report = steps.map((step, i) => {
        const { text, code } = results[i];
        const problems: string[] = [];
        const wantsError = step.expected.some((l) => /^vcpuctl: [A-Z_]+/.test(l));
        if (code === undefined) problems.push('did not run to its end');
        else if (wantsError ? code === 0 : code !== 0) problems.push(`exit code ${code} (README: ${wantsError ? 'an error' : 'success'})`);
        const shape = shapeMismatch(
          step.expected,
          text.split('\n').filter((l, j, all) => !(j === all.length - 1 && l === '')),
        );
        if (shape) problems.push(shape);
        return problems.length ? `$ ${step.command}\n  ${problems.join('\n  ')}\n  output:\n${text.replace(/^/gm, '    | ')}` : '';
      });
      const failures = report.filter(Boolean);
      if (failures.length)
        throw new Error(
          `${failures.length} of ${steps.length} commands differ from the README:\n\n${failures.join('\n\n')}\n\nbackground logs:\n${logs()}\nstderr: ${r.stderr}`,
        );
    } finally {
      fs.rmSync(work, { recursive: true, force: true });
    }
  });
});
