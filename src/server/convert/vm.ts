/** ManagedVm / VcpuStatus -> Vm / Vcpu (protos/vcpud/v1/vm.proto), and the u64 request-field helpers. */
import { hasBit, SVM_BIT, VMX_BIT } from '../../ffi/cpuid-facts';
import type { RunStateName } from '../../ffi/native';
import type { ManagedVm } from '../../vm/managed-vm';
import type { VcpuStatus } from '../../vm/managed-vcpu';
import type { Timestamp } from '../../api/generated/google/protobuf/Timestamp';
import type { Vcpu } from '../../api/generated/vcpud/v1/Vcpu';
import type { VcpuRunState } from '../../api/generated/vcpud/v1/VcpuRunState';
import type { Vm } from '../../api/generated/vcpud/v1/Vm';

export { safeNumber, u64, type LongLike, type U64Input } from './scalars';

const RUN_STATES: Readonly<Record<RunStateName, VcpuRunState>> = {
  created: 'VCPU_RUN_STATE_CREATED',
  running: 'VCPU_RUN_STATE_RUNNING',
  paused: 'VCPU_RUN_STATE_PAUSED',
  halted: 'VCPU_RUN_STATE_HALTED',
  stopped: 'VCPU_RUN_STATE_STOPPED',
};

/** KVM_EXIT_* of <linux/kvm.h> by number (the keys of ManagedVcpu.exitCounts()). */
const KVM_EXIT_NAMES = [
  'UNKNOWN',
  'EXCEPTION',
  'IO',
  'HYPERCALL',
  'DEBUG',
  'HLT',
  'MMIO',
  'IRQ_WINDOW_OPEN',
  'SHUTDOWN',
  'FAIL_ENTRY',
  'INTR',
  'SET_TPR',
  'TPR_ACCESS',
  'S390_SIEIC',
  'S390_RESET',
  'DCR',
  'NMI',
  'INTERNAL_ERROR',
  'OSI',
  'PAPR_HCALL',
  'S390_UCONTROL',
  'WATCHDOG',
  'S390_TSCH',
  'EPR',
  'SYSTEM_EVENT',
  'S390_STSI',
  'IOAPIC_EOI',
  'HYPERV',
  'ARM_NISV',
  'X86_RDMSR',
  'X86_WRMSR',
  'DIRTY_RING_FULL',
  'AP_RESET_HOLD',
  'X86_BUS_LOCK',
  'XEN',
  'RISCV_SBI',
  'RISCV_CSR',
  'NOTIFY',
  'LOONGARCH_IOCSR',
  'MEMORY_FAULT',
  'TDX',
] as const;

/** 'KVM_EXIT_IO' for key '2'; a key that is not a number is taken as a name already; unnamed numbers as 'KVM_EXIT_<n>'. */
export function exitReasonName(key: string): string {
  if (!/^[0-9]+$/.test(key)) return key;
  return `KVM_EXIT_${KVM_EXIT_NAMES[Number(key)] ?? key}`;
}

export function timestampToProto(d: Date): Timestamp {
  const ms = d.getTime();
  const seconds = Math.floor(ms / 1000);
  return { seconds: String(seconds), nanos: (ms - seconds * 1000) * 1_000_000 };
}

/**
 * A vCPU's status. stop_reason and stop_details only for STOPPED; `exitCounts` keyed by KVM_EXIT_* number
 * (ManagedVcpu.exitCounts()) or name; both become names, counts decimal strings.
 */
export function vcpuToProto(s: VcpuStatus, exitCounts: Record<string, number> = {}): Vcpu {
  const stopped = s.state === 'stopped';
  return {
    id: s.id,
    runState: RUN_STATES[s.state] ?? 'VCPU_RUN_STATE_UNSPECIFIED',
    stopReason: stopped ? (s.reason ?? '') : '',
    stopDetails: stopped ? { ...s.details } : {},
    stopDescription: stopped ? (s.description ?? '') : '',
    exits: String(s.exits),
    exitCounts: Object.fromEntries(Object.entries(exitCounts).map(([k, n]) => [exitReasonName(k), String(n)])),
  };
}

export function vmToProto(vm: ManagedVm): Vm {
  return {
    id: vm.id,
    name: vm.name,
    memoryBytes: String(vm.memoryBytes),
    vcpus: vm.vcpus.map((v) => vcpuToProto(v.status(), v.exitCounts())),
    createTime: timestampToProto(vm.createdAt),
    nestedExposed: hasBit(vm.cpuid, VMX_BIT) || hasBit(vm.cpuid, SVM_BIT),
    irqchip: vm.vm.hasIrqchip,
  };
}
