/**
 * CreateSnapshot never replaces a snapshot by surprise: over an existing name it answers ALREADY_EXISTS
 * (reason SNAPSHOT_EXISTS, field name) before touching the VM, unless the request says replace: true
 * (vcpuctl snapshot create --replace). Two creates racing for one new name: exactly one wins (the file
 * is published with link(2), which never replaces). Names vcpud writes hold no control or other
 * non-printing characters (rule snapshot.name.characters), like VM names (vm_name.characters).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { run } from '../../src/cli/vcpuctl';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import { counterVm, MiB, runStream, type Client } from '../support/snapshot';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

function expectError(e: grpc.ServiceError | undefined, code: grpc.status, reason: string, field: string, rule?: string) {
  expect({ code: e?.code, details: e?.details }).toMatchObject({ code }); // the details say why when the code is wrong
  const st = decodeStatusDetails(e!.metadata);
  expect(st?.errorInfo).toMatchObject({ reason, metadata: expect.objectContaining({ field, ...(rule ? { rule } : {}) }) });
}

describeKvm('CreateSnapshot over an existing name, and the characters of names (real vcpud)', () => {
  let d: VcpudProcess;
  let snaps: Client;
  let vms: Client;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-replace-'));
  const dir = path.join(tmp, 'snapshots');

  beforeAll(async () => {
    d = await startVcpud(['--snapshot-dir', dir]);
    snaps = d.client('SnapshotService');
    vms = d.client('VmService');
  });
  afterAll(async () => {
    await d?.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  const create = (req: object) => runStream(snaps.CreateSnapshot(req));

  test('an existing name is ALREADY_EXISTS, the file and the running VM untouched; replace: true replaces it', async () => {
    const id = await counterVm(vms, { memory: 4 * MiB });
    await call(vms, 'RunVm', { vmId: id });
    expect((await create({ vmId: id, name: 'keep/me.snap' })).error).toBeUndefined();
    const file = path.join(dir, 'keep', 'me.snap');
    const before = fs.statSync(file);

    const refused = await create({ vmId: id, name: 'keep/me.snap' });
    expectError(refused.error, grpc.status.ALREADY_EXISTS, 'SNAPSHOT_EXISTS', 'name');
    expect(refused.error?.details).toMatch(/replace/);
    expect(refused.messages).toEqual([]); // refused before the VM was paused: no progress was sent
    const after = fs.statSync(file);
    expect({ ino: after.ino, mtimeMs: after.mtimeMs }).toEqual({ ino: before.ino, mtimeMs: before.mtimeMs });
    const vm = await call<{ vm: { vcpus: { runState: string }[] } }>(vms, 'GetVm', { vmId: id });
    expect(vm.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');

    const replaced = await create({ vmId: id, name: 'keep/me.snap', replace: true });
    expect(replaced.error).toBeUndefined();
    expect(fs.statSync(file).ino).not.toBe(before.ino);
    await call(vms, 'DeleteVm', { vmId: id });
  });

  test('two creates racing for one new name: one succeeds, the other is ALREADY_EXISTS', async () => {
    const ids = [await counterVm(vms, { memory: 4 * MiB, name: 'a' }), await counterVm(vms, { memory: 4 * MiB, name: 'b' })];
    const results = await Promise.all(ids.map((vmId) => create({ vmId, name: 'race.snap' })));
    expect(results.filter((r) => !r.error)).toHaveLength(1);
    expectError(results.find((r) => r.error)?.error, grpc.status.ALREADY_EXISTS, 'SNAPSHOT_EXISTS', 'name');
    expect(fs.readdirSync(dir).filter((n) => n.startsWith('.'))).toEqual([]); // no temporary file left
    for (const vmId of ids) await call(vms, 'DeleteVm', { vmId });
  });

  test('control and other non-printing characters are refused in snapshot and VM names', async () => {
    const id = await counterVm(vms, { memory: 4 * MiB });
    for (const name of ['a\x1b[2J.snap', 'tab\there.snap', 'dir\n/x.snap', 'del\x7f.snap', 'invoice\u202Egpj.snap']) {
      const r = await create({ vmId: id, name });
      expectError(r.error, grpc.status.INVALID_ARGUMENT, 'INVALID_REQUEST', 'name', 'snapshot.name.characters');
      expect(r.error?.details).toMatch(/U\+[0-9A-F]{4}/);
    }
    expect(fs.readdirSync(dir).filter((n) => /[^\x20-\x7e]/.test(n))).toEqual([]);
    for (const name of ['a\x1b[2J', 'line\nbreak', 'bell\x07']) {
      const e = await callError(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 1, name });
      expectError(e, grpc.status.INVALID_ARGUMENT, 'INVALID_REQUEST', 'name', 'vm_name.characters');
    }
    await call(vms, 'DeleteVm', { vmId: id });
  });

  test('vcpuctl snapshot create: an existing name exits 1 pointing at --replace; --replace replaces it', async () => {
    const id = await counterVm(vms, { memory: 4 * MiB });
    const ctl = async (args: string[]) => {
      let out = '';
      let err = '';
      const io = {
        stdout: { write: (s: string | Uint8Array) => ((out += s.toString()), true) },
        stderr: { write: (s: string | Uint8Array) => ((err += s.toString()), true) },
        cwd: tmp,
      };
      return { code: await run(['--server', d.serving.api, ...args], io as never), out, err };
    };
    expect((await ctl(['snapshot', 'create', id, 'cli.snap'])).code).toBe(0);
    const again = await ctl(['snapshot', 'create', id, 'cli.snap']);
    expect(again.code).toBe(1);
    expect(again.err).toMatch(/ALREADY_EXISTS/);
    expect(again.err).toMatch(/--replace/);
    expect(await ctl(['snapshot', 'create', id, 'cli.snap', '--replace'])).toMatchObject({ code: 0 });
    await call(vms, 'DeleteVm', { vmId: id });
  });
});
