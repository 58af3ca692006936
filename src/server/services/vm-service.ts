/**
 * vcpud.v1.VmService: VM lifecycle, guest memory, program loading, run control and the console
 * stream.
 */
import * as grpc from '@grpc/grpc-js';
import { failedPrecondition, invalidArgument } from '../../errors';
import type { ManagedVcpu, VcpuStatus } from '../../vm/managed-vcpu';
import type { ManagedVm } from '../../vm/managed-vm';
import { safeNumber, vcpuToProto, vmToProto } from '../convert';
import type { VmServiceHandlers } from '../../api/generated/vcpud/v1/VmService';
import type { ReadMemoryRequest__Output } from '../../api/generated/vcpud/v1/ReadMemoryRequest';
import type { ReadMemoryResponse } from '../../api/generated/vcpud/v1/ReadMemoryResponse';
import type { StreamConsoleRequest__Output } from '../../api/generated/vcpud/v1/StreamConsoleRequest';
import type { StreamConsoleResponse } from '../../api/generated/vcpud/v1/StreamConsoleResponse';
import { vcpudServiceDefinitions } from '../service-definitions';
import type { ServiceSink } from '../server';
import { serverStream, unary, type ServiceContext } from './context';
import { ConsoleQueue } from './console-queue';
import { SendWindow } from './streams';

/** ReadMemory streams in chunks of this size: large ranges never sit whole in one message. */
const READ_CHUNK = 1024 * 1024;
/** Bytes a ReadMemory stream keeps queued for its client: the next chunk is read once HTTP/2 took the last. */
export const READ_MEMORY_SEND_WINDOW = READ_CHUNK;
/** What a ReadMemory message counts as besides its data (framing, the address). */
const MESSAGE_OVERHEAD = 64;
const DEFAULT_PAGE_SIZE = 100;

export class VmService {
  constructor(private readonly ctx: ServiceContext) {}

  register(server: ServiceSink): void {
    server.addService(vcpudServiceDefinitions().VmService, this.handlers());
  }

  private vm(id: string): ManagedVm {
    return this.ctx.registry.get(id);
  }

  private vcpu(req: { vmId: string; vcpuId: number }): ManagedVcpu {
    return this.vm(req.vmId).vcpu(req.vcpuId);
  }

