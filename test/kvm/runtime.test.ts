/**
 * The VM runtime on real KVM: guests run on their own threads, pause at any moment with
 * consistent state, and nothing they print is lost or repeated.
 */
import fs from 'node:fs';
import { VcpudError } from '../../src/errors';
import { Kvm } from '../../src/ffi/kvm';
import { VmRegistry } from '../../src/vm/registry';
import { GUEST_ABI } from '../guests/guests';
import { describeKvm, KVM_PATH } from '../support/kvm';
import { consoleText, counterInMemory, counterValues, expectConsecutive, loadGuest, waitForConsole, waitForState, waitUntil } from '../support/runtime';

const MiB = 1024 * 1024;

describeKvm('vm runtime on real KVM', () => {
  let kvm: Kvm;
  let registry: VmRegistry;

  beforeAll(() => {
    kvm = Kvm.open(KVM_PATH);
    registry = new VmRegistry(kvm, { maxVms: 16, maxVcpusPerVm: 4, maxMemoryPerVmBytes: 64 * MiB, maxMemoryTotalBytes: 512 * MiB });
  });
  afterEach(() => registry.destroyAll());
  afterAll(() => kvm.close());

  it.each([
    ['real16', 'real mode ok\n', 16],
    ['prot32', 'protected mode ok\n', 32],
    ['long64', 'long mode ok\n', 64],
  ] as const)('%s prints its line, reports its value and is done', async (name, line, value) => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    const debug: number[] = [];
    vm.on('debug', (d) => debug.push(d.value));
    await loadGuest(vm, name);
    await vm.resumeAll();
    await waitForState(vm, 0, 'stopped');
    expect(consoleText(vm)).toBe(line);
    expect(vm.vcpu(0).status()).toMatchObject({ state: 'stopped', reason: 'done', details: { value: 0 } });
    expect(debug).toEqual([value, 0]);
  });

  it('counter64: paused mid-run, RIP is inside the guest and RBX matches memory; a new RBX changes what it prints next', async () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitUntil(() => counterValues(consoleText(vm)).length > 100, 'counter output');
    await vm.vcpu(0).pause();
    const image = fs.statSync(require('../guests/guests').GUESTS.counter64.file).size;
    const regs = await vm.vcpu(0).withState(() => vm.vcpu(0).vcpu.getRegs());
    expect(Number(regs.rip)).toBeGreaterThanOrEqual(GUEST_ABI.loadAddress);
    expect(Number(regs.rip)).toBeLessThan(GUEST_ABI.loadAddress + image);
    // The guest increments RBX, then stores it: paused between the two (RIP at the store,
    // `mov [r12], rbx` = 49 89 1c 24), memory still holds the previous value.
    const atStore = vm.readMemory(Number(regs.rip), 4).equals(Buffer.from([0x49, 0x89, 0x1c, 0x24]));
    expect(counterInMemory(vm)).toBe(atStore ? regs.rbx - 1n : regs.rbx);

    await vm.vcpu(0).withState(() => vm.vcpu(0).vcpu.setRegs({ ...regs, rbx: 1_000_000n }));
    await vm.vcpu(0).resume();
    await waitForConsole(vm, '\n1000001\n');
    await vm.vcpu(0).pause();
    const values = counterValues(consoleText(vm));
    const at = values.indexOf(1_000_001);
    expect(values[at - 1]).toBe(Number(regs.rbx)); // the value being printed at the pause, then the new one
    expectConsecutive(values.slice(at));
  });

  it('console backpressure: a JS thread too busy to drain holds the vCPU at 64 KiB, and draining lets it go on', async () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitUntil(() => counterValues(consoleText(vm)).length > 10, 'counter output');
    const exitsBefore = vm.vcpu(0).status().exits;
    // Block this thread: nothing drains, the buffer fills and the vCPU thread must wait for room.
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 3000);
    const blocked = vm.vcpu(0).status(); // drains the full buffer: the waiting vCPU must be woken
    expect(blocked.state).toBe('running');
    const text = consoleText(vm);
    await waitUntil(() => consoleText(vm).length > text.length + 4096, 'output after the buffer was drained');
    await vm.vcpu(0).pause();
    const exitsHeld = blocked.exits - exitsBefore;
    expect(exitsHeld).toBeLessThanOrEqual(70 * 1024); // ~64 KiB of one-byte OUTs, not 3 s of them (~200k)
    expectConsecutive(counterValues(consoleText(vm)));
  });

  it('1000 pause/resume cycles: the printed sequence has no gap and no repeat', async () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    for (let i = 0; i < 1000; i++) {
      const s = await vm.vcpu(0).pause();
      expect(s.state).toBe('paused');
      await vm.vcpu(0).resume();
    }
    await vm.vcpu(0).pause();
    const values = counterValues(consoleText(vm));
    expect(values[0]).toBe(1);
    const last = expectConsecutive(values);
    // The guest increments, stores, then prints: memory holds the last printed value, or the
    // next one whose line is partly printed (the partial line is a prefix of it).
    const partial = consoleText(vm).split('\n').pop()!;
    const inMemory = counterInMemory(vm);
    if (partial !== '') expect(inMemory).toBe(BigInt(last + 1));
    else expect([BigInt(last), BigInt(last + 1)]).toContain(inMemory);
    expect(String(inMemory).startsWith(partial)).toBe(true);
    expect(vm.vcpu(0).status().state).toBe('paused');
  });

  it('state access on a running vCPU pauses around the work, or is refused with no_implicit_pause', async () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    const regs = await vm.vcpu(0).withState(() => vm.vcpu(0).vcpu.getRegs());
    expect(regs.rbx).toBeGreaterThanOrEqual(0n);
    expect(vm.vcpu(0).status().state).toBe('running');
    await expect(vm.vcpu(0).withState(() => 1, { noImplicitPause: true })).rejects.toMatchObject({
      kind: 'failed_precondition',
      message: expect.stringContaining('no_implicit_pause'),
    });
  });

  it('8 VMs x 2 vCPUs run at once, each vCPU counting on its own', async () => {
    const vms = Array.from({ length: 8 }, () => registry.create({ memoryBytes: 2 * MiB, vcpuCount: 2 }));
    for (const vm of vms) await loadGuest(vm, 'counter64');
    await Promise.all(vms.map((vm) => vm.resumeAll()));
    await waitUntil(() => vms.every((vm) => counterInMemory(vm, 0) > 50n && counterInMemory(vm, 1) > 50n), 'every vCPU of every VM to count past 50', 30_000);
    expect(vms.flatMap((vm) => vm.statuses().map((s) => s.state))).toEqual(Array(16).fill('running'));
  });

  it('destroy while running frees every fd and thread', async () => {
    const fds = () => fs.readdirSync('/proc/self/fd').length;
    const before = fds();
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 2 });
    await loadGuest(vm, 'counter64');
    await vm.resumeAll();
    await waitUntil(() => counterInMemory(vm) > 10n, 'counting');
    registry.destroy(vm.id);
    expect(vm.isDestroyed).toBe(true);
    expect(fds()).toBe(before);
    expect(() => registry.get(vm.id)).toThrow(/no VM with id/);
  });

  it('an unhandled exit stops the vCPU with its reason and details', async () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    await loadGuest(vm, 'unhandled64');
    await vm.resumeAll();
    await waitForState(vm, 0, 'stopped');
    expect(consoleText(vm)).toBe('mmio next\n');
    expect(vm.vcpu(0).status()).toMatchObject({
      state: 'stopped',
      reason: 'mmio',
      details: { physAddr: GUEST_ABI.mmioAddress, len: 4, isWrite: 1, data: 0xdeadbeef },
    });
  });

  it('without an in-kernel irqchip HLT halts the vCPU, and it resumes', async () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1, noIrqchip: true });
    await loadGuest(vm, 'real16');
    await vm.resumeAll();
    await waitForState(vm, 0, 'stopped'); // done(0) comes first
    await vm.vcpu(0).resume();
    await waitForState(vm, 0, 'halted');
    const rip = (await vm.vcpu(0).withState(() => vm.vcpu(0).vcpu.getRegs())).rip;
    await vm.vcpu(0).resume(); // the guest loops on HLT: it halts again, one instruction later or at the same HLT
    await waitForState(vm, 0, 'halted');
    const rip2 = (await vm.vcpu(0).withState(() => vm.vcpu(0).vcpu.getRegs())).rip;
    expect(Math.abs(Number(rip2 - rip))).toBeLessThan(16);
  });

  it('limits are enforced with an error naming the limit', () => {
    const small = new VmRegistry(kvm, { maxVms: 1, maxVcpusPerVm: 2, maxMemoryPerVmBytes: 4 * MiB, maxMemoryTotalBytes: 6 * MiB });
    try {
      const expectLimit = (fn: () => unknown, limit: string) => {
        try {
          fn();
        } catch (e) {
          expect(e).toBeInstanceOf(VcpudError);
          expect(e).toMatchObject({ kind: 'resource_exhausted', details: { limit } });
          expect((e as Error).message).toContain(limit);
          return;
        }
        throw new Error(`expected limit ${limit}`);
      };
      expectLimit(() => small.create({ memoryBytes: 2 * MiB, vcpuCount: 3 }), 'max_vcpus_per_vm');
      expectLimit(() => small.create({ memoryBytes: 8 * MiB, vcpuCount: 1 }), 'max_memory_per_vm_bytes');
      small.create({ memoryBytes: 4 * MiB, vcpuCount: 1 });
      expectLimit(() => small.create({ memoryBytes: 2 * MiB, vcpuCount: 1 }), 'max_vms');
    } finally {
      small.destroyAll();
    }
  });

  it('guest memory is read and written by guest-physical address with bounds checks', () => {
    const vm = registry.create({ memoryBytes: 2 * MiB, vcpuCount: 1 });
    vm.writeMemory(0x8000, Buffer.from('vcpud'));
    expect(vm.readMemory(0x8000, 5).toString()).toBe('vcpud');
    expect(() => vm.readMemory(2 * MiB - 2, 4)).toThrow(/outside guest memory/);
    expect(() => vm.writeMemory(2 * MiB, Buffer.alloc(1))).toThrow(VcpudError);
  });
});
