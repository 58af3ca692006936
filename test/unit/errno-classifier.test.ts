/**
 * One errno, one answer: every errno an ioctl can fail with, through every path that sees one
 * (a bare KvmError, SetState's section write and its read-before-write, SetNestedState, a snapshot
 * restore's writeState), reaches the client with the same gRPC code and ErrorInfo.reason. The
 * expectations are written out here, not derived from the classifier they check.
 */
import os from 'node:os';
import * as grpc from '@grpc/grpc-js';
import { KvmError } from '../../src/errors';
import type { HostCapabilities } from '../../src/ffi/capabilities';
import { SECTION_NAMES, SECTIONS } from '../../src/ffi/sections';
import type { Vcpu } from '../../src/ffi/vcpu';
import { decodeStatusDetails } from '../../src/api/status-details';
import { toServiceError } from '../../src/server/errors';
import { writeStateWithMsrPolicy } from '../../src/vm/snapshot-restore';
import { writeNested, writeState, type StateContext } from '../../src/vm/vcpu-state';

/** Every errno name Node knows, plus the two the addon makes up (a positive return, an unnamed errno). */
const ERRNOS = [...Object.keys(os.constants.errno), 'EPOSITIVE', 'EUNKNOWN'];

const REFUSALS = ['EINVAL', 'E2BIG', 'ERANGE', 'EFAULT', 'EPOSITIVE'];
const EXHAUSTION = ['EMFILE', 'ENFILE', 'ENOMEM'];
const NO_KVM = ['ENOENT', 'ENXIO', 'ENODEV', 'EACCES', 'EPERM'];

function expected(ioctl: string, errno: string): { code: grpc.status; reason: string } {
  if (EXHAUSTION.includes(errno)) return { code: grpc.status.RESOURCE_EXHAUSTED, reason: 'HOST_RESOURCES_EXHAUSTED' };
  if (ioctl === 'open' && NO_KVM.includes(errno)) return { code: grpc.status.UNAVAILABLE, reason: 'KVM_UNAVAILABLE' };
  if (ioctl.startsWith('KVM_SET_') && REFUSALS.includes(errno)) return { code: grpc.status.INVALID_ARGUMENT, reason: 'KERNEL_REJECTED' };
  return { code: grpc.status.INTERNAL, reason: 'INTERNAL_ERROR' };
}

const ctx: StateContext = {
  irqchip: true,
  caps: {
    sections: Object.fromEntries(SECTION_NAMES.map((s) => [s, { readable: s === 'regs', writable: s === 'regs' }])),
    nested: { supported: true, maxSize: 128 },
  } as unknown as HostCapabilities,
};

const REGS = { rax: 1n };

/** A vCPU whose `failing` method throws the KvmError once (the rollback after it succeeds). */
function fakeVcpu(failing: 'getRegs' | 'setRegs' | 'getNestedState' | 'setNestedState', err: KvmError): Vcpu {
  let thrown = false;
  const once =
    <T>(name: string, value: T) =>
    () => {
      if (name === failing && !thrown) {
        thrown = true;
        throw err;
      }
      return value;
    };
  return {
    getRegs: once('getRegs', { rax: 0n }),
    // writeState reads a struct section's previous value as its kernel bytes (KVM_GET_REGS as getRegs does).
    getSectionBytes: (section: string) => (section === 'regs' ? once('getRegs', Buffer.alloc(SECTIONS.regs.size))() : undefined),
    setRegs: once('setRegs', undefined),
    getNestedState: once('getNestedState', Buffer.alloc(128)),
    setNestedState: once('setNestedState', undefined),
    requireNestedState: () => 128,
  } as unknown as Vcpu;
}

const IOCTL_OF = { getRegs: 'KVM_GET_REGS', setRegs: 'KVM_SET_REGS', getNestedState: 'KVM_GET_NESTED_STATE', setNestedState: 'KVM_SET_NESTED_STATE' } as const;

