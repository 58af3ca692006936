/** vcpuctl against the real vcpud process on real KVM: the operator's session, end to end. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from '../../src/cli/vcpuctl';
import { GUESTS } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { startVcpud, type VcpudProcess } from '../support/vcpud-process';

describeKvm('vcpuctl against a real vcpud', () => {
  let d: VcpudProcess;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpuctl-e2e-'));

  beforeAll(async () => {
    d = await startVcpud();
  });
  afterAll(async () => {
    await d.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function ctl(...args: string[]): Promise<{ code: number; out: string; err: string }> {
    let out = '';
    let err = '';
    const io = {
      stdout: { write: (s: string | Uint8Array) => ((out += s.toString()), true) },
      stderr: { write: (s: string | Uint8Array) => ((err += s.toString()), true) },
    };
    const code = await run(['--server', d.serving.api, ...args], io as never);
    return { code, out, err };
  }
  const json = async (...args: string[]) => {
    const r = await ctl('--json', ...args);
    expect({ code: r.code, err: r.err }).toEqual({ code: 0, err: expect.any(String) });
    return JSON.parse(r.out);
  };

  it('caps, vm create, load, run, console, pause, state get/set, delete', async () => {
    const caps = await ctl('caps');
    expect(caps.code).toBe(0);
    expect(caps.out).toMatch(/nested/i);

    const created = await json('vm', 'create', '--memory', '2Mi', '--vcpus', '1', '--name', 'demo');
    const id: string = created.vm.id;
    expect((await ctl('vm', 'list')).out).toContain(id);
    expect((await ctl('load', id, GUESTS.counter64.file)).code).toBe(0);
    expect((await ctl('run', id)).code).toBe(0);
    await new Promise((r) => setTimeout(r, 100));
    const con = await ctl('console', id, '--from-start');
    expect(con.out).toMatch(/^1\n2\n3\n/);
    expect((await ctl('pause', id)).out).toMatch(/paused/i);

    const st = await json('state', 'get', id);
    expect(st.state.mpState.value).toBe('MP_STATE_RUNNABLE');
    expect(st.state.regs.rbx).not.toBe('0');

    const human = await ctl('state', 'get', id, '--section', 'regs');
    expect(human.out).toMatch(/rbx/);

    expect((await ctl('state', 'set', id, '--set', 'regs.rbx=0x100000')).code).toBe(0);
    expect((await json('state', 'get', id, '--section', 'regs')).state.regs.rbx).toBe(String(0x100000));

    // A whole GetState written to a file and sent back is accepted (unwritable, unchanged sections included).
    const file = path.join(tmp, 'state.bin');
    expect((await ctl('state', 'get', id, '--out', file)).code).toBe(0);
    const back = await ctl('state', 'set', id, '--in', file);
    expect(back.err).toBe('');
    expect(back.code).toBe(0);

    expect((await ctl('resume', id)).code).toBe(0);
    await new Promise((r) => setTimeout(r, 100));
    const more = await ctl('console', id, '--from-start');
    expect(more.out).toContain('\n1048577\n');

    expect((await ctl('vm', 'delete', id)).code).toBe(0);
  });

  it('errors print the code, the reason and every violation; exit code 1', async () => {
    const r = await ctl('vm', 'create', '--memory', '1000');
    expect(r.code).toBe(1);
    expect(r.err).toMatch(/INVALID_ARGUMENT \(INVALID_REQUEST\)/);
    expect(r.err).toMatch(/- memory_bytes: /);
    const nf = await ctl('state', 'get', 'no-such-vm');
    expect(nf.code).toBe(1);
    expect(nf.err).toMatch(/NOT_FOUND \(VM_NOT_FOUND\)/);
  });

  it('usage errors exit 2', async () => {
    expect((await ctl('vm', 'explode')).code).toBe(2);
  });
});