  handlers(): VmServiceHandlers {
    const ctx = this.ctx;
    const u = <Q, R>(fn: (req: Q, call: grpc.ServerUnaryCall<Q, R>) => Promise<R> | R) => unary<Q, R>(ctx, fn);
    const vmResponse = async (vm: ManagedVm, op: (vm: ManagedVm) => Promise<unknown>) => {
      await op(vm);
      return { vm: vmToProto(vm) };
    };
    const vcpuResponse = async (v: ManagedVcpu, op: (v: ManagedVcpu) => Promise<VcpuStatus>) => ({
      vcpu: vcpuToProto(await op(v), v.exitCounts()),
    });
    return {
      CreateVm: u((req: { name: string; memoryBytes: string; vcpuCount: number; cpuidPolicy: { exposeNested: boolean } | null; noIrqchip: boolean }) => {
        const vm = ctx.registry.create({
          name: req.name || undefined,
          memoryBytes: safeNumber(req.memoryBytes, 'memory_bytes'),
          vcpuCount: req.vcpuCount,
          cpuidPolicy: { exposeNested: !!req.cpuidPolicy?.exposeNested },
          noIrqchip: req.noIrqchip,
        });
        return { vm: vmToProto(vm) };
      }),
      GetVm: u((req: { vmId: string }) => ({ vm: vmToProto(this.vm(req.vmId)) })),
      ListVms: u((req: { pageSize: number; pageToken: string }) => {
        const all = ctx.registry.list().sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime() || a.id.localeCompare(b.id));
        const start = req.pageToken ? Number(req.pageToken) : 0;
        if (!Number.isInteger(start) || start < 0 || start > all.length)
          throw invalidArgument(`page_token "${req.pageToken}" is not a token ListVms returned`, [
            { rule: 'page_token', field: 'page_token', message: 'use next_page_token from a previous response' },
          ]);
        const size = req.pageSize > 0 ? req.pageSize : DEFAULT_PAGE_SIZE;
        const page = all.slice(start, start + size);
        const next = start + page.length < all.length ? String(start + page.length) : '';
        return { vms: page.map(vmToProto), nextPageToken: next };
      }),
      DeleteVm: u((req: { vmId: string }) => {
        ctx.registry.destroy(req.vmId);
        return {};
      }),
      WriteMemory: u((req: { vmId: string; guestPhysicalAddress: string; data: Buffer }) => {
        this.vm(req.vmId).writeMemory(safeNumber(req.guestPhysicalAddress, 'guest_physical_address'), req.data);
        return {};
      }),
      ReadMemory: serverStream<ReadMemoryRequest__Output, ReadMemoryResponse>(ctx, async (call) => {
        const vm = this.vm(call.request.vmId);
        const gpa = safeNumber(call.request.guestPhysicalAddress, 'guest_physical_address');
        const length = safeNumber(call.request.length, 'length');
        vm.vm.regionFor(gpa, length); // bounds first: nothing is sent for a bad range
        const window = new SendWindow(call, READ_MEMORY_SEND_WINDOW);
        // A VM deleted while the stream waits for the client ends it with OK, as DeleteVm promises.
        for (let off = 0; off < length && !call.cancelled && !vm.isDestroyed; off += READ_CHUNK) {
          const n = Math.min(READ_CHUNK, length - off);
          await window.room(n + MESSAGE_OVERHEAD); // memory is copied out only once the client has room for it
          if (vm.isDestroyed) break;
          window.write({ guestPhysicalAddress: String(gpa + off), data: vm.readMemory(gpa + off, n) }, n + MESSAGE_OVERHEAD);
        }
      }),
      LoadProgram: u(async (req: { vmId: string; image: Buffer; loadAddress: string; entry: string }) => {
        const vm = this.vm(req.vmId);
        const running = vm.statuses().filter((s) => s.state === 'running');
        if (running.length)
          throw failedPrecondition(`vCPU(s) ${running.map((s) => s.id).join(', ')} are running: pause the VM before loading a program`, 'WRONG_RUN_STATE');
        const load = safeNumber(req.loadAddress, 'load_address');
        const entry = req.entry === '0' || req.entry === '' ? load : safeNumber(req.entry, 'entry');
        await vm.loadProgram(req.image, load, entry);
        return {};
      }),
      RunVm: u((req: { vmId: string }) =>
        vmResponse(this.vm(req.vmId), (vm) => Promise.all(vm.vcpus.filter((v) => v.status().state !== 'running').map((v) => v.resume()))),
      ),
      PauseVm: u((req: { vmId: string }) => vmResponse(this.vm(req.vmId), (vm) => vm.pauseAll())),
      ResumeVm: u((req: { vmId: string }) =>
        vmResponse(this.vm(req.vmId), (vm) => Promise.all(vm.vcpus.filter((v) => v.status().state === 'paused').map((v) => v.resume()))),
      ),
      RunVcpu: u((req: { vmId: string; vcpuId: number }) =>
        vcpuResponse(this.vcpu(req), (v) => {
          if (v.status().state === 'running') throw failedPrecondition(`vCPU ${v.id} is already running`, 'WRONG_RUN_STATE');
          return v.resume();
        }),
      ),
      PauseVcpu: u((req: { vmId: string; vcpuId: number }) => vcpuResponse(this.vcpu(req), (v) => v.pause())),
      ResumeVcpu: u((req: { vmId: string; vcpuId: number }) =>
        vcpuResponse(this.vcpu(req), (v) => {
          const state = v.status().state;
          if (state !== 'paused') throw failedPrecondition(`vCPU ${v.id} is ${state}, not paused: use RunVcpu to start it`, 'WRONG_RUN_STATE');
          return v.resume();
        }),
      ),
      StreamConsole: serverStream<StreamConsoleRequest__Output, StreamConsoleResponse>(ctx, (call) => streamConsole(this.vm(call.request.vmId), call)),
    };
  }
}

type DebugEvent = { vcpu: number; value: number; done: boolean };
const stateChangeMessage = (s: VcpuStatus): StreamConsoleResponse => ({
  stateChange: {
    vcpuId: s.id,
    runState: `VCPU_RUN_STATE_${s.state.toUpperCase()}`,
    reason: s.reason ?? '',
    description: s.state === 'stopped' ? (s.description ?? '') : '',
  } as never,
});
const debugMessage = (d: DebugEvent): StreamConsoleResponse => ({ debug: { vcpuId: d.vcpu, value: String(d.value), done: d.done } });

/**
 * Console output, vCPU state changes and debug values, until the client leaves or the VM goes away
 * (what is still queued then goes out before the end). ConsoleQueue bounds what a slow client costs.
 */
function streamConsole(vm: ManagedVm, call: grpc.ServerWritableStream<StreamConsoleRequest__Output, StreamConsoleResponse>): Promise<void> {
  return new Promise((resolve) => {
    const queue = new ConsoleQueue(call);
    const onConsole = (c: Buffer) => queue.output(c);
    const onState = (s: VcpuStatus) => queue.event(stateChangeMessage, s);
    const onDebug = (d: DebugEvent) => queue.event(debugMessage, d);
    const cleanup = () => {
      vm.off('destroyed', vmGone);
      vm.off('console', onConsole);
      vm.off('state', onState);
      vm.off('debug', onDebug);
    };
    const finish = () => {
      cleanup();
      queue.close();
      resolve();
    };
    const vmGone = () => {
      queue.flushAll();
      finish();
    };
    // Headers now, before any event: a client reading what is there (vcpuctl console) knows the stream is open.
    call.sendMetadata(new grpc.Metadata());
    if (call.request.fromStart) queue.output(vm.console.history());
    vm.on('console', onConsole);
    vm.on('state', onState);
    vm.on('debug', onDebug);
    vm.on('destroyed', vmGone);
    if (vm.isDestroyed) vmGone();
    call.on('cancelled', finish);
    call.on('close', finish);
  });
}
