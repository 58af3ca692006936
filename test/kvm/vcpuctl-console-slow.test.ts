/**
 * `vcpuctl console VM` (without --follow) through a link that adds 0.7 s each way: the replay window
 * starts when the server opened the stream, so a slow first answer neither cuts the output short nor
 * hides an error (issue 15, item 3).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from '../../src/cli/vcpuctl';
import { CONSOLE_SNAPSHOT_MS } from '../../src/cli/vcpuctl/commands/console';
import { GUESTS } from '../guests/guests';
import { startDelayProxy, type DelayProxy } from '../support/delay-proxy';
import { describeKvm } from '../support/kvm';
import { startVcpud, type VcpudProcess } from '../support/vcpud-process';

/** Longer than the replay window, so a window started before the connection would expire first. */
const LINK_DELAY_MS = 700;

describeKvm('vcpuctl console over a slow link', () => {
  let d: VcpudProcess;
  let proxy: DelayProxy;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpuctl-slow-'));

  beforeAll(async () => {
    d = await startVcpud();
    proxy = await startDelayProxy(path.join(tmp, 'slow.sock'), path.join(d.dir, 'vcpud.sock'), LINK_DELAY_MS);
  });
  afterAll(async () => {
    await proxy.close();
    await d.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function ctl(server: string, ...args: string[]) {
    let out = '';
    let err = '';
    const io = {
      stdout: { write: (s: string | Uint8Array) => ((out += s.toString()), true) },
      stderr: { write: (s: string | Uint8Array) => ((err += s.toString()), true) },
    };
    const started = Date.now();
    const code = await run(['--server', server, ...args], io as never);
    return { code, out, err, ms: Date.now() - started };
  }

  it('prints the buffered output although the first answer takes longer than the replay window', async () => {
    expect(LINK_DELAY_MS).toBeGreaterThan(CONSOLE_SNAPSHOT_MS);
    const id = JSON.parse((await ctl(d.serving.api, '--json', 'vm', 'create', '--memory', '2Mi', '--name', 'slow')).out).vm.id as string;
    expect((await ctl(d.serving.api, 'load', id, GUESTS.counter64.file)).code).toBe(0);
    expect((await ctl(d.serving.api, 'run', id)).code).toBe(0);
    // until the guest has printed its first lines (bounded), then paused so the buffer holds still
    for (let i = 0; i < 50 && !(await ctl(d.serving.api, 'console', id)).out.startsWith('1\n2\n3\n'); i++) await new Promise((r) => setTimeout(r, 50));
    expect((await ctl(d.serving.api, 'pause', id)).code).toBe(0);

    const slow = await ctl(proxy.address, 'console', id);
    console.log(`console through a ${LINK_DELAY_MS} ms link: ${slow.ms} ms, ${slow.out.length} bytes`);
    expect({ code: slow.code, err: slow.err }).toEqual({ code: 0, err: '' });
    expect(slow.out).toMatch(/^1\n2\n3\n/);
  });

  it('ends after the window when the VM has printed nothing (the server opens the stream with headers)', async () => {
    const id = JSON.parse((await ctl(d.serving.api, '--json', 'vm', 'create', '--memory', '2Mi', '--name', 'quiet')).out).vm.id as string;
    const r = await ctl(proxy.address, 'console', id);
    console.log(`empty console through a ${LINK_DELAY_MS} ms link: ${r.ms} ms`);
    expect(r).toMatchObject({ code: 0, out: '', err: '' });
  });

  it('reports NOT_FOUND for an unknown VM instead of exiting 0 silently', async () => {
    const r = await ctl(proxy.address, 'console', 'no-such-vm');
    expect(r.out).toBe('');
    expect(r.err).toMatch(/NOT_FOUND/);
    expect(r.code).toBe(1);
  });
});
