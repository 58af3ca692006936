/**
 * vcpud.v1.VcpuStateService: capabilities, state sections (atomic SetState) and nested state.
 * A small class that registers itself on a server, like grpc-node's health service.
 */
import { CPUID_ENTRY2_SIZE, cpuid2Size, MSR_ENTRY_SIZE, SECTIONS, type SectionName } from '../../ffi/sections';
import type { Vcpu } from '../../ffi/vcpu';
import {
  checkReadable,
  readableSections,
  readNested,
  readStateBytes,
  readStateBytesReused,
  reusedRead,
  writeNested,
  writeState,
  type BytesReadResult,
  type ReusedRead,
  type StateContext,
} from '../../vm/vcpu-state';
import { capabilitiesToProto, nestedToProto, sectionsFromProto, sectionToProto } from '../convert';
import { asRequested, BASE_UNUSED, stateBytesFromProto, type BaseBytes } from '../convert/state-bytes';
import { getStateResponseEncoder } from '../convert/raw-state';
import { Preserialized, type AnsweringPreserialized } from '../../api/preserialized';
import type { GetCapabilitiesRequest__Output } from '../../api/generated/vcpud/v1/GetCapabilitiesRequest';
import type { GetCapabilitiesResponse } from '../../api/generated/vcpud/v1/GetCapabilitiesResponse';
import type { GetNestedStateRequest__Output } from '../../api/generated/vcpud/v1/GetNestedStateRequest';
import type { GetNestedStateResponse } from '../../api/generated/vcpud/v1/GetNestedStateResponse';
import type { GetStateRequest__Output } from '../../api/generated/vcpud/v1/GetStateRequest';
import type { GetStateResponse } from '../../api/generated/vcpud/v1/GetStateResponse';
import type { SetNestedStateRequest__Output } from '../../api/generated/vcpud/v1/SetNestedStateRequest';
import type { SetNestedStateResponse } from '../../api/generated/vcpud/v1/SetNestedStateResponse';
import type { SetStateRequest__Output } from '../../api/generated/vcpud/v1/SetStateRequest';
import type { SetStateResponse } from '../../api/generated/vcpud/v1/SetStateResponse';
import type { VcpuStateServiceHandlers } from '../../api/generated/vcpud/v1/VcpuStateService';
import { snakeCase } from '../../case';
import { invalidArgument } from '../../errors';
import { vcpudPackageDefinition } from '../../api/proto';
import { vcpudServiceDefinitions } from '../service-definitions';
import type { ServiceSink } from '../server';
import { thenOrNow, unary, type ServiceContext } from './context';

const SKIP_VALIDATION_HEADER = 'x-vcpud-skip-validation';

export class VcpuStateService {
  private readonly encodeGetState = getStateResponseEncoder(vcpudPackageDefinition());
  /** Each kept read's size recorders (recordRead). */
  private readonly readSizes = new WeakMap<ReusedRead, { record: (bytes: number) => void; section: SectionName; buf: Buffer }[]>();

  constructor(private readonly ctx: ServiceContext) {}

  register(server: ServiceSink): void {
    server.addService(vcpudServiceDefinitions().VcpuStateService, this.handlers());
  }

  private target(vmId: string, vcpuId: number) {
    const vm = this.ctx.registry.get(vmId);
    const vcpu = vm.vcpu(vcpuId);
    const sctx: StateContext = { caps: this.ctx.caps, irqchip: vm.vm.hasIrqchip };
    return { vm, vcpu, sctx };
  }

  private recordBytes(values: Record<string, unknown>): void {
    if (!this.ctx.stateBytes) return;
    for (const section in values) this.ctx.stateBytes(section)(kernelBytes(section as SectionName, values[section]));
  }

  /** Records the sizes of a kept read's sections, from its buffers: the recorders bound once per read. */
  private recordRead(read: ReusedRead): void {
    const stateBytes = this.ctx.stateBytes;
    if (!stateBytes) return;
    let sizes = this.readSizes.get(read);
    if (!sizes) {
      sizes = [...read.batch.inputs].map(([section, buf]) => ({ record: stateBytes(section), section, buf }));
      this.readSizes.set(read, sizes);
    }
    for (const { record, section, buf } of sizes) record(kernelBytes(section, buf));
  }

  /**
   * GetState's response: from the vCPU's kept read in one native pass when it can be, else read and
   * encoded apart. Runs under the vCPU's lock: the read's buffers are the vCPU's, reused by the next read.
   */
  private stateResponse(vcpu: Vcpu, sctx: StateContext, sections: SectionName[], msrIndices: number[] | undefined, implicitlyPaused: boolean): Buffer {
    const read = reusedRead(vcpu, sctx, sections, msrIndices);
    let r: Buffer | BytesReadResult;
    if (read) {
      r = this.encodeGetState.readResponse(read, implicitlyPaused);
      if (Buffer.isBuffer(r)) {
        this.recordRead(read);
        return r;
      }
    } else r = readStateBytes(vcpu, sctx, sections, msrIndices);
    this.recordBytes(r.values);
    return this.encodeGetState(r.values, { msrsUnreadable: r.msrsUnreadable }, implicitlyPaused);
  }

