/**
 * A VM owned by vcpud: the KVM VM, one memory slot at GPA 0, the in-kernel irqchip, its vCPUs
 * (CPUID set from the policy before anything runs), its console and its guest-program loader.
 */
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { failedPrecondition, notFound, VcpudError } from '../errors';
import type { Kvm } from '../ffi/kvm';
import { encodeCpuid2, type CpuidEntry2 } from '../ffi/sections';
import type { NativeGuestMemory } from '../ffi/native';
import type { Vm } from '../ffi/vm';
import { ConsoleBuffer } from './console';
import { applyCpuidPolicy, type CpuidPolicy } from './cpuid-policy';
import { ManagedVcpu, type VcpuStatus } from './managed-vcpu';
import { classifyStop, withBackingChecked } from './memory-backing';
import { hex } from './snapshot-format';
import { internalErrorExplainer } from './stop-explanation';

export interface VmSpec {
  name?: string;
  memoryBytes: number;
  vcpuCount: number;
  cpuidPolicy?: CpuidPolicy;
  /** Without the in-kernel irqchip HLT exits to vcpud (the vCPU shows "halted"); LAPIC state is unavailable. */
  noIrqchip?: boolean;
}

/** What a restore brings along instead of fresh defaults. */
export interface VmPrepared {
  /** Guest memory already loaded (or mapped) from a snapshot; the VM owns it from then on. */
  memory?: NativeGuestMemory;
  /** The exact CPUID the vCPUs get (a snapshot's), instead of the policy applied to the host's. */
  cpuid?: CpuidEntry2[];
  /** The KVM VM already made by prepareKvmVm (TSS, irqchip and memory in place); `memory` unused. */
  vm?: Vm;
  /** The id and creation time it had before (a restart hands the VM over); default: new ones. */
  id?: string;
  createdAt?: Date;
}

export interface VmEvents {
  console: [Buffer];
  debug: [{ vcpu: number; value: number; done: boolean }];
  state: [VcpuStatus];
  destroyed: [];
}

/** Where Intel's real-mode TSS goes: three pages just below the 4 GiB BIOS area, outside RAM. */
const TSS_ADDR = 0xfffbd000;
const KVM_MP_STATE_RUNNABLE = 0;

/** The CPUID prepareKvmVm gave the vCPUs it made: ManagedVm.create sets it again only when it is not the one due. */
const preparedCpuid = new WeakMap<Vm, CpuidEntry2[]>();

export class ManagedVm extends EventEmitter<VmEvents> {
  readonly id: string;
  readonly createdAt: Date;
  readonly console = new ConsoleBuffer();
  readonly vcpus: ManagedVcpu[] = [];
  readonly cpuid: CpuidEntry2[];
  private destroyed = false;
  /** Why run control and memory writes are refused right now (a snapshot or migration holds the VM). */
  private holder?: string;

  private constructor(
    readonly spec: VmSpec,
    readonly vm: Vm,
    supportedCpuid: CpuidEntry2[],
    cpuid?: CpuidEntry2[],
    identity: { id?: string; createdAt?: Date } = {},
  ) {
    super();
    this.id = identity.id ?? randomUUID();
    this.createdAt = identity.createdAt ?? new Date();
    // One listener per StreamConsole stream: many are legitimate (bounded by the stream limits), not a leak.
    this.setMaxListeners(0);
    this.cpuid = cpuid ?? applyCpuidPolicy(supportedCpuid, spec.cpuidPolicy ?? { exposeNested: false });
  }

  /**
   * The KVM side of a VM (KVM_CREATE_VM, TSS, irqchip, `memory` as slot 0) made off the JS thread,
   * for ManagedVm.create's `prepared.vm`: a restore does this while it verifies the snapshot. The
   * caller closes it if it ends up unused.
   */
  static async prepareKvmVm(kvm: Kvm, spec: VmSpec, memory: NativeGuestMemory, cpuid?: CpuidEntry2[]): Promise<Vm> {
    const vm = await kvm.createVmAsync();
    try {
      if (kvm.checkExtension('SET_TSS_ADDR') > 0) vm.setTssAddr(TSS_ADDR);
      if (!spec.noIrqchip && kvm.checkExtension('IRQCHIP') > 0) vm.createIrqchip();
      await vm.addMemoryAsync(0, memory);
      // With the CPUID known (a snapshot's or a migration's) the vCPUs are made here too: in a
      // migration's commit, creating them and setting their CPUID took 0.5-1.9 ms of the guest's
      // paused window (BENCHMARKS.md, "switch-over fixed costs").
      if (cpuid) {
        for (let i = 0; i < spec.vcpuCount; i++) vm.createVcpu(i).setCpuid2(cpuid);
        preparedCpuid.set(vm, cpuid);
      }
      return vm;
    } catch (e) {
      vm.close();
      throw e;
    }
  }

