/**
 * Restoring a loaded snapshot (snapshot-reader.ts) into a new VM: created with the snapshot's CPUID,
 * memory and vCPU count, VM-wide state (irqchip, clock) applied, then every vCPU through writeFreshState
 * in the restore order vcpu-state.ts owns, nested state last (writeNested). MSRs that refuse a
 * write-back of their own value are handled explicitly: a known one is skipped with a note in the
 * result, an unknown one fails the restore. The vCPUs come up PAUSED (those that had run) or
 * running when asked. Any failure destroys the new VM: nothing is left behind.
 */
import { VcpudError } from '../errors';
import type { HostCapabilities } from '../ffi/capabilities';
import { msrName, SECTIONS, type MsrEntry, type SectionName, type SectionValues } from '../ffi/sections';
import type { Vm } from '../ffi/vm';
import { ManagedVm } from './managed-vm';
import type { Reservation, VmRegistry } from './registry';
import { assertCompatible } from './snapshot-compat';
import { hex, type SnapshotHeader } from './snapshot-format';
import { loadSnapshot, type ByteSource, type LoadedSnapshot, type LoadOptions } from './snapshot-reader';
import { writeFreshState, writeNested, type StateContext, type StateValues } from './vcpu-state';
import { checkVmName } from './vm-name';

/** What a restore applies: a loaded snapshot's state and memory (a migration's too, which has no identity). */
export type LoadedState = Pick<LoadedSnapshot, 'header' | 'vcpuState' | 'vmState' | 'memory'>;

/**
 * MSRs KVM_SET_MSRS may refuse even with the value KVM_GET_MSRS returned, and why skipping them is
 * safe. A refusal of any other MSR fails the restore.
 */
export const SELF_REFUSING_MSRS: Readonly<Record<number, string>> = {
  0x4b564d06:
    'MSR_KVM_ASYNC_PF_INT: KVM rejects a host write of the saved vector when the guest has not enabled asynchronous page faults in the order it expects; the guest re-arms it itself',
};

export interface RestoreOptions {
  /** Name of the new VM (default: the snapshot's VM name). */
  name?: string;
  /** Resume the vCPUs that were running at snapshot time (default: all stay paused). */
  run?: boolean;
  /** The KVM VM prepared with the loaded memory as slot 0 (ManagedVm.prepareKvmVm). */
  vm?: Vm;
  /** The VM's share of the limits, taken from the header before its memory was accepted. */
  reservation?: Reservation;
  /** The id and creation time the VM keeps (a restart's handover); default: new ones. */
  identity?: { id: string; createdAt: Date };
}

export interface RestoreResult {
  vm: ManagedVm;
  /** What the restore did that a caller should know (skipped MSRs, padded xsave...). */
  notes: string[];
}

/**
 * The spec of the VM a snapshot restores into. A stored name that breaks today's rule (a snapshot
 * written before names were bounded) is refused saying so: the caller can give another name.
 */
export function restoreSpec(header: SnapshotHeader, name?: string) {
  if (name === undefined) checkVmName(header.vm.name, 'vm_name', "the snapshot's VM name (set vm_name to restore it under another name)");
  return {
    name: name ?? (header.vm.name || undefined),
    memoryBytes: header.vm.memoryBytes,
    vcpuCount: header.vm.vcpuCount,
    cpuidPolicy: { exposeNested: header.vm.exposeNested },
    noIrqchip: !header.vm.irqchip,
  };
}

/** The refused MSR of a writeState failure at the msrs section, if that is what failed. */
function refusedMsr(e: unknown, entries: MsrEntry[] | undefined): MsrEntry | undefined {
  const msr = e instanceof VcpudError ? e.details.msr : undefined;
  return msr && entries?.[msr.position];
}

/**
 * writeFreshState (the vCPU is new: nothing to roll back), retrying without a known self-refusing
 * MSR (noted) when KVM_SET_MSRS refuses it.
 */
export function writeStateWithMsrPolicy(
  vcpu: Parameters<typeof writeFreshState>[0],
  ctx: StateContext,
  values: StateValues,
  notes: string[],
  label: string,
): SectionName[] {
  let v = values;
  for (;;) {
    try {
      return writeFreshState(vcpu, ctx, v);
    } catch (e) {
      const refused = refusedMsr(e, v.msrs);
      if (!refused || !(refused.index in SELF_REFUSING_MSRS)) throw e;
      notes.push(
        `${label}: KVM_SET_MSRS refused MSR ${hex(refused.index)} (${msrName(refused.index)}) = ${hex(refused.data)}, its own saved value; skipped, it keeps its reset value (${SELF_REFUSING_MSRS[refused.index]})`,
      );
      v = { ...v, msrs: (v.msrs ?? []).filter((m) => m.index !== refused.index) };
    }
  }
}

function decodeVcpu(loaded: LoadedState, id: number, caps: HostCapabilities, notes: string[]): { values: StateValues; nested?: Buffer } {
  const saved = loaded.vcpuState.get(id) as Map<string, Buffer>;
  const values: StateValues = {};
  for (const [name, bytes] of saved) {
    if (name === 'nested') continue;
    const codec = SECTIONS[name as SectionName] as { decode(b: Buffer): unknown } | undefined;
    if (!codec) throw new VcpudError('data_loss', `vCPU ${id}: unknown section ${name} in the snapshot`, { reason: 'SNAPSHOT_CORRUPT' });
    let value: unknown;
    try {
      value = codec.decode(bytes);
    } catch (e) {
      throw new VcpudError('data_loss', `vCPU ${id}: section ${name} does not decode: ${(e as Error).message}`, { reason: 'SNAPSHOT_CORRUPT' });
    }
    if (name === 'xsave' && (value as Buffer).length < caps.xsaveSize) {
      // A smaller area (e.g. a legacy 4 KiB KVM_GET_XSAVE) describes components through XSTATE_BV;
      // what lies beyond it is absent state, i.e. zeros.
      const grown = Buffer.alloc(caps.xsaveSize);
      (value as Buffer).copy(grown);
      notes.push(`vCPU ${id}: xsave area zero-extended from ${(value as Buffer).length} to ${caps.xsaveSize} bytes`);
      value = grown;
    }
    (values as Record<string, unknown>)[name] = value as SectionValues[SectionName];
  }
  return { values, nested: saved.get('nested') };
}