  handlers(): AnsweringPreserialized<VcpuStateServiceHandlers, 'GetState'> {
    const ctx = this.ctx;
    return {
      GetCapabilities: unary<GetCapabilitiesRequest__Output, GetCapabilitiesResponse>(ctx, () => capabilitiesToProto(ctx.caps)),

      GetState: unary<GetStateRequest__Output, GetStateResponse | Preserialized>(ctx, (req) => {
        const { vcpu, sctx } = this.target(req.vmId, req.vcpuId);
        checkMsrIndices(req.msrIndices, ctx.caps.msrIndexList.length);
        const sections: SectionName[] = sectionsFromProto(req.sections as string[]);
        const msrIndices = req.msrIndices.length ? req.msrIndices : undefined;
        // A paused vCPU is read and answered in this turn, with no promise in between (withStateNow).
        // The response is handed to grpc-js as it is (service-definitions.ts).
        const response = vcpu.withStateNow((access) => this.stateResponse(vcpu.vcpu, sctx, sections, msrIndices, access.implicitlyPaused), {
          noImplicitPause: req.noImplicitPause,
        });
        return thenOrNow(response, (r) => new Preserialized(r));
      }),

      SetState: unary<SetStateRequest__Output, SetStateResponse>(ctx, (req) => {
        const { vcpu, sctx } = this.target(req.vmId, req.vcpuId);
        if (!req.state) throw invalidArgument('state is required', [{ rule: 'required', field: 'state', message: 'state is required' }]);
        const applied = vcpu.withStateNow(
          () => {
            const base = readBase(vcpu.vcpu, sctx, presentSections(req.state!));
            const values = stateBytesFromProto(req.state!, base);
            if (Object.keys(values).length === 0)
              throw invalidArgument('state has no sections to apply', [{ rule: 'non_empty', field: 'state', message: 'set at least one section' }]);
            return writeState(vcpu.vcpu, sctx, values, asRequested);
          },
          { noImplicitPause: req.noImplicitPause },
        );
        return thenOrNow(applied, (a) => ({ applied: a.map(sectionToProto) }));
      }),

      GetNestedState: unary<GetNestedStateRequest__Output, GetNestedStateResponse>(ctx, (req) => {
        const { vcpu } = this.target(req.vmId, req.vcpuId);
        return thenOrNow(
          vcpu.withStateNow(() => readNested(vcpu.vcpu), { noImplicitPause: req.noImplicitPause }),
          (raw) => {
            ctx.stateBytes?.('nested')(raw.length);
            return { nestedState: nestedToProto(raw) };
          },
        );
      }),

      SetNestedState: unary<SetNestedStateRequest__Output, SetNestedStateResponse>(ctx, (req, call) => {
        const { vcpu, sctx } = this.target(req.vmId, req.vcpuId);
        const skipValidation = !!ctx.allowUnvalidatedNested && call.metadata.get(SKIP_VALIDATION_HEADER)[0] === '1';
        return thenOrNow(
          vcpu.withStateNow(() => writeNested(vcpu.vcpu, sctx, req.raw, { skipValidation }), { noImplicitPause: req.noImplicitPause }),
          () => ({}),
        );
      }),
    };
  }
}

/**
 * GetState.msr_indices asks for at most as many MSRs as the host can save (KVM_GET_MSR_INDEX_LIST):
 * the KVM_GET_MSRS buffer is sized from it, so it is bounded before that buffer is built.
 */
function checkMsrIndices(indices: number[], hostMsrs: number): void {
  if (indices.length > hostMsrs)
    throw invalidArgument(`msr_indices lists ${indices.length} MSRs, over the limit of ${hostMsrs} (the length of this host's KVM_GET_MSR_INDEX_LIST)`, [
      { rule: 'msr_indices.max_count', field: 'msr_indices', message: `at most ${hostMsrs} indices (this host's MSR index list)` },
    ]);
}

/**
 * The current values the request's structs are written over, for the fields the proto does not carry
 * (reserved bytes): the kernel's bytes, in one native call on kept buffers. Some GETs change the vCPU
 * (KVM_GET_MP_STATE takes pending INIT/SIPI, KVM_GET_VCPU_EVENTS pending NMIs), so the GETs made are
 * exactly those SetState always made (every present section but msrs, all of them when that leaves
 * none), less those of sections whose base is never consulted (BASE_UNUSED), which only copy state out.
 */
export function readBase(vcpu: Vcpu, sctx: StateContext, present: SectionName[]): BaseBytes {
  const before = present.filter((s) => s !== 'msrs');
  checkReadable(sctx, before);
  const sections = (before.length ? before : readableSections(sctx)).filter((s) => !BASE_UNUSED.has(s));
  return sections.length ? readStateBytesReused(vcpu, sctx, sections).values : {};
}

/** Section names present in a proto VcpuState (its fields are the sections' camelCase names). */
function presentSections(state: object): SectionName[] {
  const out: SectionName[] = [];
  for (const [k, v] of Object.entries(state)) {
    if (v === null || v === undefined) continue;
    out.push(snakeCase(k) as SectionName);
  }
  return out;
}

/** The bytes the kernel exchanged for a section: struct size, raw length, or header + entries. */
function kernelBytes(section: SectionName, v: unknown): number {
  // cpuid2 as bytes (readStateBytes) is the kernel's buffer, spare capacity included: count its entries.
  if (Buffer.isBuffer(v)) return section === 'cpuid2' ? cpuid2Size(v.readUInt32LE(0)) : v.length;
  if (Array.isArray(v)) return SECTIONS[section].size + v.length * (section === 'msrs' ? MSR_ENTRY_SIZE : CPUID_ENTRY2_SIZE);
  return SECTIONS[section].size;
}
