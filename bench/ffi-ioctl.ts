/**
 * ffi overhead per ioctl: each state ioctl through src/ffi (decoded, synchronous) and through the
 * addon's Promise twin, against a C loop over the same ioctls (bench/c/ioctl_floor) in the same run.
 * Target: ffi at most 2x the raw C cost per call.
 */
import fs from 'node:fs';
import { Kvm } from '../src/ffi/kvm';
import { native } from '../src/ffi/native';
import { VmRegistry } from '../src/vm/registry';
import { cFloor, guestBin, nsPerCall, nsPerCallAsync, table } from './floors';

const N = Number(process.env.BENCH_N ?? 20000);

async function main(): Promise<void> {
  const floor = cFloor('ioctl_floor', [String(N), guestBin('counter64')]) as Record<string, number>;
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
  const rows: (string | number)[][] = [];
  let rawSum = 0;
  let ffiSum = 0;
  for (const [name, fn] of cases) {
    const ffi = nsPerCall(fn, N);
    const raw = floor[name];
    rawSum += raw;
    ffiSum += ffi;
    rows.push([name, raw, ffi, ffi / raw, ffi / raw <= 2 ? 'yes' : 'NO']);
  }
  rows.push(['all sections (sum)', rawSum, ffiSum, ffiSum / rawSum, ffiSum / rawSum <= 2 ? 'yes' : 'NO']);
  const buf = Buffer.alloc(native.sizes.kvm_regs);
  const asyncNs = await nsPerCallAsync(() => native.getRegsAsync(v.fd, buf), Math.min(N, 5000));
  rows.push(['KVM_GET_REGS (Promise twin)', floor.KVM_GET_REGS, asyncNs, asyncNs / floor.KVM_GET_REGS, 'n/a']);
  console.log(`ffi overhead per ioctl (ns per call, median of 5 x ${N}; target ratio <= 2)\n`);
  console.log(table(['ioctl', 'raw C', 'ffi', 'ratio', 'met'], rows));
  registry.destroyAll();
  kvm.close();
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
