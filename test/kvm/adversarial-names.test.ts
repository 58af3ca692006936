/**
 * VM names against a real vcpud: every way a name enters (CreateVm, RestoreSnapshot vm_name,
 * RestoreSnapshotStream options.vm_name, MigrateVm destination_vm_name) refuses a name that breaks
 * the rule (src/vm/vm-name.ts) with INVALID_ARGUMENT naming the field and the rule, before any VM or
 * byte is taken; the longest allowed name round-trips through a snapshot file and a restore.
 */
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { MAX_VM_NAME_BYTES } from '../../src/vm/vm-name';
import { describeKvm } from '../support/kvm';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type Client = grpc.Client & Record<string, Function>;

/** 253 bytes of UTF-8 in 127 characters: the limit counts bytes. */
const LONGEST = `${'é'.repeat(126)}a`;
const TOO_LONG = 'x'.repeat(20 << 20); // the 20 MiB name whose snapshot could never be restored
const BIDI = 'invoice\u202Egpj.exe';

function expectRefused(e: grpc.ServiceError, field: string, rule: string) {
  expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
  const st = decodeStatusDetails(e.metadata);
  expect(st?.errorInfo).toMatchObject({ reason: 'INVALID_REQUEST', metadata: { field, rule } });
  expect(st?.badRequest).toEqual([expect.objectContaining({ field, reason: rule })]);
  expect(e.details.length).toBeLessThan(300); // the message does not echo the name
}

/**
 * A request carrying the 20 MiB name never reaches the name rule: it is over its method's request
 * size limit (src/server/request-limits.ts) and refused as its 5-byte prefix arrives.
 */
function expectTooLarge(e: grpc.ServiceError) {
  expect(e.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
  expect(decodeStatusDetails(e.metadata)?.errorInfo).toMatchObject({ reason: 'LIMIT_EXCEEDED', metadata: { limit: 'max_request_message_bytes' } });
}

/** RestoreSnapshotStream with only its options message: the error it ends with. */
function streamRestoreError(snap: Client, vmName: string): Promise<grpc.ServiceError> {
  return new Promise((resolve, reject) => {
    const up = snap.RestoreSnapshotStream((err: grpc.ServiceError | null) => (err ? resolve(err) : reject(new Error('RestoreSnapshotStream succeeded'))));
    up.write({ options: { run: false, vmName } });
    up.end();
  });
}

/** The error a server stream ends with. */
function streamError(client: Client, method: string, req: object): Promise<grpc.ServiceError> {
  return new Promise((resolve, reject) => {
    const s = client[method](req) as grpc.ClientReadableStream<unknown>;
    s.on('data', () => {});
    s.on('error', resolve);
    s.on('end', () => reject(new Error(`${method} ended without an error`)));
  });
}

describeKvm('VM names are bounded everywhere they enter (real vcpud)', () => {
  let d: VcpudProcess;
  let vms: Client;
  let snap: Client;

  beforeAll(async () => {
    d = await startVcpud();
    vms = d.client('VmService');
    snap = d.client('SnapshotService');
  });
  afterAll(() => d.stop());

  const vmCount = async () => (await call<{ vms: unknown[] }>(vms, 'ListVms', {})).vms.length;

  it('CreateVm refuses a 20 MiB name, a 254-byte name and a bidi override; nothing is created', async () => {
    expectTooLarge(await callError(vms, 'CreateVm', { name: TOO_LONG, memoryBytes: String(2 << 20), vcpuCount: 1 }));
    expectRefused(
      await callError(vms, 'CreateVm', { name: 'a'.repeat(MAX_VM_NAME_BYTES + 1), memoryBytes: String(2 << 20), vcpuCount: 1 }),
      'name',
      'vm_name.length',
    );
    expectRefused(await callError(vms, 'CreateVm', { name: BIDI, memoryBytes: String(2 << 20), vcpuCount: 1 }), 'name', 'vm_name.characters');
    expect(await vmCount()).toBe(0);
  });

  it('the longest allowed name round-trips through CreateSnapshot and RestoreSnapshot; restores refuse bad vm_name', async () => {
    const { vm } = await call<{ vm: { id: string; name: string } }>(vms, 'CreateVm', { name: LONGEST, memoryBytes: String(2 << 20), vcpuCount: 1 });
    expect(Buffer.byteLength(vm.name)).toBe(MAX_VM_NAME_BYTES);
    await new Promise<void>((resolve, reject) => {
      const s = snap.CreateSnapshot({ vmId: vm.id, name: 'longest.snap', replace: true }) as grpc.ClientReadableStream<unknown>; // the default directory outlives a run
      s.on('data', () => {});
      s.on('error', reject);
      s.on('end', resolve);
    });
    const { snapshots } = await call<{ snapshots: { name: string; vmName: string }[] }>(snap, 'ListSnapshots', {});
    expect(snapshots.find((s) => s.name === 'longest.snap')?.vmName).toBe(LONGEST);
    await call(vms, 'DeleteVm', { vmId: vm.id });

    expectRefused(await callError(snap, 'RestoreSnapshot', { name: 'longest.snap', vmName: `${LONGEST}b` }), 'vm_name', 'vm_name.length');
    expectRefused(await callError(snap, 'RestoreSnapshot', { name: 'longest.snap', vmName: 'a\x1b[2J' }), 'vm_name', 'vm_name.characters');
    expect(await vmCount()).toBe(0);

    const restored = await call<{ vm: { id: string; name: string } }>(snap, 'RestoreSnapshot', { name: 'longest.snap' });
    expect(restored.vm.name).toBe(LONGEST);
    await call(vms, 'DeleteVm', { vmId: restored.vm.id });
  });

  it('RestoreSnapshotStream refuses a bad options.vm_name before reading any snapshot byte', async () => {
    expectTooLarge(await streamRestoreError(snap, TOO_LONG));
    expectRefused(await streamRestoreError(snap, 'a\u2066b'), 'options.vm_name', 'vm_name.characters');
    expect(await vmCount()).toBe(0);
  });

  it('MigrateVm refuses a bad destination_vm_name before touching the VM', async () => {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    const e = await streamError(snap, 'MigrateVm', {
      vmId: vm.id,
      destination: 'unix:/nonexistent.sock',
      destinationVmName: 'x'.repeat(MAX_VM_NAME_BYTES + 1),
    });
    expectRefused(e, 'destination_vm_name', 'vm_name.length');
    await call(vms, 'DeleteVm', { vmId: vm.id });
  });
});
