/**
 * ffi overhead per ioctl: each state ioctl through src/ffi (decoded, synchronous) and through the
 * addon's Promise twin, against a C loop over the same ioctls (bench/c/ioctl_floor) in the same run.
 * Target: ffi at most 2x the raw C cost per call.
 */
import fs from 'node:fs';
import { Kvm } from '../src/ffi/kvm';
import { native } from '../src/ffi/native';
import { VmRegistry } from '../src/vm/registry';
import { cFloor, fatal, guestBin, knob, meets, nsPerCall, nsPerCallAsync, ratioRow, table, type BenchResult } from './floors';

const N = Number(knob('BENCH_N', '20000', 'ffi-ioctl: calls of each ioctl per batch (5 batches)'));
const ROUNDS = Number(knob('BENCH_ROUNDS', '3', 'ffi-ioctl: rounds of the C floor and the ffi, alternating'));
const TARGET = { op: '<=', ratio: 2 } as const;

/** Rows: the worst ioctl and the sum over all of them; the detail has every ioctl. */
export async function measureFfiIoctl(): Promise<BenchResult> {
  const kvm = Kvm.open();
  const registry = new VmRegistry(kvm);
  const vm = registry.create({ memoryBytes: 2 << 20, vcpuCount: 1 });
  await vm.loadProgram(fs.readFileSync(guestBin('counter64')), 0x1000);
  await vm.resumeAll();
  await new Promise((r) => setTimeout(r, 50));
  await vm.vcpu(0).pause();
  const v = vm.vcpu(0).vcpu;
  const regs = v.getRegs();
  const sregs = v.getSregs();
  const msrList = kvm.msrIndexList();
  const xsaveName = v.vm.checkExtension('XSAVE2') > 0 ? 'KVM_GET_XSAVE2' : 'KVM_GET_XSAVE';
  const cases: [string, () => unknown][] = [
    ['KVM_GET_REGS', () => v.getRegs()],
    ['KVM_SET_REGS', () => v.setRegs(regs)],
    ['KVM_GET_SREGS', () => v.getSregs()],
    ['KVM_SET_SREGS', () => v.setSregs(sregs)],
    ['KVM_GET_FPU', () => v.getFpu()],
    [xsaveName, () => v.getXsave()],
    ['KVM_GET_XCRS', () => v.getXcrs()],
    ['KVM_GET_MSRS', () => v.getMsrs(msrList)],
    ['KVM_GET_LAPIC', () => v.getLapic()],
    ['KVM_GET_VCPU_EVENTS', () => v.getVcpuEvents()],
    ['KVM_GET_DEBUGREGS', () => v.getDebugregs()],
    ['KVM_GET_MP_STATE', () => v.getMpState()],
    ['KVM_GET_TSC_KHZ', () => v.getTscKhz()],
  ];
  // C and ffi alternate, ROUNDS times: each ratio is taken within a round (the two measured minutes
  // apart on a shared host drift by more than the overhead), and the median round's is reported.
  const rounds = Array.from({ length: ROUNDS }, () => {
    const floor = cFloor('ioctl_floor', [String(N), guestBin('counter64')]) as Record<string, number>;
    return cases.map(([name, fn]) => ({ name, raw: floor[name], ffi: nsPerCall(fn, N) }));
  });
  const measured = cases.map(([name], i) => {
    const byRatio = rounds.map((r) => r[i]).sort((a, b) => a.ffi / a.raw - b.ffi / b.raw);
    return { ...byRatio[Math.floor(byRatio.length / 2)], name };
  });
  const floor = { KVM_GET_REGS: measured[0].raw };
  const rawSum = measured.reduce((a, m) => a + m.raw, 0);
  const ffiSum = measured.reduce((a, m) => a + m.ffi, 0);
  const buf = Buffer.alloc(native.sizes.kvm_regs);
  const asyncNs = await nsPerCallAsync(() => native.getRegsAsync(v.fd, buf), Math.min(N, 5000));
  registry.destroyAll();
  kvm.close();

  const yes = (raw: number, ffi: number) => (meets(ffi / raw, TARGET) ? 'yes' : 'NO');
  const rows = [
    ...measured.map((m) => [m.name, m.raw, m.ffi, m.ffi / m.raw, yes(m.raw, m.ffi)]),
    ['all sections (sum)', rawSum, ffiSum, ffiSum / rawSum, yes(rawSum, ffiSum)],
    ['KVM_GET_REGS (Promise twin)', floor.KVM_GET_REGS, asyncNs, asyncNs / floor.KVM_GET_REGS, 'n/a'],
  ];
  const worst = measured.reduce((a, m) => (m.ffi / m.raw > a.ffi / a.raw ? m : a));
  return {
    rows: [
      ratioRow(`ffi per ioctl, worst (${worst.name})`, worst.ffi, worst.raw, 'ns', 'raw C ioctl', TARGET),
      ratioRow(`ffi per ioctl, all ${measured.length} summed`, ffiSum, rawSum, 'ns', 'raw C, summed', TARGET),
    ],
    detail: `ffi overhead per ioctl (ns per call, median of 5 x ${N}; C and ffi alternate ${ROUNDS} times, the median round's ratio; target ratio <= ${TARGET.ratio})\n\n${table(['ioctl', 'raw C', 'ffi', 'ratio', 'met'], rows)}`,
  };
}

async function main(): Promise<void> {
  console.log((await measureFfiIoctl()).detail);
}

if (require.main === module) main().catch(fatal);
