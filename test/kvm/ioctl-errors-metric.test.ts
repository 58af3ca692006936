/**
 * vcpud_ioctl_errors_total counts real ioctl failures only, by their real errno name: a healthy
 * server (start-up with its E2BIG size negotiation, a VM, a snapshot, corrupt and truncated uploads
 * refused) shows none, so an alert on it means something; a refusal by the kernel is counted.
 */
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { describeKvm } from '../support/kvm';
import { samples } from '../support/prom';
import { counterVm, firstMemoryData, runStream, uploadSnapshot, type Client } from '../support/snapshot';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const ERRORS = 'vcpud_ioctl_errors_total';

describeKvm('vcpud_ioctl_errors_total (real vcpud, real KVM)', () => {
  let d: VcpudProcess;
  let vms: Client;
  let snaps: Client;
  let state: Client;

  beforeAll(async () => {
    d = await startVcpud();
    vms = d.client('VmService');
    snaps = d.client('SnapshotService');
    state = d.client('VcpuStateService');
  });
  afterAll(async () => {
    expect(await d.stop()).toBe(0);
  });

  const errors = async () => samples(await d.scrape(), ERRORS).filter((s) => s.value > 0);

  it('a healthy server counts none: start-up, a VM, a snapshot, corrupt and truncated uploads', async () => {
    expect(await errors()).toEqual([]);
    const id = await counterVm(vms);
    await call(vms, 'RunVm', { vmId: id });
    const data: Buffer[] = [];
    const r = await runStream(snaps.CreateSnapshot({ vmId: id, stream: true }), (m) => m.data && data.push(m.data));
    expect(r.error).toBeUndefined();
    const good = Buffer.concat(data);
    // Every byte position class: the header, state records, memory; and cuts. Memory is a byte of its
    // payload: the middle of the stream fell in a record's alignment padding (which no checksum covers)
    // whenever the guest had dirtied 5 pages, and that upload was accepted.
    for (const at of [0x1000 + 40, Math.floor(good.length / 3), firstMemoryData(good) + 100, good.length - 100]) {
      const bad = Buffer.from(good);
      bad[at] ^= 0x10;
      const e = await uploadSnapshot(snaps, bad).then(
        () => undefined,
        (x) => x as grpc.ServiceError,
      );
      expect(e?.code).toBeDefined(); // refused (DATA_LOSS or INVALID_ARGUMENT, as the corruption lands)
    }
    for (const cut of [100, Math.floor(good.length / 2)])
      await expect(uploadSnapshot(snaps, good.subarray(0, cut))).rejects.toMatchObject({ code: grpc.status.DATA_LOSS });
    expect((await uploadSnapshot(snaps, good)).vm).toBeDefined();
    expect(await errors()).toEqual([]);
  });

  it('a value the kernel refuses is counted once, by ioctl and its real errno', async () => {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 * 1024 * 1024), vcpuCount: 1 });
    const before = (await call<{ state: Record<string, any> }>(state, 'GetState', { vmId: vm.id, vcpuId: 0, sections: ['STATE_SECTION_SREGS'] })).state;
    const err = await callError(state, 'SetState', { vmId: vm.id, vcpuId: 0, state: { sregs: { ...before.sregs, cr0: '18446744073709551615' } } });
    expect(decodeStatusDetails(err.metadata)?.errorInfo?.reason).toBe('KERNEL_REJECTED');
    expect(await errors()).toEqual([{ labels: { ioctl: 'KVM_SET_SREGS', errno: 'EINVAL' }, value: 1 }]);
  });
});
