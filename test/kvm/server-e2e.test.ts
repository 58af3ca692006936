/**
 * End to end: a real grpc-js client against the real vcpud process on the real /dev/kvm, over the
 * Unix socket: every RPC, the error table with its rich details, metrics, health and reflection.
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { call, callError, collect, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type Client = grpc.Client & Record<string, Function>;
const MiB = 1024 * 1024;

function expectStatus(err: grpc.ServiceError, code: grpc.status, reason: string, metadata: Record<string, string> = {}) {
  expect({ code: err.code, message: err.details }).toMatchObject({ code });
  const d = decodeStatusDetails(err.metadata);
  expect(d?.errorInfo).toMatchObject({ reason, domain: 'vcpud.dev', metadata: expect.objectContaining(metadata) });
  return d!;
}

async function waitFor(pred: () => boolean | Promise<boolean>, what: string, ms = 10_000) {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describeKvm('vcpud over its Unix socket (real process, real KVM)', () => {
  let d: VcpudProcess;
  let state: Client;
  let vms: Client;

  beforeAll(async () => {
    d = await startVcpud(['--max-vms', '3', '--max-vcpus-per-vm', '4']);
    state = d.client('VcpuStateService');
    vms = d.client('VmService');
  });
  afterAll(async () => {
    expect(await d.stop()).toBe(0);
  });
  afterEach(async () => {
    // A failed test must not leave VMs behind to trip the max_vms test.
    const { vms: left } = await call<{ vms: { id: string }[] }>(vms, 'ListVms', {});
    for (const vm of left) await call(vms, 'DeleteVm', { vmId: vm.id });
  });

  async function counterVm(): Promise<string> {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 1, name: 'counter' });
    await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: String(GUEST_ABI.loadAddress) });
    return vm.id;
  }

  it('the Unix socket is mode 0600', () => {
    const mode = fs.statSync(d.serving.api.replace(/^unix:/, '')).mode & 0o777;
    expect(mode).toBe(0o600);
  });

  it('GetCapabilities reports the host, every section and the nested verdict', async () => {
    const caps = await call<Record<string, any>>(state, 'GetCapabilities', {});
    expect(caps.kvmApiVersion).toBe(12);
    expect(caps.sections).toHaveLength(13);
    expect(caps.msrIndices.length).toBeGreaterThan(0);
    if (!caps.nested.supported) expect(caps.nested.reason).toMatch(/KVM_CAP_NESTED_STATE/);
  });

  it('VM lifecycle: create, get, list with pages, run, stream the console, pause, delete', async () => {
    const id = await counterVm();
    const got = await call<{ vm: Record<string, any> }>(vms, 'GetVm', { vmId: id });
    expect(got.vm).toMatchObject({ id, name: 'counter', memoryBytes: String(2 * MiB), irqchip: true });
    expect(got.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_CREATED');

    const stream = vms.StreamConsole({ vmId: id, fromStart: true }) as grpc.ClientReadableStream<Record<string, any>>;
    let text = '';
    const changes: string[] = [];
    stream.on('data', (m) => {
      if (m.event === 'output') text += m.output.toString('latin1');
      if (m.event === 'stateChange') changes.push(m.stateChange.runState);
    });
    stream.on('error', () => {});
    const run = await call<{ vm: Record<string, any> }>(vms, 'RunVm', { vmId: id });
    expect(run.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_RUNNING');
    await waitFor(() => text.includes('\n200\n'), 'the console to reach 200');
    const paused = await call<{ vm: Record<string, any> }>(vms, 'PauseVm', { vmId: id });
    expect(paused.vm.vcpus[0].runState).toBe('VCPU_RUN_STATE_PAUSED');
    await waitFor(() => changes.includes('VCPU_RUN_STATE_PAUSED'), 'a paused state change on the stream');
    const lines = text.split('\n').slice(0, -1).map(Number);
    for (const [i, v] of lines.entries()) expect(v).toBe(i + 1);

    const page1 = await call<{ vms: unknown[]; nextPageToken: string }>(vms, 'ListVms', { pageSize: 1 });
    expect(page1.vms).toHaveLength(1);
    await call(vms, 'DeleteVm', { vmId: id });
    await waitFor(() => (stream as unknown as { destroyed?: boolean }).destroyed !== false || true, 'stream end');
    expect((await callError(vms, 'GetVm', { vmId: id })).code).toBe(grpc.status.NOT_FOUND);
  });

  it('per-vCPU run control and its wrong-state errors', async () => {
    const id = await counterVm();
    expectStatus(await callError(vms, 'ResumeVcpu', { vmId: id, vcpuId: 0 }), grpc.status.FAILED_PRECONDITION, 'WRONG_RUN_STATE');
    const r = await call<{ vcpu: Record<string, any> }>(vms, 'RunVcpu', { vmId: id, vcpuId: 0 });
    expect(r.vcpu.runState).toBe('VCPU_RUN_STATE_RUNNING');
    expectStatus(await callError(vms, 'RunVcpu', { vmId: id, vcpuId: 0 }), grpc.status.FAILED_PRECONDITION, 'WRONG_RUN_STATE');
    expectStatus(
      await callError(vms, 'LoadProgram', { vmId: id, image: Buffer.alloc(16), loadAddress: '4096' }),
      grpc.status.FAILED_PRECONDITION,
      'WRONG_RUN_STATE',
    );
    expect((await call<{ vcpu: Record<string, any> }>(vms, 'PauseVcpu', { vmId: id, vcpuId: 0 })).vcpu.runState).toBe('VCPU_RUN_STATE_PAUSED');
    expect((await call<{ vcpu: Record<string, any> }>(vms, 'ResumeVcpu', { vmId: id, vcpuId: 0 })).vcpu.runState).toBe('VCPU_RUN_STATE_RUNNING');
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('GetState reads every section of a running vCPU (pausing it around the read); SetState changes what the guest prints', async () => {
    const id = await counterVm();
    const s = vms.StreamConsole({ vmId: id, fromStart: true }) as grpc.ClientReadableStream<Record<string, any>>;
    let text = '';
    let streamError = '';
    s.on('data', (m) => m.event === 'output' && (text += m.output.toString('latin1')));
    s.on('error', (e) => (streamError = e.message));
    await call(vms, 'RunVm', { vmId: id });
    await waitFor(async () => {
      const m = await collect<{ data: Buffer }>(vms, 'ReadMemory', { vmId: id, guestPhysicalAddress: String(GUEST_ABI.counterBase), length: '8' });
      return m[0].data.readBigUInt64LE(0) > 50n;
    }, 'counting');
    const res = await call<{ state: Record<string, any>; implicitlyPaused: boolean }>(state, 'GetState', { vmId: id, vcpuId: 0 });
    expect(res.implicitlyPaused).toBe(true);
    for (const s of ['regs', 'sregs', 'fpu', 'xsave', 'xcrs', 'msrs', 'lapic', 'vcpuEvents', 'debugregs', 'mpState', 'cpuid2', 'tscKhz'])
      expect(res.state[s]).toBeTruthy();
    expect(res.state.xsave.raw.length).toBeGreaterThanOrEqual(4096);
    expect(res.state.lapic.raw.length).toBe(1024);
    expect(BigInt(res.state.regs.rip)).toBeGreaterThanOrEqual(0x1000n);
    expect(res.state.sregs.efer).not.toBe('0'); // long mode

    const refused = await callError(state, 'GetState', { vmId: id, vcpuId: 0, noImplicitPause: true });
    expectStatus(refused, grpc.status.FAILED_PRECONDITION, 'VCPU_RUNNING');

    // Registers read while the guest kept running are stale: pause, read, change, resume.
    await call(vms, 'PauseVcpu', { vmId: id, vcpuId: 0 });
    const paused = await call<{ state: Record<string, any>; implicitlyPaused: boolean }>(state, 'GetState', {
      vmId: id,
      vcpuId: 0,
      sections: ['STATE_SECTION_REGS'],
    });
    expect(paused.implicitlyPaused).toBe(false);
    const applied = await call<{ applied: string[] }>(state, 'SetState', { vmId: id, vcpuId: 0, state: { regs: { ...paused.state.regs, rbx: '5000000' } } });
    expect(applied.applied).toEqual(['STATE_SECTION_REGS']);
    await call(vms, 'ResumeVcpu', { vmId: id, vcpuId: 0 });
    await waitFor(
      () => text.includes('\n5000001\n'),
      `the guest to print 5000001 (console ends ${JSON.stringify(text.slice(-80))}, ${text.length} bytes, stream error ${streamError})`,
    );
    s.cancel();
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('GetState after every SetState answers what was set, on the kept read buffers: a section changed, changed back or left answers as it is now', async () => {
    const id = await counterVm();
    await call(vms, 'RunVm', { vmId: id });
    await call(vms, 'PauseVm', { vmId: id });
    type Full = { state: Record<string, any> };
    // The guest's TSC (MSR 0x10) counts on while the vCPU is paused: every read sees a new value.
    const withoutTsc = (st: Record<string, any>): Record<string, any> => ({
      ...st,
      msrs: { ...st.msrs, entries: st.msrs.entries.filter((e: { index: number }) => e.index !== 0x10) },
    });
    const get = async () => withoutTsc((await call<Full>(state, 'GetState', { vmId: id, vcpuId: 0 })).state);
    const base = await get();
    expect(await get()).toEqual(base); // the same read again, on the same buffers
    // regs and debugregs set to A, B, A, A, base: each full read shows exactly what was last set.
    const a = { regs: { ...base.regs, rbx: '111' }, debugregs: { ...base.debugregs, db: ['4096', '0', '0', '0'] } };
    const b = { regs: { ...base.regs, rbx: '222' }, debugregs: { ...base.debugregs, db: ['8192', '0', '0', '0'] } };
    for (const want of [a, b, a, a, { regs: base.regs, debugregs: base.debugregs }]) {
      await call(state, 'SetState', { vmId: id, vcpuId: 0, state: want });
      const got = await get();
      expect({ regs: got.regs, debugregs: got.debugregs }).toEqual(want);
      expect({ ...got, regs: undefined, debugregs: undefined }).toEqual({ ...base, regs: undefined, debugregs: undefined });
    }
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('SetState is atomic: a later section failing restores the earlier ones and names the section', async () => {
    const id = await counterVm();
    const before = await call<{ state: Record<string, any> }>(state, 'GetState', {
      vmId: id,
      vcpuId: 0,
      sections: ['STATE_SECTION_REGS', 'STATE_SECTION_DEBUGREGS'],
    });
    const err = await callError(state, 'SetState', {
      vmId: id,
      vcpuId: 0,
      state: {
        regs: { ...before.state.regs, rax: '12345', rbx: '777' },
        debugregs: { ...before.state.debugregs, dr7: '1025' },
        msrs: {
          entries: [
            { index: 0x174, data: '16' },
            { index: 0xdead0000, data: '1' },
          ],
        },
      },
    });
    const details = expectStatus(err, grpc.status.INVALID_ARGUMENT, 'KERNEL_REJECTED', { section: 'STATE_SECTION_MSRS', ioctl: 'KVM_SET_MSRS' });
    expect(err.details).toMatch(/section msrs/);
    expect(err.details).toMatch(/0xdead0000/);
    expect(details.badRequest?.[0].field).toBe('state.msrs.entries[1]');
    const after = await call<{ state: Record<string, any> }>(state, 'GetState', {
      vmId: id,
      vcpuId: 0,
      sections: ['STATE_SECTION_REGS', 'STATE_SECTION_DEBUGREGS'],
    });
    expect(after.state.regs).toEqual(before.state.regs);
    expect(after.state.debugregs).toEqual(before.state.debugregs);
    const msr = await call<{ state: Record<string, any> }>(state, 'GetState', { vmId: id, vcpuId: 0, sections: ['STATE_SECTION_MSRS'], msrIndices: [0x174] });
    expect(msr.state.msrs.entries[0].data).toBe('0');
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('SetState rollback undoes newest first: state two sections share (apic_base, MSR 0x1b) ends as it was', async () => {
    // Fuzz soak seed 20261124, request #21,418: sregs and msrs both set apic_base, msrs then failed.
    const id = await counterVm();
    const read = async () =>
      (await call<{ state: Record<string, any> }>(state, 'GetState', { vmId: id, vcpuId: 0, sections: ['STATE_SECTION_SREGS'], msrIndices: [] })).state.sregs;
    const start = await read();
    await call(state, 'SetState', { vmId: id, vcpuId: 0, state: { sregs: { ...start, apicBase: '0' } } });
    const before = await read();
    expect(before.apicBase).toBe('0');
    const err = await callError(state, 'SetState', {
      vmId: id,
      vcpuId: 0,
      state: {
        sregs: { ...before, apicBase: '4096' },
        msrs: {
          entries: [
            { index: 27, data: '4096' },
            { index: 0xc0000102, data: '3548848077501007310' },
          ],
        },
      },
    });
    expectStatus(err, grpc.status.INVALID_ARGUMENT, 'KERNEL_REJECTED', { section: 'STATE_SECTION_MSRS' });
    expect(await read()).toEqual(before);
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('malformed requests get INVALID_ARGUMENT with every violation listed', async () => {
    const id = await counterVm();
    const err = await callError(state, 'SetState', {
      vmId: id,
      vcpuId: 0,
      state: { fpu: { xmm: [Buffer.alloc(3)] }, sregs: { cs: { dpl: 9, type: 99 } } },
    });
    const d = expectStatus(err, grpc.status.INVALID_ARGUMENT, 'INVALID_REQUEST');
    const fields = d.badRequest!.map((v) => v.field).sort();
    expect(fields).toEqual(expect.arrayContaining(['state.fpu.xmm', 'state.sregs.cs.dpl', 'state.sregs.cs.type']));
    const sec = await callError(state, 'GetState', { vmId: id, vcpuId: 0, sections: ['STATE_SECTION_UNSPECIFIED'] });
    expectStatus(sec, grpc.status.INVALID_ARGUMENT, 'INVALID_REQUEST', { field: 'sections[0]' });
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('unknown VM or vCPU: NOT_FOUND naming the field', async () => {
    expectStatus(await callError(state, 'GetState', { vmId: 'nope', vcpuId: 0 }), grpc.status.NOT_FOUND, 'VM_NOT_FOUND', { field: 'vm_id' });
    const id = await counterVm();
    expectStatus(await callError(state, 'GetState', { vmId: id, vcpuId: 7 }), grpc.status.NOT_FOUND, 'VCPU_NOT_FOUND', { field: 'vcpu_id' });
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('nested state on a host without it: FAILED_PRECONDITION naming KVM_CAP_NESTED_STATE', async () => {
    const caps = await call<Record<string, any>>(state, 'GetCapabilities', {});
    if (caps.nested.maxStateSize !== '0' && caps.nested.maxStateSize !== 0) return; // covered by the nested lab
    const id = await counterVm();
    for (const [m, req] of [
      ['GetNestedState', { vmId: id, vcpuId: 0 }],
      ['SetNestedState', { vmId: id, vcpuId: 0, raw: Buffer.alloc(128) }],
    ] as const) {
      const err = await callError(state, m, req);
      expectStatus(err, grpc.status.FAILED_PRECONDITION, 'CAPABILITY_MISSING', { capability: 'KVM_CAP_NESTED_STATE' });
    }
    await call(vms, 'DeleteVm', { vmId: id });
  });

  it('limits: RESOURCE_EXHAUSTED naming the limit', async () => {
    expectStatus(await callError(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 5 }), grpc.status.RESOURCE_EXHAUSTED, 'LIMIT_EXCEEDED', {
      limit: 'max_vcpus_per_vm',
    });
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) ids.push((await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 1 })).vm.id);
    expectStatus(await callError(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 1 }), grpc.status.RESOURCE_EXHAUSTED, 'LIMIT_EXCEEDED', {
      limit: 'max_vms',
    });
    for (const id of ids) await call(vms, 'DeleteVm', { vmId: id });
  });

  it('guest memory: WriteMemory, streamed ReadMemory of a large range, bounds errors', async () => {
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(4 * MiB), vcpuCount: 1 });
    const data = Buffer.alloc(3 * MiB, 0xa5);
    await call(vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(MiB / 2), data });
    const chunks = await collect<{ guestPhysicalAddress: string; data: Buffer }>(vms, 'ReadMemory', {
      vmId: vm.id,
      guestPhysicalAddress: String(MiB / 2),
      length: String(3 * MiB),
    });
    expect(chunks.length).toBe(3);
    expect(Buffer.concat(chunks.map((c) => c.data)).equals(data)).toBe(true);
    expect(chunks.map((c) => Number(c.guestPhysicalAddress))).toEqual([MiB / 2, MiB / 2 + MiB, MiB / 2 + 2 * MiB]);
    const err = await new Promise<grpc.ServiceError>((resolve) => {
      const s = vms.ReadMemory({ vmId: vm.id, guestPhysicalAddress: String(4 * MiB - 8), length: '16' });
      s.on('data', () => {});
      s.on('error', resolve);
    });
    expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err.details).toMatch(/outside guest memory/);
    await call(vms, 'DeleteVm', { vmId: vm.id });
  });

  it('metrics: gRPC and domain metrics are scraped from their own port', async () => {
    const text = await d.scrape();
    expect(text).toMatch(/grpc_server_handled_total\{[^}]*grpc_method="GetState"[^}]*grpc_code="OK"[^}]*\} [1-9]/);
    expect(text).toMatch(/grpc_server_handled_total\{[^}]*grpc_code="NotFound"[^}]*\} [1-9]/);
    expect(text).toMatch(/grpc_server_handling_seconds_bucket\{/);
    expect(text).toMatch(/vcpud_ioctl_duration_seconds_count\{ioctl="KVM_GET_REGS"\} [1-9]/);
    // declared, with no sample: nothing in this file makes an ioctl fail with an errno (test/kvm/ioctl-errors-metric.test.ts)
    expect(text).toMatch(/# TYPE vcpud_ioctl_errors_total counter/);
    expect(text).toMatch(/vcpud_capability\{capability="KVM_CAP_NESTED_STATE"\}/);
    expect(text).toMatch(/vcpud_vcpu_exits_total\{reason="KVM_EXIT_IO"\} [1-9]/);
    expect(text).toMatch(/vcpud_state_bytes_sum\{section="regs"\} [1-9]/);
    expect(text).toMatch(/vcpud_vms \d/);
    expect(text).toMatch(/vcpud_build_info\{/);
    expect(text).toMatch(/process_resident_memory_bytes/);
  });

  it('health is SERVING for the overall server and both services', async () => {
    const h = d.health();
    for (const service of ['', 'vcpud.v1.VcpuStateService', 'vcpud.v1.VmService'])
      expect(await call<{ status: string }>(h, 'Check', { service })).toEqual({ status: 'SERVING' });
  });
});

describeKvm('vcpud without a usable /dev/kvm', () => {
  it('stays up with health NOT_SERVING and answers UNAVAILABLE naming the reason', async () => {
    const d = await startVcpud(['--kvm-path', '/nonexistent/kvm']);
    try {
      const h = d.health();
      expect(await call<{ status: string }>(h, 'Check', { service: '' })).toEqual({ status: 'NOT_SERVING' });
      const err = await callError(d.client('VcpuStateService'), 'GetCapabilities', {});
      expect(err.code).toBe(grpc.status.UNAVAILABLE);
      expect(err.details).toMatch(/\/nonexistent\/kvm/);
      expect(d.logs()).toMatch(/"cannot use KVM"/);
    } finally {
      await d.stop();
    }
  });

  it('exits non-zero when asked to (--exit-on-kvm-error)', async () => {
    await expect(startVcpud(['--kvm-path', '/nonexistent/kvm', '--exit-on-kvm-error'])).rejects.toThrow(/exited with 1/);
  });
});
