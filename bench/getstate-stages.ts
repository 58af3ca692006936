/**
 * Where one GetState's server CPU goes, stage by stage, in this process (no gRPC): the raw ioctls (the C
 * floor of bench/c, same run), reading the 13 sections (12 ioctls) through the ffi, encoding the response, the
 * metrics recorded per call, and taking the vCPU's lock. Each stage is timed alone, as CPU time per call
 * (process.cpuUsage, median of 5 batches: CPU time, not wall time, so other processes on the host
 * inflate it less). The old path (decoded sections, stateToProto, the object wire encoder) is timed
 * beside the one GetState uses (kernel bytes, convert/raw-state.ts).
 *
 *   node dist/bench/getstate-stages.js      (BENCH_N calls per batch, default 2000)
 */
import fs from 'node:fs';
import { probeCapabilities } from '../src/ffi/capabilities';
import { Kvm } from '../src/ffi/kvm';
import { setIoctlObserver } from '../src/ffi/observe';
import { stateToProto } from '../src/server/convert';
import { getStateResponseEncoder } from '../src/server/convert/raw-state';
import { Metrics } from '../src/server/metrics';
import { vcpudPackageDefinition } from '../src/api/proto';
import { wireSerializer } from '../src/server/wire-encoder';
import type { Vcpu } from '../src/ffi/vcpu';
import type { ManagedVcpu } from '../src/vm/managed-vcpu';
import type { ManagedVm } from '../src/vm/managed-vm';
import { VmRegistry } from '../src/vm/registry';
import { readState, readStateBytes, readStateBytesPerSection, readStateBytesReused, readableSections, reusedRead } from '../src/vm/vcpu-state';
import type { StateContext } from '../src/vm/vcpu-state';
import { cFloor, fatal, guestBin, knob, median, table } from './floors';

const N = Number(knob('BENCH_N', '2000', 'getstate-stages: calls per batch (5 batches per stage)'));

/** CPU microseconds per call of `fn`: median of 5 batches of `n`. */
export function cpuUsPerCall(fn: () => unknown, n = N): number {
  const per: number[] = [];
  for (let b = 0; b < 5; b++) {
    const t = process.cpuUsage();
    for (let i = 0; i < n; i++) fn();
    const d = process.cpuUsage(t);
    per.push((d.user + d.system) / n);
  }
  return median(per);
}

/** cpuUsPerCall for a call that returns a promise, awaited before the next. */
export async function cpuUsPerCallAsync(fn: () => Promise<unknown>, n = N): Promise<number> {
  const per: number[] = [];
  for (let b = 0; b < 5; b++) {
    const t = process.cpuUsage();
    for (let i = 0; i < n; i++) await fn();
    const d = process.cpuUsage(t);
    per.push((d.user + d.system) / n);
  }
  return median(per);
}

export interface Stage {
  name: string;
  us: number;
  note: string;
}

/**
 * Runs `measure` on a vCPU of this process that ran counter64 for 50 ms and was paused (as vcpud's
 * bench VMs are), then frees the VM and KVM.
 */
export async function withPausedCounterVcpu<T>(measure: (p: { vm: ManagedVm; managed: ManagedVcpu; v: Vcpu; sctx: StateContext }) => Promise<T>): Promise<T> {
  const kvm = Kvm.open();
  const caps = probeCapabilities(kvm);
  const registry = new VmRegistry(kvm);
  try {
    const vm = registry.create({ memoryBytes: 2 << 20, vcpuCount: 1 });
    await vm.loadProgram(fs.readFileSync(guestBin('counter64')), 0x1000);
    await vm.resumeAll();
    await new Promise((r) => setTimeout(r, 50));
    const managed = vm.vcpu(0);
    await managed.pause();
    return await measure({ vm, managed, v: managed.vcpu, sctx: { caps, irqchip: vm.vm.hasIrqchip } });
  } finally {
    registry.destroyAll();
    kvm.close();
  }
}