/** `refused`: the field a KERNEL_REJECTED refusal names (the changed one against the vCPU's own value; a restore into a new vCPU reads none, so it names the section). */
const PATHS: { name: string; failing: keyof typeof IOCTL_OF; run(v: Vcpu): void; section?: string; refused: string }[] = [
  {
    name: 'SetState section write',
    failing: 'setRegs',
    run: (v) => writeState(v, ctx, { regs: REGS as never }),
    section: 'STATE_SECTION_REGS',
    refused: 'state.regs.rax',
  },
  { name: 'SetState read before write', failing: 'getRegs', run: (v) => writeState(v, ctx, { regs: REGS as never }), refused: 'raw' },
  {
    name: 'snapshot restore',
    failing: 'setRegs',
    run: (v) => writeStateWithMsrPolicy(v, ctx, { regs: REGS as never }, [], 'vCPU 0'),
    section: 'STATE_SECTION_REGS',
    refused: 'state.regs',
  },
  { name: 'SetNestedState', failing: 'setNestedState', run: (v) => writeNested(v, ctx, Buffer.alloc(128), { skipValidation: true }), refused: 'raw' },
  {
    name: 'SetNestedState read before write',
    failing: 'getNestedState',
    run: (v) => writeNested(v, ctx, Buffer.alloc(128), { skipValidation: true }),
    refused: 'raw',
  },
];

function statusOf(run: () => void) {
  try {
    run();
  } catch (e) {
    const s = toServiceError(e);
    return { code: s.code, details: decodeStatusDetails(s.metadata as grpc.Metadata) };
  }
  throw new Error('expected the call to fail');
}

describe('errno classification', () => {
  it.each(ERRNOS)('%s: the same code and reason on every path', (errno) => {
    const direct = (ioctl: string) =>
      statusOf(() => {
        throw new KvmError(ioctl, 1, errno, `${ioctl} failed: ${errno}`);
      });
    for (const ioctl of ['KVM_SET_SREGS', 'KVM_GET_SREGS', 'open']) {
      const s = direct(ioctl);
      expect({ ioctl, code: s.code, reason: s.details?.errorInfo?.reason }).toEqual({ ioctl, ...expected(ioctl, errno) });
    }
    for (const p of PATHS) {
      const ioctl = IOCTL_OF[p.failing];
      const s = statusOf(() => p.run(fakeVcpu(p.failing, new KvmError(ioctl, 1, errno, `${ioctl} failed: ${errno}`))));
      const info = s.details?.errorInfo;
      expect({ path: p.name, code: s.code, reason: info?.reason }).toEqual({ path: p.name, ...expected(ioctl, errno) });
      expect(info?.metadata).toMatchObject({ ioctl, errno, ...(p.section ? { section: p.section } : {}) });
      // A refusal names what was refused: the field (or the blob) in BadRequest.
      if (info?.reason === 'KERNEL_REJECTED') expect({ path: p.name, field: s.details?.badRequest?.[0]?.field }).toEqual({ path: p.name, field: p.refused });
    }
  });

  it('KVM_SET_MSRS refusing an MSR is KERNEL_REJECTED naming the entry, and a restore skips a known self-refusing MSR by its index', () => {
    const entries = [
      { index: 0x10, data: 5n },
      { index: 0x4b564d06, data: 7n },
    ];
    const refuse = true;
    const vcpu = {
      getMsrs: (indices: number[]) => ({ entries: indices.map((index) => ({ index, data: 0n })), processed: indices.length }),
      setMsrs: (list: typeof entries) => {
        const at = list.findIndex((e) => e.index === 0x4b564d06 && e.data === 7n);
        if (refuse && at >= 0) return { entries: list, processed: at, firstRefused: list[at].index };
        return { entries: list, processed: list.length };
      },
    } as unknown as Vcpu;
    const msrCtx = { ...ctx, caps: { ...ctx.caps, sections: { ...ctx.caps.sections, msrs: { readable: true, writable: true } } } } as StateContext;
    const s = statusOf(() => writeState(vcpu, msrCtx, { msrs: entries }));
    expect(s.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(s.details?.errorInfo).toMatchObject({
      reason: 'KERNEL_REJECTED',
      metadata: { ioctl: 'KVM_SET_MSRS', section: 'STATE_SECTION_MSRS', field: 'state.msrs.entries[1]' },
    });
    expect(s.details?.badRequest).toEqual([expect.objectContaining({ field: 'state.msrs.entries[1]', reason: 'msrs.kernel_refused' })]);
    const notes: string[] = [];
    expect(writeStateWithMsrPolicy(vcpu, msrCtx, { msrs: entries }, notes, 'vCPU 0')).toEqual(['msrs']);
    expect(notes.join()).toContain('0x4b564d06');
  });
});
