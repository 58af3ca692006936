/**
 * Addresses as paths (issue 15, item 5): `vcpuctl --server /path.sock`, `migrate --to /path.sock` and a
 * MigrateVm whose destination is a plain socket path, between two real vcpuds.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from '../../src/cli/vcpuctl';
import { describeKvm } from '../support/kvm';
import { counterVm, runStream } from '../support/snapshot';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

describeKvm('socket paths without unix: (real vcpuds)', () => {
  let a: VcpudProcess;
  let b: VcpudProcess;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpuctl-addr-'));
  const socketOf = (d: VcpudProcess) => path.join(d.dir, 'vcpud.sock');

  beforeAll(async () => {
    [a, b] = await Promise.all([startVcpud(), startVcpud()]);
  });
  afterAll(async () => {
    await Promise.all([a.stop(), b.stop()]);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function ctl(...args: string[]) {
    let out = '';
    let err = '';
    const io = {
      stdout: { write: (s: string | Uint8Array) => ((out += s.toString()), true) },
      stderr: { write: (s: string | Uint8Array) => ((err += s.toString()), true) },
      cwd: tmp,
    };
    const code = await run(args, io as never);
    return { code, out, err };
  }

  it('vcpuctl --server PATH and migrate --to PATH (absolute and relative to the current directory)', async () => {
    const id = await counterVm(a.client('VmService'));
    expect(await ctl('--server', socketOf(a), 'run', id)).toMatchObject({ code: 0, err: '' });
    const m = await ctl('--server', socketOf(a), 'migrate', id, '--to', socketOf(b));
    expect(m).toMatchObject({ code: 0, err: '' });
    const moved = /now (\S+) there/.exec(m.out)?.[1] as string;
    expect(moved).toBeDefined();

    fs.symlinkSync(a.dir, path.join(tmp, 'a'));
    const back = await ctl('--server', socketOf(b), 'migrate', moved, '--to', './a/vcpud.sock');
    expect(back).toMatchObject({ code: 0, err: '' });
    expect(back.out).toContain(`to ./a/vcpud.sock`);
  });

  it('MigrateVm takes a plain socket path as destination', async () => {
    const id = await counterVm(a.client('VmService'));
    const r = await runStream(a.client('SnapshotService').MigrateVm({ vmId: id, destination: socketOf(b) }));
    expect(r.error).toBeUndefined();
    const destId = r.messages.find((x) => x.done)?.done.destinationVm.id;
    expect((await call<{ vm: { id: string } }>(b.client('VmService'), 'GetVm', { vmId: destId })).vm.id).toBe(destId);
  });
});
