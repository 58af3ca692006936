/**
 * SetState with a value only the kernel refuses (the server's validation lets it through): INVALID_ARGUMENT
 * with reason KERNEL_REJECTED, metadata ioctl/errno/section, a BadRequest naming the field the request
 * changed, and the vCPU exactly as it was (every readable section compared).
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type Client = grpc.Client & Record<string, Function>;
type State = Record<string, any>;
const ALL_ONES = '18446744073709551615';

describeKvm('SetState: the kernel refusing a value is KERNEL_REJECTED naming the field (real KVM)', () => {
  let d: VcpudProcess;
  let state: Client;
  let vms: Client;
  let id: string;

  beforeAll(async () => {
    d = await startVcpud();
    state = d.client('VcpuStateService');
    vms = d.client('VmService');
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 * 1024 * 1024), vcpuCount: 1, name: 'refused' });
    await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: String(GUEST_ABI.loadAddress) });
    id = vm.id;
  });
  afterAll(async () => {
    expect(await d.stop()).toBe(0);
  });

  /** Every readable section, but the TSC (MSR 0x10), which counts on by itself between two reads. */
  const getAll = async (): Promise<State> => {
    const s = (await call<{ state: State }>(state, 'GetState', { vmId: id, vcpuId: 0 })).state;
    return { ...s, msrs: { ...s.msrs, entries: s.msrs.entries.filter((e: { index: number }) => e.index !== 0x10) } };
  };

  const cases: { name: string; change(s: State): State; ioctl: string; section: string; field: string }[] = [
    {
      name: 'cr0 all ones',
      change: (s) => ({ sregs: { ...s.sregs, cr0: ALL_ONES } }),
      ioctl: 'KVM_SET_SREGS',
      section: 'STATE_SECTION_SREGS',
      field: 'state.sregs.cr0',
    },
    {
      name: 'mp_state 99',
      change: () => ({ mpState: { kvmValue: 99 } }),
      ioctl: 'KVM_SET_MP_STATE',
      section: 'STATE_SECTION_MP_STATE',
      field: 'state.mp_state',
    },
    {
      name: 'a dr7 reserved bit (bit 32)',
      change: (s) => ({ debugregs: { ...s.debugregs, dr7: String(2 ** 32 + 0x400) } }),
      ioctl: 'KVM_SET_DEBUGREGS',
      section: 'STATE_SECTION_DEBUGREGS',
      field: 'state.debugregs.dr7',
    },
    {
      name: 'xcr0 = 0',
      change: (s) => ({ xcrs: { ...s.xcrs, xcrs: [{ xcr: 0, value: '0' }] } }),
      ioctl: 'KVM_SET_XCRS',
      section: 'STATE_SECTION_XCRS',
      field: 'state.xcrs.xcrs[0].value',
    },
  ];

  it.each(cases)('$name: $ioctl refuses it, the error names $field, the vCPU is unchanged', async ({ change, ioctl, section, field }) => {
    const before = await getAll();
    // regs first in the restore order's sense too: an earlier section applied and rolled back.
    const err = await callError(state, 'SetState', { vmId: id, vcpuId: 0, state: { regs: { ...before.regs, rax: '4242' }, ...change(before) } });
    expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    const st = decodeStatusDetails(err.metadata);
    expect(st?.errorInfo).toMatchObject({ reason: 'KERNEL_REJECTED', metadata: { ioctl, errno: 'EINVAL', section, field } });
    expect(st?.badRequest).toEqual([{ field, reason: `kernel.${ioctl.replace(/^KVM_/, '').toLowerCase()}`, description: expect.stringContaining('EINVAL') }]);
    expect(await getAll()).toEqual(before);
  });

  it('several changed fields: the section is named and the message lists them', async () => {
    const before = await getAll();
    const err = await callError(state, 'SetState', { vmId: id, vcpuId: 0, state: { sregs: { ...before.sregs, cr0: ALL_ONES, cr2: '4096' } } });
    const st = decodeStatusDetails(err.metadata);
    expect(st?.errorInfo).toMatchObject({ reason: 'KERNEL_REJECTED', metadata: { ioctl: 'KVM_SET_SREGS', field: 'state.sregs' } });
    expect(st?.badRequest?.[0].description).toMatch(/state\.sregs\.cr0, state\.sregs\.cr2/);
    expect(await getAll()).toEqual(before);
  });
});
