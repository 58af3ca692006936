/**
 * Where one SetState's server CPU goes, stage by stage, in this process (no gRPC): decoding the request,
 * reading the vCPU's current values (the base for the bytes the proto does not carry), checking and
 * converting the request, and writing the sections with their rollback reads: SetState's path over kernel
 * bytes beside the object path it replaced (readState, stateFromProto, the ffi's encoders), then the
 * kernel's share (system CPU) and each section's write alone. The request is GetState's own answer for
 * every section of a paused counter64 vCPU, so every write succeeds and changes nothing. CPU time per
 * call (process.cpuUsage), median of 5 batches, as bench/getstate-stages.ts measures.
 *
 *   node dist/bench/setstate-stages.js      (BENCH_N calls per batch, default 1000)
 */
import type { SetStateRequest__Output } from '../src/api/generated/vcpud/v1/SetStateRequest';
import { stateFromProto, stateToProto } from '../src/server/convert';
import { stateBytesFromProto } from '../src/server/convert/state-bytes';
import { vcpudServiceDefinitions } from '../src/server/service-definitions';
import { readState, readableSections, writeState } from '../src/vm/vcpu-state';
import { readBase } from '../src/server/services/state-service';
import type { SectionName } from '../src/ffi/sections';
import { fatal, knob, median } from './floors';
import { cpuUsPerCall, printStages, type Stage, withPausedCounterVcpu } from './getstate-stages';

const N = Number(knob('BENCH_N', '1000', 'setstate-stages: calls per batch (5 batches per stage)'));

/** System CPU microseconds per call of `fn` (the kernel's side: the ioctls), median of 5 batches. */
function systemUsPerCall(fn: () => unknown): number {
  const per: number[] = [];
  for (let b = 0; b < 5; b++) {
    const t = process.cpuUsage();
    for (let i = 0; i < N; i++) fn();
    per.push(process.cpuUsage(t).system / N);
  }
  return median(per);
}

export function measureStages(): Promise<Stage[]> {
  return withPausedCounterVcpu(async ({ vm, v, sctx }) => {
    const sections = readableSections(sctx);
    const method = vcpudServiceDefinitions().VcpuStateService.SetState;
    const current = readState(v, sctx, sections);
    const request = method.requestSerialize({ vmId: vm.id, vcpuId: 0, state: stateToProto(current.values, current) });
    const decoded = method.requestDeserialize(request) as SetStateRequest__Output;
    const baseSections = sections.filter((s): s is SectionName => s !== 'msrs');
    const base = readState(v, sctx, baseSections).values;
    const values = stateFromProto(decoded.state!, base);

    const baseBytes = readBase(v, sctx, sections);
    const valueBytes = stateBytesFromProto(decoded.state!, baseBytes);
    const handlerWork = () => {
      const req = method.requestDeserialize(request) as SetStateRequest__Output;
      return writeState(v, sctx, stateBytesFromProto(req.state!, readBase(v, sctx, sections)));
    };
    const generalWork = () => {
      const req = method.requestDeserialize(request) as SetStateRequest__Output;
      return writeState(v, sctx, stateFromProto(req.state!, readState(v, sctx, baseSections).values));
    };

    const stages: Stage[] = [
      { name: 'request bytes', us: request.length, note: 'the SetStateRequest (bytes, not us)' },
      { name: 'decode the request', us: cpuUsPerCall(() => method.requestDeserialize(request), N), note: "the method's requestDeserialize (proto-loader)" },
      {
        name: 'read the base as kernel bytes',
        us: cpuUsPerCall(() => readBase(v, sctx, sections), N),
        note: 'readBase: one native call, no cpuid2 or tsc_khz (SetState now)',
      },
      { name: 'read the base, decoded', us: cpuUsPerCall(() => readState(v, sctx, baseSections), N), note: 'readState, every section but msrs (before)' },
      {
        name: 'check and write into structs',
        us: cpuUsPerCall(() => stateBytesFromProto(decoded.state!, baseBytes), N),
        note: 'stateBytesFromProto (SetState now)',
      },
      { name: 'check and convert to objects', us: cpuUsPerCall(() => stateFromProto(decoded.state!, base), N), note: 'stateFromProto (before)' },
      {
        name: 'write from struct bytes',
        us: cpuUsPerCall(() => writeState(v, sctx, valueBytes), N),
        note: 'writeState: rollback reads kept as bytes, no encoding',
      },
      { name: 'write from objects', us: cpuUsPerCall(() => writeState(v, sctx, values), N), note: 'writeState: the same rollback reads, then encoding' },
      { name: "all of it, SetState's path", us: cpuUsPerCall(handlerWork, N), note: "the handler's work, without the lock" },
      { name: 'all of it, objects', us: cpuUsPerCall(generalWork, N), note: 'readState + stateFromProto + writeState of objects' },
      { name: 'for scale: read every section, decoded', us: cpuUsPerCall(() => readState(v, sctx, sections), N), note: 'readState (the 13 GETs)' },
    ];
    stages.push(
      { name: "system CPU of SetState's path", us: systemUsPerCall(handlerWork), note: 'the kernel side of its ioctls (in the total above)' },
      { name: 'system CPU of the write alone', us: systemUsPerCall(() => writeState(v, sctx, valueBytes)), note: 'the rollback GETs and the SETs' },
    );
    // Each section alone: its rollback GET and its SET, and how much of that is the kernel's.
    for (const s of Object.keys(valueBytes) as SectionName[]) {
      const one = { [s]: valueBytes[s] };
      const write = () => writeState(v, sctx, one);
      stages.push({ name: `  write ${s} alone`, us: cpuUsPerCall(write, N), note: `system ${systemUsPerCall(write).toFixed(1)}` });
    }
    return stages;
  });
}

export async function main(): Promise<void> {
  printStages('SetState', await measureStages(), N);
}

if (require.main === module) main().catch(fatal);
