/**
 * Words for a stop the runner reports only as numbers: KVM_EXIT_INTERNAL_ERROR carries a suberror
 * and opaque data, which told a user nothing when the usual cause is simply that no program was
 * loaded (the vCPU starts at the reset vector 0xffff0000 + 0xfff0, outside a small VM's memory).
 * Read once per stop (the vCPU is out of KVM_RUN while stopped): RIP, CS and CR0, and the guest
 * memory at RIP when paging is off.
 */
import type { Vcpu } from '../ffi/vcpu';
import type { VcpuStatus } from './managed-vcpu';
import { hex } from './snapshot-format';

/** KVM_INTERNAL_ERROR_* (include/uapi/linux/kvm.h), with what each means. */
const SUBERRORS: Readonly<Record<number, string>> = {
  1: 'KVM_INTERNAL_ERROR_EMULATION: KVM could not emulate the instruction',
  2: 'KVM_INTERNAL_ERROR_SIMUL_EX: an exception occurred while delivering another',
  3: 'KVM_INTERNAL_ERROR_DELIVERY_EV: an event could not be delivered',
  4: 'KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: the hardware exited for a reason KVM does not handle',
};

/** Where the x86 reset state starts executing: CS base 0xffff0000, RIP 0xfff0. */
const RESET_VECTOR = 0xfffffff0;
const CR0_PG = 1n << 31n;
/** Bytes read at RIP: the longest x86 instruction. */
const INSN_BYTES = 15;

/** The guest memory facts the explanation needs (ManagedVm's memory). */
export interface GuestMemoryView {
  size: number;
  read(gpa: number, length: number): Buffer;
}

/**
 * A status transform for one vCPU: an internal_error stop gains details `rip` and `ripAddress`
 * (CS base + RIP) and a description saying what happened and, when the code at RIP is absent (all
 * zero, or outside guest memory), that no program seems to be loaded. Computed once per stop.
 */
export function internalErrorExplainer(vcpu: Vcpu, memory: GuestMemoryView): (s: VcpuStatus) => VcpuStatus {
  let cached: { exits: number; status: VcpuStatus } | undefined;
  return (s) => {
    if (s.state !== 'stopped' || s.reason !== 'internal_error') return s;
    if (cached?.exits !== s.exits) cached = { exits: s.exits, status: explain(vcpu, memory, s) };
    return cached.status;
  };
}

function explain(vcpu: Vcpu, memory: GuestMemoryView, s: VcpuStatus): VcpuStatus {
  const what = SUBERRORS[s.details.suberror] ?? `suberror ${s.details.suberror}`;
  let rip: bigint, csBase: bigint, csSelector: number, paging: boolean;
  try {
    rip = vcpu.getRegs().rip;
    const sregs = vcpu.getSregs();
    csBase = sregs.cs.base;
    csSelector = sregs.cs.selector;
    paging = (sregs.cr0 & CR0_PG) !== 0n;
  } catch (e) {
    return { ...s, description: `${what} (RIP unknown: ${(e as Error).message})` };
  }
  const address = Number(csBase + rip);
  const at = `at CS:RIP ${hex(csSelector)}:${hex(rip)} (address ${hex(address)}${paging ? ', linear: paging is on' : ''})`;
  const details = { ...s.details, rip: Number(rip), ripAddress: address };
  let code = '';
  try {
    if (!paging) code = codeAt(memory, address);
  } catch (e) {
    code = ` (guest memory there unreadable: ${(e as Error).message})`;
  }
  return { ...s, details, description: `${what} ${at}${code}` };
}

/** What the guest memory at a physical address says about the stop (paging off). */
function codeAt(memory: GuestMemoryView, address: number): string {
  const load = 'no program loaded? (LoadProgram, `vcpuctl load VM FILE`, before running)';
  const reset = address === RESET_VECTOR ? 'the reset vector, ' : '';
  if (address + INSN_BYTES > memory.size) return `, ${reset}outside the VM's guest memory (${hex(memory.size)} bytes): ${load}`;
  const bytes = memory.read(address, INSN_BYTES);
  if (bytes.every((b) => b === 0)) return `, where guest memory is all zero: ${load}`;
  return `; the bytes there: ${bytes.toString('hex').replace(/(..)(?!$)/g, '$1 ')}`;
}