export function measureStages(): Promise<Stage[]> {
  return withPausedCounterVcpu(async ({ managed, v, sctx }) => {
    const sections = readableSections(sctx);

    const floor = cFloor('ioctl_floor', ['20000', guestBin('counter64')]) as Record<string, number>;
    const rawUs =
      Object.entries(floor)
        .filter(([k]) => k.startsWith('KVM_GET_'))
        .reduce((a, [, ns]) => a + ns, 0) / 1000;

    const defs = vcpudPackageDefinition();
    const encodeBytes = getStateResponseEncoder(defs);
    const encodeObjects = wireSerializer(defs, 'vcpud.v1.GetStateResponse');
    const bytesRead = readStateBytesReused(v, sctx, []);
    const decodedRead = readState(v, sctx, []);
    const extras = { msrsUnreadable: bytesRead.msrsUnreadable };

    const metrics = new Metrics({ defaultMetrics: false });
    const labels = { grpc_type: 'unary', grpc_service: 'vcpud.v1.VcpuStateService', grpc_method: 'GetState' } as const;
    const observer = metrics.ioctlObserver();
    const ioctlNames = Object.keys(floor).filter((k) => k.startsWith('KVM_GET_'));

    const stages: Stage[] = [
      { name: 'raw ioctls (C, 12 GET ioctls summed)', us: rawUs, note: 'bench/c/ioctl_floor, this run' },
      {
        name: 'read sections through the ffi, as kernel bytes',
        us: cpuUsPerCall(() => readStateBytesReused(v, sctx, [])),
        note: 'readStateBytesReused (GetState): one native call, buffers kept',
      },
      {
        name: 'read and encode the response in one native call',
        us: cpuUsPerCall(() => encodeBytes.readResponse(reusedRead(v, sctx, [])!, false)),
        note: "GetState's path: a kept read's PreparedBatch runs the ioctls, then the encoder's program",
      },
      {
        name: 'the same, plans and buffers made per call',
        us: cpuUsPerCall(() => readStateBytes(v, sctx, [])),
        note: 'readStateBytes',
      },
      {
        name: 'the same, one native call per ioctl',
        us: cpuUsPerCall(() => readStateBytesPerSection(v, sctx, [])),
        note: 'readStateBytesPerSection (before the batch)',
      },
      { name: 'read sections through the ffi, decoded', us: cpuUsPerCall(() => readState(v, sctx, [])), note: 'readState (the old path; SetState, snapshots)' },
      {
        name: 'encode the response from kernel bytes',
        us: cpuUsPerCall(() => encodeBytes(bytesRead.values, extras, false)),
        note: 'convert/raw-state.ts (GetState): one native run of a wire program',
      },
      {
        name: 'stateToProto + object wire encoder',
        us: cpuUsPerCall(() => encodeObjects({ state: stateToProto(decodedRead.values, extras), implicitlyPaused: false })),
        note: 'the old path',
      },
      {
        name: 'metrics: 12 ioctl durations + 13 section sizes',
        us: cpuUsPerCall(() => {
          for (const name of ioctlNames) observer.onIoctl(name, 1e-5);
          for (const s of sections) metrics.stateBytesRecorder(s)(512);
        }),
        note: 'bound observers (src/server/bound-histogram.ts)',
      },
      {
        name: 'metrics: the RPC counters and histogram',
        us: cpuUsPerCall(() => {
          metrics.rpcStarted(labels);
          metrics.rpcMessageReceived(labels);
          metrics.rpcMessageSent(labels);
          metrics.rpcHandled(labels, 0, 0.001);
        }),
        note: 'the metrics interceptor',
      },
      { name: "the vCPU's lock and status read (paused vCPU)", us: await cpuUsPerCallAsync(() => managed.withState(() => 0)), note: 'ManagedVcpu.withState' },
    ];
    setIoctlObserver(observer);
    try {
      const withObserver = cpuUsPerCall(() => readStateBytesReused(v, sctx, []));
      stages.push({ name: 'read as kernel bytes, ioctl observer installed', us: withObserver, note: 'as vcpud runs it' });
      const perCallWithObserver = cpuUsPerCall(() => readStateBytesPerSection(v, sctx, []));
      stages.push({ name: 'the same, one native call per ioctl', us: perCallWithObserver, note: 'before the batch' });
    } finally {
      setIoctlObserver(undefined);
    }
    return stages;
  });
}

/** A stages table under its title: `what` names the call measured, `n` the calls per batch. */
export function printStages(what: string, stages: Stage[], n: number): void {
  console.log(`${what}, all sections of one paused vCPU: server CPU per call by stage, in process (us, median of 5 x ${n})\n`);
  console.log(
    table(
      ['stage', 'us/call', 'what'],
      stages.map((s) => [s.name, s.us.toFixed(1), s.note]),
    ),
  );
}

export async function main(): Promise<void> {
  printStages('GetState', await measureStages(), N);
}

if (require.main === module) main().catch(fatal);