  /** Creates the VM with everything its vCPUs need before their first KVM_RUN. */
  static create(kvm: Kvm, spec: VmSpec, supportedCpuid: CpuidEntry2[], prepared: VmPrepared = {}): ManagedVm {
    let vm: Vm;
    try {
      vm = prepared.vm ?? kvm.createVm();
    } catch (e) {
      prepared.memory?.release();
      throw e;
    }
    const m = new ManagedVm(spec, vm, supportedCpuid, prepared.cpuid, prepared);
    try {
      if (!prepared.vm) {
        if (kvm.checkExtension('SET_TSS_ADDR') > 0) vm.setTssAddr(TSS_ADDR);
        if (!spec.noIrqchip && kvm.checkExtension('IRQCHIP') > 0) vm.createIrqchip();
        try {
          vm.addMemory(0, spec.memoryBytes, 0, prepared.memory);
        } finally {
          prepared.memory = undefined; // owned by the VM (or released) from here on
        }
      } else if (vm.regions.length !== 1 || vm.regions[0].size !== spec.memoryBytes) {
        throw new VcpudError('internal', 'a prepared VM must have exactly its memory as slot 0');
      }
      const preset = preparedCpuid.get(vm);
      const cpuidSet = preset !== undefined && encodeCpuid2(preset).equals(encodeCpuid2(m.cpuid));
      for (let i = 0; i < spec.vcpuCount; i++) {
        const made = vm.vcpus.get(i); // by prepareKvmVm
        const vcpu = made ?? vm.createVcpu(i);
        if (!made || !cpuidSet) vcpu.setCpuid2(m.cpuid); // before the first KVM_RUN: long mode faults without it
        const explain = internalErrorExplainer(vcpu, { size: spec.memoryBytes, read: (gpa, length) => m.readMemory(gpa, length) });
        m.adopt(
          new ManagedVcpu(
            vcpu,
            () => m.heldBy(),
            (s) => explain(classifyStop(vm.regions, s)),
          ),
        );
      }
    } catch (e) {
      prepared.memory?.release();
      m.destroy();
      throw e;
    }
    return m;
  }

  /**
   * Holds the VM for a snapshot or migration: until release() its vCPUs cannot be resumed and its
   * memory cannot be written (FAILED_PRECONDITION naming `what`), so the captured state stays
   * consistent. One holder at a time.
   */
  hold(what: string): () => void {
    this.assertAlive();
    if (this.holder) throw failedPrecondition(`VM ${this.id} is busy: ${this.holder}`, 'WRONG_RUN_STATE');
    this.holder = what;
    return () => {
      if (this.holder === what) this.holder = undefined;
    };
  }

  heldBy(): string | undefined {
    return this.holder;
  }

  /** Throws NOT_FOUND once the VM is deleted: for callers that awaited since they looked it up. */
  assertAlive(): void {
    if (this.destroyed) throw notFound(`VM ${this.id} was deleted`, 'VM_NOT_FOUND', 'vm_id');
  }

  private assertNotHeld(op: string): void {
    if (this.holder) throw failedPrecondition(`cannot ${op}: VM ${this.id} is held (${this.holder})`, 'WRONG_RUN_STATE');
  }

  get name(): string {
    return this.spec.name ?? '';
  }

  get memoryBytes(): number {
    return this.spec.memoryBytes;
  }

  vcpu(id: number): ManagedVcpu {
    const v = this.vcpus[id];
    if (!v) throw notFound(`VM ${this.id} has no vCPU ${id} (it has ${this.vcpus.length})`, 'VCPU_NOT_FOUND', 'vcpu_id');
    return v;
  }

  readMemory(gpa: number, length: number): Buffer {
    this.assertAlive();
    const { region } = this.vm.regionFor(gpa, length);
    return withBackingChecked(this.vm.regions, region, this.id, `reading ${hex(length)} bytes of guest memory from ${hex(gpa)}`, () =>
      this.vm.readMemory(gpa, length),
    );
  }

  writeMemory(gpa: number, data: Buffer): void {
    this.assertAlive();
    this.assertNotHeld('write guest memory');
    const { region } = this.vm.regionFor(gpa, data.length);
    withBackingChecked(this.vm.regions, region, this.id, `writing ${hex(data.length)} bytes of guest memory at ${hex(gpa)}`, () =>
      this.vm.writeMemory(gpa, data),
    );
  }

  /**
   * Loads a flat binary and points every vCPU at it in real mode (CS base 0, RIP = entry,
   * RSI = vCPU index), as the guest ABI in test/guests/README.md describes.
   */
  async loadProgram(image: Buffer, loadAddress: number, entry = loadAddress): Promise<void> {
    if (entry > 0xffff) throw new VcpudError('invalid_argument', `entry 0x${entry.toString(16)} is not reachable in real mode with CS base 0`);
    this.writeMemory(loadAddress, image);
    await Promise.all(
      this.vcpus.map((v) =>
        v.withState(() => {
          const s = v.vcpu.getSregs();
          for (const seg of [s.cs, s.ds, s.es, s.fs, s.gs, s.ss]) {
            seg.base = 0n;
            seg.selector = 0;
          }
          v.vcpu.setSregs(s);
          const r = v.vcpu.getRegs();
          for (const k of Object.keys(r) as (keyof typeof r)[]) r[k] = 0n;
          r.rip = BigInt(entry);
          r.rflags = 2n;
          r.rsi = BigInt(v.id);
          v.vcpu.setRegs(r);
          // APs wait for INIT/SIPI under an in-kernel irqchip; our guests start every vCPU directly.
          v.vcpu.setMpState(KVM_MP_STATE_RUNNABLE);
        }),
      ),
    );
  }

  resumeAll(): Promise<VcpuStatus[]> {
    return Promise.all(this.vcpus.map((v) => v.resume()));
  }

  pauseAll(): Promise<VcpuStatus[]> {
    return Promise.all(this.vcpus.map((v) => v.pause()));
  }

  statuses(): VcpuStatus[] {
    return this.vcpus.map((v) => v.status());
  }

  /** Stops every vCPU thread (also while running), then frees fds and memory. Idempotent. */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    for (const v of this.vcpus) v.destroy();
    this.vm.close();
    this.emit('destroyed');
    this.removeAllListeners();
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }

  private adopt(v: ManagedVcpu): void {
    this.vcpus.push(v);
    v.on('console', (c) => {
      this.console.append(c);
      this.emit('console', c);
    });
    v.on('debug', (d) => this.emit('debug', d));
    v.on('state', (s) => this.emit('state', s));
  }
}
