/** src/server/convert/capabilities + vm: GetCapabilitiesResponse, Vm and Vcpu messages, through the wire format. */
import type * as protoLoader from '@grpc/proto-loader';
import type { HostCapabilities } from '../../src/ffi/capabilities';
import { SECTION_NAMES, type SectionName } from '../../src/ffi/sections';
import { capabilitiesToProto, exitReasonName, timestampToProto, vcpuToProto, vmToProto } from '../../src/server/convert';
import { vcpudPackageDefinition } from '../../src/api/proto';
import type { GetCapabilitiesResponse__Output } from '../../src/api/generated/vcpud/v1/GetCapabilitiesResponse';
import type { GetVmResponse__Output } from '../../src/api/generated/vcpud/v1/GetVmResponse';
import type { ManagedVm } from '../../src/vm/managed-vm';
import type { VcpuStatus } from '../../src/vm/managed-vcpu';

/** The package definition the server itself loads (src/api/proto.ts). */
const definition = vcpudPackageDefinition();
const method = (service: string, name: string) => (definition[`vcpud.v1.${service}`] as protoLoader.ServiceDefinition)[name];
const roundTrip = <T>(m: protoLoader.MethodDefinition<object, object>, msg: object): T => m.responseDeserialize(m.responseSerialize(msg)) as T;

function hostCaps(over: Partial<HostCapabilities> = {}): HostCapabilities {
  const sections = Object.fromEntries(SECTION_NAMES.map((s) => [s, { readable: true, writable: true }])) as HostCapabilities['sections'];
  sections.tsc_khz = {
    readable: true,
    writable: false,
    capability: 'KVM_CAP_TSC_CONTROL',
    reason: 'writing needs KVM_CAP_TSC_CONTROL, which KVM_CHECK_EXTENSION reports as 0',
  };
  sections.sregs2 = {
    readable: false,
    writable: false,
    capability: 'KVM_CAP_SREGS2',
    reason: 'reading needs KVM_CAP_SREGS2, which KVM_CHECK_EXTENSION reports as 0',
  };
  sections.lapic = { readable: true, writable: true, capability: 'KVM_CAP_IRQCHIP', reason: 'needs a VM with the in-kernel irqchip' };
  return {
    kvmPath: '/dev/kvm',
    apiVersion: 12,
    kernelRelease: '6.1.0-27-amd64',
    kvmModule: 'kvm_intel',
    vendor: 'intel',
    caps: { KVM_CAP_XSAVE2: 11008, KVM_CAP_SREGS2: 0, KVM_CAP_NESTED_STATE: 8320 },
    vcpuMmapSize: 12288,
    xsaveSize: 11008,
    maxPhysAddrBits: 46,
    msrIndexList: [0x10, 0xc0000080],
    nested: { maxSize: 8320, moduleParameter: 'Y', cpuidVmx: true, cpuidSvm: false, supported: true },
    sections,
    ...over,
  };
}

describe('capabilitiesToProto', () => {
  test('host facts, capabilities and every section', () => {
    const r = roundTrip<GetCapabilitiesResponse__Output>(method('VcpuStateService', 'GetCapabilities'), capabilitiesToProto(hostCaps()));
    expect(r).toMatchObject({
      kvmApiVersion: 12,
      kernelRelease: '6.1.0-27-amd64',
      kvmModule: 'kvm_intel',
      vendor: 'VENDOR_INTEL',
      xsaveSize: 11008,
      vcpuMmapSize: 12288,
      msrIndices: [0x10, 0xc0000080],
    });
    expect(r.nested).toEqual({ maxStateSize: 8320, moduleParameter: 'Y', guestCpuidExposesVirtualization: true, supported: true, reason: '' });
    expect(r.capabilities).toEqual([
      { name: 'KVM_CAP_XSAVE2', value: '11008' },
      { name: 'KVM_CAP_SREGS2', value: '0' },
      { name: 'KVM_CAP_NESTED_STATE', value: '8320' },
    ]);
    expect(r.sections.map((s) => s.section)).toEqual(SECTION_NAMES.map((s) => `STATE_SECTION_${s.toUpperCase()}`));
    const by = (s: SectionName) => r.sections[SECTION_NAMES.indexOf(s)];
    expect(by('regs')).toEqual({ section: 'STATE_SECTION_REGS', readable: true, writable: true, capability: '', reason: '' });
    expect(by('sregs2')).toMatchObject({ readable: false, writable: false, capability: 'KVM_CAP_SREGS2' });
    expect(by('tsc_khz')).toMatchObject({ readable: true, writable: false, capability: 'KVM_CAP_TSC_CONTROL' });
    expect(by('tsc_khz').reason).toMatch(/TSC_CONTROL/);
    expect(by('lapic')).toMatchObject({ capability: 'KVM_CAP_IRQCHIP', reason: 'needs a VM with the in-kernel irqchip' });
  });

  test('vendors and nested support', () => {
    const amd = capabilitiesToProto(
      hostCaps({
        vendor: 'amd',
        nested: { maxSize: 0, cpuidVmx: false, cpuidSvm: true, supported: false, reason: 'no nested' },
      }),
    );
    expect(amd.vendor).toBe('VENDOR_AMD');
    expect(amd.nested).toEqual({ maxStateSize: 0, moduleParameter: '', guestCpuidExposesVirtualization: true, supported: false, reason: 'no nested' });
    expect(capabilitiesToProto(hostCaps({ vendor: 'unknown' })).vendor).toBe('VENDOR_UNSPECIFIED');
    expect(capabilitiesToProto(hostCaps({ vendor: 'unknown' })).nested!.guestCpuidExposesVirtualization).toBe(false);
  });
});

