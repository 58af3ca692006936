/**
 * vcpuctl's snapshot and migrate commands against two real vcpud processes: create to a name and
 * to a local file, list, restore from a name and from a file, migrate over a unix socket, delete;
 * a progress bar on a terminal, JSON progress lines with --json, errors with their violations.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { run } from '../../src/cli/vcpuctl';
import { describeKvm } from '../support/kvm';
import { counterLines, counterVm, firstBreak, MiB, waitFor } from '../support/snapshot';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

describeKvm('vcpuctl snapshot / migrate against real vcpuds', () => {
  let a: VcpudProcess;
  let b: VcpudProcess;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpuctl-snap-'));

  beforeAll(async () => {
    [a, b] = await Promise.all([startVcpud(['--snapshot-dir', path.join(tmp, 'a')]), startVcpud(['--snapshot-dir', path.join(tmp, 'b')])]);
  });
  afterAll(async () => {
    await Promise.all([a.stop(), b.stop()]);
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function ctl(server: VcpudProcess, args: string[], tty = false): Promise<{ code: number; out: string; err: string }> {
    let out = '';
    let err = '';
    const io = {
      stdout: { write: (s: string | Uint8Array) => ((out += s.toString()), true) },
      stderr: { write: (s: string | Uint8Array) => ((err += s.toString()), true), isTTY: tty },
      cwd: tmp,
    };
    const code = await run(['--server', server.serving.api, ...args], io as never);
    return { code, out, err };
  }

  it('snapshot create (progress bar), list, restore --run; --out FILE and restore --in FILE; delete', async () => {
    const id = await counterVm(a.client('VmService'), { memory: 64 * MiB, fill: true });
    await call(a.client('VmService'), 'RunVm', { vmId: id });

    const c = await ctl(a, ['snapshot', 'create', id, 'demo.snap'], true);
    expect(c).toMatchObject({ code: 0 });
    expect(c.err).toMatch(/\rsnapshot \[#+-*\] +\d+%/);
    expect(c.err).toMatch(/100%/);
    expect(c.out).toMatch(/^name\s+demo\.snap$/m);
    expect(c.out).toMatch(/^memory\s+64 MiB, \d+ non-zero pages stored$/m);

    const list = await ctl(a, ['snapshot', 'list']);
    expect(list.out).toMatch(/^NAME\s+SIZE\s+CHAIN\s+VM/m);
    expect(list.out).toMatch(/^demo\.snap\s+\S+ MiB\s+full\s+counter\s+64 MiB\s+1\s/m);

    // --json: progress as JSON lines on stderr, one document on stdout
    const j = await ctl(a, ['--json', 'snapshot', 'create', id, '--out', 'local.snap']);
    expect(j.code).toBe(0);
    const progress = j.err
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l).progress);
    expect(progress.map((p) => p.phase)).toEqual(expect.arrayContaining(['state', 'memory', 'done']));
    expect(progress.every((p) => p.operation === 'snapshot' && p.memoryBytesTotal === 64 * MiB)).toBe(true);
    const doc = JSON.parse(j.out);
    expect(doc.file).toBe(path.join(tmp, 'local.snap'));
    expect(fs.statSync(doc.file).size).toBe(Number(doc.snapshot.sizeBytes));
    expect(fs.readdirSync(tmp).filter((n) => n.includes('vcpuctl-tmp'))).toEqual([]);

    // the named one cannot be restored on b (another directory); the file can
    const missing = await ctl(b, ['snapshot', 'restore', 'demo.snap']);
    expect(missing.code).toBe(1);
    expect(missing.err).toMatch(/NOT_FOUND \(SNAPSHOT_NOT_FOUND\)/);
    const up = await ctl(b, ['--json', 'snapshot', 'restore', '--in', 'local.snap', '--run', '--name', 'uploaded']);
    expect(up.code).toBe(0);
    const restored = JSON.parse(up.out);
    expect(restored.vm).toMatchObject({ name: 'uploaded' });
    expect(restored.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');

    const r = await ctl(a, ['snapshot', 'restore', 'demo.snap', '--run']);
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/restored in [\d.]+ ms: .* mapped lazily/);
    expect(r.out).toMatch(/running/);

    expect((await ctl(a, ['snapshot', 'delete', 'demo.snap'])).out).toMatch(/deleted demo\.snap/);
    expect((await ctl(a, ['snapshot', 'list'])).out).not.toMatch(/demo\.snap/);

    const bad = await ctl(a, ['snapshot', 'create', id, '../escape.snap']);
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/INVALID_ARGUMENT.*\n {2}- name: .* \[snapshot\.name\.traversal\]/);
    const usage = await ctl(a, ['snapshot', 'create', id]);
    expect(usage.code).toBe(2);
  });

  it('snapshot create --track-dirty / --parent, list shows the chain, merge folds it, delete --cascade', async () => {
    const id = await counterVm(a.client('VmService'), { memory: 64 * MiB, fill: true });
    await call(a.client('VmService'), 'RunVm', { vmId: id });
    expect(await ctl(a, ['snapshot', 'create', id, 'inc/base', '--track-dirty'])).toMatchObject({ code: 0 });
    expect((await ctl(a, ['snapshot', 'create', id, 'inc/c1', '--parent', 'inc/base'])).out).toMatch(/^chain\s+<- inc\/base \(depth 1\)$/m);
    expect(await ctl(a, ['snapshot', 'create', id, 'inc/c2', '--parent', 'inc/c1'])).toMatchObject({ code: 0 });
    const list = await ctl(a, ['snapshot', 'list']);
    expect(list.out).toMatch(/^inc\/base\s+\S+ MiB\s+full\s/m);
    expect(list.out).toMatch(/^inc\/c2\s+\S+ KiB\s+<- inc\/c1 \(depth 2\)\s/m);
    const refused = await ctl(a, ['snapshot', 'delete', 'inc/c1']);
    expect(refused.err).toMatch(/FAILED_PRECONDITION.*parent of "inc\/c2"/);
    const merged = await ctl(a, ['snapshot', 'merge', 'inc/c2', '--into', 'inc/flat']);
    expect(merged.out).toMatch(/merged a chain of 3 in \d+ ms/);
    expect(merged.out).toMatch(/^chain\s+full$/m);
    expect((await ctl(a, ['snapshot', 'delete', 'inc/base', '--cascade'])).out).toBe('deleted inc/c2\ndeleted inc/c1\ndeleted inc/base\n');
    const r = await ctl(a, ['snapshot', 'restore', 'inc/flat', '--run']);
    expect(r).toMatchObject({ code: 0 });
  });

  it('migrate --to moves a counting VM to the other vcpud; the count continues', async () => {
    const vms = a.client('VmService');
    const id = await counterVm(vms, { name: 'traveller' });
    let before = '';
    const s = vms.StreamConsole({ vmId: id, fromStart: true });
    s.on('data', (m: { event: string; output: Buffer }) => m.event === 'output' && (before += m.output.toString('latin1')));
    s.on('error', () => {});
    await call(vms, 'RunVm', { vmId: id });
    await waitFor(() => counterLines(before).length > 200, 'the source to count');

    const m = await ctl(a, ['migrate', id, '--to', b.serving.api], true);
    expect(m.code).toBe(0);
    expect(m.err).toMatch(/\rmigrate \[#+-*\]/);
    const newId = /now (\S+) there/.exec(m.out)?.[1] as string;
    expect(m.out).toMatch(/paused for [\d.]+ ms/);

    const bvms = b.client('VmService');
    let after = '';
    const s2 = bvms.StreamConsole({ vmId: newId, fromStart: true });
    s2.on('data', (x: { event: string; output: Buffer }) => x.event === 'output' && (after += x.output.toString('latin1')));
    s2.on('error', () => {});
    await waitFor(() => counterLines(after).length > 300, 'the destination to count');
    s2.cancel();
    const values = counterLines(before + after);
    expect(values[0]).toBe(1);
    expect(firstBreak(values)).toBeUndefined();
    expect((await ctl(a, ['vm', 'list'])).out).not.toMatch(id);
  });
});
