/**
 * `run` with no program loaded: the vCPU starts at the reset vector, outside a small VM's memory, and
 * KVM stops it with KVM_EXIT_INTERNAL_ERROR, suberror 1. The stop says so in words (stop_description,
 * details rip/ripAddress) and vcpuctl prints it; a normal stop gets no description.
 */
import fs from 'node:fs';
import { run } from '../../src/cli/vcpuctl';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { waitFor, type Client } from '../support/snapshot';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type VcpuOut = { runState: string; stopReason: string; stopDetails: Record<string, number>; stopDescription: string };

describeKvm('what a stop means, in words (real KVM)', () => {
  let d: VcpudProcess;
  let vms: Client;

  beforeAll(async () => {
    d = await startVcpud();
    vms = d.client('VmService');
  });
  afterAll(async () => {
    expect(await d.stop()).toBe(0);
  });

  async function stoppedVcpu(vmId: string): Promise<VcpuOut> {
    let v: VcpuOut | undefined;
    await waitFor(async () => {
      v = (await call<{ vm: { vcpus: VcpuOut[] } }>(vms, 'GetVm', { vmId })).vm.vcpus[0];
      return v.runState === 'VCPU_RUN_STATE_STOPPED';
    }, 'the vCPU to stop');
    return v!;
  }

  async function ctl(...args: string[]) {
    let out = '';
    const io = { stdout: { write: (s: string | Uint8Array) => ((out += s.toString()), true) }, stderr: { write: () => true } };
    const code = await run(['--server', d.serving.api, ...args], io as never);
    return { code, out };
  }

  it('no program loaded: KVM_INTERNAL_ERROR_EMULATION at the reset vector, "no program loaded?", in GetVm and vcpuctl', async () => {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    await call(vms, 'RunVm', { vmId: vm.id });
    const v = await stoppedVcpu(vm.id);
    expect(v.stopReason).toBe('internal_error');
    expect(v.stopDetails).toMatchObject({ suberror: 1, rip: 0xfff0, ripAddress: 0xfffffff0 });
    expect(v.stopDescription).toMatch(
      /^KVM_INTERNAL_ERROR_EMULATION: .* at CS:RIP 0xf000:0xfff0 \(address 0xfffffff0\), the reset vector, outside the VM's guest memory \(0x200000 bytes\): no program loaded\?/,
    );
    const shown = await ctl('vm', 'get', vm.id);
    expect(shown.code).toBe(0);
    expect(shown.out).toMatch(/rip=0xfff0 ripAddress=0xfffffff0/);
    expect(shown.out).toContain(`vcpu 0 stopped: ${v.stopDescription}`);
  });

  it('a program that finishes (done) has no description', async () => {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.real16.file), loadAddress: String(GUEST_ABI.loadAddress) });
    await call(vms, 'RunVm', { vmId: vm.id });
    const v = await stoppedVcpu(vm.id);
    expect({ reason: v.stopReason, description: v.stopDescription }).toEqual({ reason: 'done', description: '' });
  });
});