describe('vcpuToProto', () => {
  test('a stopped vCPU: reason, details, exits by name', () => {
    const s: VcpuStatus = { id: 1, state: 'stopped', reason: 'mmio', details: { physAddr: 0xfee00000, len: 4 }, description: 'words', exits: 12 };
    const v = vcpuToProto(s, { '2': 9, '6': 1, '10': 2 });
    expect(v).toEqual({
      id: 1,
      runState: 'VCPU_RUN_STATE_STOPPED',
      stopReason: 'mmio',
      stopDetails: { physAddr: 0xfee00000, len: 4 },
      stopDescription: 'words',
      exits: '12',
      exitCounts: { KVM_EXIT_IO: '9', KVM_EXIT_MMIO: '1', KVM_EXIT_INTR: '2' },
    });
  });

  test.each([
    ['created', 'VCPU_RUN_STATE_CREATED'],
    ['running', 'VCPU_RUN_STATE_RUNNING'],
    ['paused', 'VCPU_RUN_STATE_PAUSED'],
    ['halted', 'VCPU_RUN_STATE_HALTED'],
  ] as const)('%s: no stop reason or details', (state, runState) => {
    const v = vcpuToProto({ id: 0, state, reason: 'stale', details: { x: 1 }, description: 'stale', exits: 0 });
    expect(v).toEqual({ id: 0, runState, stopReason: '', stopDetails: {}, stopDescription: '', exits: '0', exitCounts: {} });
  });

  test('exit reason names', () => {
    expect(exitReasonName('2')).toBe('KVM_EXIT_IO');
    expect(exitReasonName('37')).toBe('KVM_EXIT_NOTIFY');
    expect(exitReasonName('63')).toBe('KVM_EXIT_63');
    expect(exitReasonName('KVM_EXIT_HLT')).toBe('KVM_EXIT_HLT');
  });
});

describe('vmToProto', () => {
  const fakeVm = (cpuidEcx: number) =>
    ({
      id: 'a5c1e0d2-0000-4000-8000-000000000001',
      name: 'test',
      memoryBytes: 2 ** 33,
      createdAt: new Date(Date.UTC(2024, 0, 2, 3, 4, 5, 678)),
      cpuid: [{ function: 1, index: 0, flags: 0, eax: 0, ebx: 0, ecx: cpuidEcx, edx: 0 }],
      vm: { hasIrqchip: true },
      vcpus: [
        { status: (): VcpuStatus => ({ id: 0, state: 'running', details: {}, exits: 5 }), exitCounts: () => ({ '2': 5 }) },
        { status: (): VcpuStatus => ({ id: 1, state: 'stopped', reason: 'done', details: { value: 42 }, exits: 1 }), exitCounts: () => ({ '2': 1 }) },
      ],
    }) as unknown as ManagedVm;

  test('fields, vCPUs and create_time, through the wire format', () => {
    const r = roundTrip<GetVmResponse__Output>(method('VmService', 'GetVm'), { vm: vmToProto(fakeVm(1 << 5)) }).vm!;
    expect(r).toMatchObject({ id: 'a5c1e0d2-0000-4000-8000-000000000001', name: 'test', memoryBytes: '8589934592', nestedExposed: true, irqchip: true });
    expect(r.createTime).toEqual({ seconds: String(Date.UTC(2024, 0, 2, 3, 4, 5) / 1000), nanos: 678_000_000 });
    expect(r.vcpus).toEqual([
      { id: 0, runState: 'VCPU_RUN_STATE_RUNNING', stopReason: '', stopDetails: {}, stopDescription: '', exits: '5', exitCounts: { KVM_EXIT_IO: '5' } },
      {
        id: 1,
        runState: 'VCPU_RUN_STATE_STOPPED',
        stopReason: 'done',
        stopDetails: { value: 42 },
        stopDescription: '',
        exits: '1',
        exitCounts: { KVM_EXIT_IO: '1' },
      },
    ]);
    expect(vmToProto(fakeVm(0)).nestedExposed).toBe(false);
  });

  test('timestamps before 1970 keep nanos non-negative', () => {
    expect(timestampToProto(new Date(-1))).toEqual({ seconds: '-1', nanos: 999_000_000 });
  });
});