/**
 * Creates the VM (the registry enforces its limits) with the snapshot's memory and CPUID and applies
 * all saved state. The loaded memory is owned by the VM afterwards (or released on failure).
 */
export async function restoreIntoNewVm(registry: VmRegistry, caps: HostCapabilities, loaded: LoadedState, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const { header } = loaded;
  const notes: string[] = [];
  const prepared = { ...(opts.vm ? { vm: opts.vm } : { memory: loaded.memory }), cpuid: header.vm.cpuid, ...opts.identity };
  const vm = registry.create(restoreSpec(header, opts.name), prepared, opts.reservation);
  try {
    // VM-wide state first: the PIC/IOAPIC the LAPICs deliver through, then the kvmclock base.
    for (const [name, data] of loaded.vmState) {
      if (name.startsWith('irqchip.')) {
        if (vm.vm.hasIrqchip) vm.vm.setIrqchip(data);
      } else if (name === 'clock') {
        if ((caps.caps.KVM_CAP_ADJUST_CLOCK ?? 0) > 0) vm.vm.setClock(data);
        else notes.push('KVM_CAP_ADJUST_CLOCK is 0 here: the kvmclock base was not restored');
      } else {
        notes.push(`VM state ${name} is unknown to this vcpud and was ignored`);
      }
    }
    const ctx: StateContext = { caps, irqchip: vm.vm.hasIrqchip };
    for (const meta of header.vcpus) {
      const m = vm.vcpu(meta.id);
      const { values, nested } = decodeVcpu(loaded, meta.id, caps, notes);
      await m.withState(() => {
        try {
          writeStateWithMsrPolicy(m.vcpu, ctx, values, notes, `vCPU ${meta.id}`);
          if (nested) writeNested(m.vcpu, ctx, nested);
        } catch (e) {
          if (!(e instanceof VcpudError)) throw e;
          throw new VcpudError(e.kind, `restoring vCPU ${meta.id}: ${e.message}`, e.details, { cause: e });
        }
      });
    }
    // Run states: a vCPU that had run is PAUSED (ResumeVm continues it), a never-run one stays CREATED.
    for (const meta of header.vcpus) if (meta.runState !== 'created') await vm.vcpu(meta.id).markPaused();
    if (opts.run) await Promise.all(header.vcpus.filter((c) => c.runState === 'running').map((c) => vm.vcpu(c.id).resume()));
    return { vm, notes };
  } catch (e) {
    if (!vm.isDestroyed) registry.destroy(vm.id); // a client may have deleted it already
    throw e;
  }
}

export interface LoadAndRestoreOptions extends Omit<RestoreOptions, 'vm'> {
  /** The snapshot file's descriptor when `source` reads a file: memory can then be mapped from it. */
  fileFd?: number;
  /** With fileFd: map memory lazily (default true). */
  lazy?: boolean;
  /** Reads an incremental snapshot's ancestors (snapshot-chain.ts). */
  loadParent?: LoadOptions['loadParent'];
}

/**
 * The whole restore: the header is checked (compatibility) and the VM's share of the registry's
 * limits reserved (or `opts.reservation`, taken by the caller, resized) before anything is allocated
 * or any memory byte is read; while memory is loaded and every checksum verified, the KVM VM is made
 * with that memory off the JS thread; then the VM is created and its state applied. Any failure
 * leaves nothing behind.
 */
export async function loadAndRestore(
  registry: VmRegistry,
  caps: HostCapabilities,
  source: ByteSource,
  opts: LoadAndRestoreOptions = {},
): Promise<RestoreResult & { loaded: LoadedSnapshot }> {
  let prepared: Promise<Vm> | undefined;
  let prepareError: unknown;
  let loaded: LoadedSnapshot;
  let reservation: Reservation | undefined;
  try {
    loaded = await loadSnapshot(
      source,
      {
        check: (h) => {
          assertCompatible(h, caps, registry.supportedCpuid());
          reservation = registry.reserve(restoreSpec(h, opts.name), opts.reservation);
        },
        lazy: opts.lazy,
        loadParent: opts.loadParent,
        allocate: (bytes) => registry.memory.allocate(bytes),
        onMemory: (memory, h) => {
          prepared = ManagedVm.prepareKvmVm(registry.kvm, restoreSpec(h, opts.name), memory, h.vm.cpuid);
          prepared.catch((e) => (prepareError ??= e));
        },
      },
      opts.fileFd,
    );
  } catch (e) {
    // A preparation that failed first (and released the memory under the load) is the cause;
    // otherwise the load's error stands and the prepared VM (if it got made) goes.
    const cause = prepareError ?? e;
    if (prepared)
      await prepared.then(
        (vm) => vm.close(),
        () => {},
      );
    (reservation ?? opts.reservation)?.release();
    throw cause;
  }
  let vm: Vm;
  try {
    vm = await (prepared as Promise<Vm>);
  } catch (e) {
    loaded.memory.release();
    reservation?.release();
    throw e;
  }
  return { ...(await restoreIntoNewVm(registry, caps, loaded, { ...opts, vm, reservation })), loaded };
}
