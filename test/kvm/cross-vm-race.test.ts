/**
 * Adversarial: a call names one VM and can only ever touch that VM. Each round races one RPC on a
 * RUNNING (or, for ResumeVcpu, paused) vCPU of VM A against DeleteVm(A) and a CreateVm(B) sent right
 * behind it, so B's vCPU and VM get the file descriptor numbers A just gave back to the kernel. Every
 * VM carries markers of its own (R15 and two 8-byte words of memory, random per VM), so a read of the
 * wrong VM is recognised in what the call returns, and a write to the wrong VM in B's state, which
 * must still be a fresh VM's (R15 0, marker words 0, vCPU CREATED) when the round ends.
 *
 * The victim's outcome must be OK (it ran before the delete, on A) or NOT_FOUND with VM_NOT_FOUND;
 * ReadMemory and StreamConsole cut short by DeleteVm end OK, as vm.proto says.
 *
 * Bounded: VCPUD_CROSS_VM_ROUNDS rounds (3,000) or VCPUD_CROSS_VM_SECONDS (150 s), whichever first,
 * over VCPUD_CROSS_VM_LANES lanes racing at once (2). Raise them for a soak.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { decodeStatusDetails } from '../../src/api/status-details';
import { GUESTS, GUEST_ABI } from '../guests/guests';
import { vcpudProto } from '../../src/api/proto';
import { describeKvm } from '../support/kvm';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type Client = grpc.Client & Record<string, Function>;
type Msg = Record<string, any>;

const MiB = 1024 * 1024;
const ROUNDS = Number(process.env.VCPUD_CROSS_VM_ROUNDS ?? 3000);
const SECONDS = Number(process.env.VCPUD_CROSS_VM_SECONDS ?? 150);
const LANES = Number(process.env.VCPUD_CROSS_VM_LANES ?? 2);

/** Guest memory per VM: more than ReadMemory's 16 messages of 1 MiB that grpc-js buffers, so a read waits for the client. */
const MEMORY_BYTES = 32 * MiB;
const READ_GPA = 1 * MiB;
const READ_LENGTH = 24 * MiB;
/** The memory marker word: at the start of the ReadMemory range. */
const MARK_GPA = READ_GPA;
/** Where the WriteMemory victim writes (B must still hold zero there): next to the marker, so one read checks both. */
const STRAY_GPA = MARK_GPA + 8;
/** counter64 counts from VM serial * COUNT_BASE, so its console output names the VM it came from. */
const COUNT_BASE = 1_000_000_000n;
const GUEST_IMAGE = fs.existsSync(GUESTS.counter64.file) ? fs.readFileSync(GUESTS.counter64.file) : Buffer.alloc(0);

interface TestVm {
  id: string;
  serial: bigint;
  regMark: bigint;
  memMark: bigint;
}

interface Lane {
  vms: Client;
  state: Client;
  snaps: Client;
}

interface Outcome {
  status: string;
  /** What showed another VM, if anything did. */
  crossVm?: string;
}

const KINDS = ['GetState', 'SetState', 'GetNestedState', 'ReadMemory', 'WriteMemory', 'StreamConsole', 'CreateSnapshot', 'PauseVcpu', 'ResumeVcpu'] as const;
type Kind = (typeof KINDS)[number];

const u64 = (v: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(v);
  return b;
};
const randomMark = () => randomBytes(8).readBigUInt64LE() | 1n; // never 0, a fresh VM's value

function statusOf(e: unknown): string {
  const err = e as grpc.ServiceError;
  if (typeof err?.code !== 'number') return `THROWN ${String((e as Error)?.message ?? e)}`;
  const reason = err.metadata ? decodeStatusDetails(err.metadata)?.errorInfo?.reason : undefined;
  return `${grpc.status[err.code]}${reason ? `/${reason}` : ''}`;
}

/** Every message of a server stream and how it ended; `onFirst` runs at the first message. */
function drain(stream: grpc.ClientReadableStream<Msg>, onFirst?: (s: grpc.ClientReadableStream<Msg>) => void): Promise<{ msgs: Msg[]; status: string }> {
  return new Promise((resolve) => {
    const msgs: Msg[] = [];
    stream.on('data', (m: Msg) => {
      msgs.push(m);
      if (msgs.length === 1) onFirst?.(stream);
    });
    stream.on('error', (e) => resolve({ msgs, status: statusOf(e) }));
    stream.on('end', () => resolve({ msgs, status: 'OK' }));
  });
}

/**
 * A delay between sending the victim and the delete that sweeps the window the victim is open in:
 * 0 to 15 turns of the client's event loop (tens of microseconds each), or 1 or 2 ms.
 */
async function stagger(step: number): Promise<void> {
  const turns = step % 18;
  if (turns >= 16) return new Promise((r) => setTimeout(r, turns - 15));
  for (let i = 0; i < turns; i++) await new Promise((r) => setImmediate(r));
}

const settle = <T>(p: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; status: string }> =>
  p.then(
    (value) => ({ ok: true as const, value }),
    (e) => ({ ok: false as const, status: statusOf(e) }),
  );

describeKvm('cross-VM access: RPCs raced by DeleteVm + CreateVm (real process, real KVM)', () => {
  let d: VcpudProcess;
  let nestedSupported = false;
  let fullState: Msg; // every section of a counter64 vCPU, for SetState victims
  let serials = 0n;
  const clients: grpc.Client[] = [];

  beforeAll(async () => {
    d = await startVcpud(['--max-vms', String(4 * LANES + 4)]);
    const caps = await call<Msg>(d.client('VcpuStateService'), 'GetCapabilities', {});
    nestedSupported = !!caps.nested?.supported;
  });
  afterAll(async () => {
    for (const c of clients) c.close();
    expect(await d.stop()).toBe(0);
  });

  function lane(): Lane {
    // A connection of its own per client: a paused ReadMemory must not hold up other lanes' replies.
    const make = (s: 'VmService' | 'VcpuStateService' | 'SnapshotService') => {
      const Ctor = vcpudProto().vcpud.v1[s] as unknown as grpc.ServiceClientConstructor;
      const c = new Ctor(d.serving.api, grpc.credentials.createInsecure(), { 'grpc.use_local_subchannel_pool': 1 }) as Client;
      clients.push(c);
      return c;
    };
    return { vms: make('VmService'), state: make('VcpuStateService'), snaps: make('SnapshotService') };
  }

  async function createVm(l: Lane): Promise<TestVm> {
    const { vm } = await call<Msg>(l.vms, 'CreateVm', { memoryBytes: String(MEMORY_BYTES), vcpuCount: 1, name: 'cross-vm' });
    return { id: vm.id, serial: ++serials, regMark: randomMark(), memMark: randomMark() };
  }

  /** Program and markers, then RUNNING. */
  async function start(l: Lane, vm: TestVm): Promise<void> {
    await call(l.vms, 'LoadProgram', { vmId: vm.id, image: GUEST_IMAGE, loadAddress: String(GUEST_ABI.loadAddress) });
    await call(l.state, 'SetState', { vmId: vm.id, vcpuId: 0, state: { regs: { rip: String(GUEST_ABI.loadAddress), rflags: '2', r15: String(vm.regMark) } } });
    await call(l.vms, 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: String(MARK_GPA), data: u64(vm.memMark) });
    await call(l.vms, 'RunVm', { vmId: vm.id });
  }

  /** Moves the running counter to serial * COUNT_BASE, so the VM's console output names it. */
  async function rebaseCounter(l: Lane, vm: TestVm): Promise<void> {
    await call(l.vms, 'PauseVcpu', { vmId: vm.id, vcpuId: 0 });
    const { state } = await call<Msg>(l.state, 'GetState', { vmId: vm.id, vcpuId: 0, sections: ['STATE_SECTION_REGS'] });
    await call(l.state, 'SetState', { vmId: vm.id, vcpuId: 0, state: { regs: { ...state.regs, rbx: String(vm.serial * COUNT_BASE) } } });
    await call(l.vms, 'ResumeVcpu', { vmId: vm.id, vcpuId: 0 });
  }

  /**
   * Starts `vm`; one that fails to start (its state was changed by someone else) is recorded,
   * deleted and replaced by a new one.
   */
  async function startOrReplace(l: Lane, vm: TestVm, record: (what: string) => void): Promise<TestVm> {
    try {
      await start(l, vm);
      return vm;
    } catch (e) {
      record(`starting the new VM failed: ${statusOf(e)} ${(e as Error).message}`);
      await settle(call(l.vms, 'DeleteVm', { vmId: vm.id }));
      const fresh = await createVm(l);
      await start(l, fresh);
      return fresh;
    }
  }

  /** B right after the race: a fresh VM nobody else touched. */
  async function checkFresh(l: Lane, vm: TestVm, other: TestVm): Promise<string | undefined> {
    const { vm: got } = await call<Msg>(l.vms, 'GetVm', { vmId: vm.id });
    if (got.vcpus[0].runState !== 'VCPU_RUN_STATE_CREATED') return `new VM's vCPU is ${got.vcpus[0].runState}`;
    const { state } = await call<Msg>(l.state, 'GetState', { vmId: vm.id, vcpuId: 0, sections: ['STATE_SECTION_REGS'] });
    if (BigInt(state.regs.r15) !== 0n)
      return `new VM's R15 is ${state.regs.r15}${BigInt(state.regs.r15) === other.regMark ? " (the deleted VM's marker)" : ''}`;
    const r = await drain(l.vms.ReadMemory({ vmId: vm.id, guestPhysicalAddress: String(MARK_GPA), length: '16' }));
    if (r.status !== 'OK') return `ReadMemory of the new VM: ${r.status}`;
    const data = r.msgs[0].data as Buffer;
    if (!data.equals(Buffer.alloc(16))) return `new VM's memory at 0x${MARK_GPA.toString(16)} is ${data.toString('hex')}`;
    return undefined;
  }

  /** The RPC under test on A, started now; resolves with its outcome once it ends. */
  function victim(kind: Kind, l: Lane, a: TestVm, deleted: Promise<unknown>): Promise<Outcome> {
    const vcpu = { vmId: a.id, vcpuId: 0 };
    const unary = async (method: string, client: Client, req: object, check?: (res: Msg) => string | undefined): Promise<Outcome> => {
      const r = await settle(call<Msg>(client, method, req));
      return r.ok ? { status: 'OK', crossVm: check?.(r.value) } : { status: r.status };
    };
    switch (kind) {
      case 'GetState':
        return unary('GetState', l.state, vcpu, (res) =>
          BigInt(res.state.regs.r15) === a.regMark ? undefined : `GetState answered OK with R15 ${res.state.regs.r15}, not the VM's marker`,
        );
      case 'SetState':
        return unary('SetState', l.state, { ...vcpu, state: { ...fullState, regs: { ...fullState.regs, r15: String(a.regMark) } } });
      case 'GetNestedState':
        return unary('GetNestedState', l.state, vcpu);
      case 'WriteMemory':
        return unary('WriteMemory', l.vms, { vmId: a.id, guestPhysicalAddress: String(STRAY_GPA), data: u64(a.memMark) });
      case 'PauseVcpu':
        return unary('PauseVcpu', l.vms, vcpu);
      case 'ResumeVcpu':
        return unary('ResumeVcpu', l.vms, vcpu);
      case 'ReadMemory': {
        // The reader stops after the first chunk until the delete is answered, so the delete lands mid-stream.
        const stream = l.vms.ReadMemory({ vmId: a.id, guestPhysicalAddress: String(READ_GPA), length: String(READ_LENGTH) });
        return drain(stream, (s) => {
          s.pause();
          void Promise.race([deleted, new Promise((r) => setTimeout(r, 500))]).then(() => s.resume());
        }).then(({ msgs, status }) => {
          for (const m of msgs) {
            const gpa = Number(m.guestPhysicalAddress);
            if (gpa === MARK_GPA && m.data.readBigUInt64LE(0) !== a.memMark)
              return { status, crossVm: `ReadMemory chunk at 0x${gpa.toString(16)} lacks the VM's marker` };
          }
          return { status };
        });
      }
      case 'StreamConsole':
        return drain(l.vms.StreamConsole({ vmId: a.id, fromStart: false })).then(({ msgs, status }) => {
          const text = msgs
            .filter((m) => m.event === 'output')
            .map((m) => m.output.toString('latin1'))
            .join('');
          const lines = text.split('\n').slice(1, -1); // the first and last may be partial
          const foreign = lines.find((line) => BigInt(line) >= COUNT_BASE && BigInt(line) / COUNT_BASE !== a.serial);
          return { status, crossVm: foreign ? `StreamConsole of VM ${a.serial} printed ${foreign}` : undefined };
        });
      case 'CreateSnapshot':
        return drain(l.snaps.CreateSnapshot({ vmId: a.id, stream: true })).then(({ msgs, status }) => {
          if (status !== 'OK') return { status };
          const bytes = Buffer.concat(msgs.filter((m) => m.event === 'data').map((m) => m.data as Buffer));
          const missing = [
            ['R15 marker', a.regMark],
            ['memory marker', a.memMark],
          ].filter(([, v]) => bytes.indexOf(u64(v as bigint)) < 0);
          return { status, crossVm: missing.length ? `snapshot lacks the VM's ${missing.map(([n]) => n).join(' and ')}` : undefined };
        });
    }
  }

  it(
    'finds zero cross-VM access over every state, memory, console, snapshot and run-control RPC',
    async () => {
      const kinds = KINDS.filter((k) => k !== 'GetNestedState' || nestedSupported);
      const lanes = Array.from({ length: LANES }, lane);
      {
        // A counter64 vCPU's every section, as SetState victims write it back.
        const l = lanes[0];
        const vm = await createVm(l);
        await start(l, vm);
        fullState = (await call<Msg>(l.state, 'GetState', { vmId: vm.id, vcpuId: 0 })).state;
        await call(l.state, 'SetState', { vmId: vm.id, vcpuId: 0, state: fullState }); // the round trip itself works
        await call(l.vms, 'DeleteVm', { vmId: vm.id });
      }

      const counts: Record<string, Record<string, number>> = {};
      const crossVm: { round: number; what: string }[] = [];
      /** Rounds with any sign of another VM, by the RPC raced. */
      const crossVmRounds: Record<string, number> = {};
      const unexpected: string[] = [];
      const deadline = Date.now() + SECONDS * 1000;
      let rounds = 0;
      const started = process.hrtime.bigint();

      await Promise.all(
        lanes.map(async (l) => {
          let a = await createVm(l);
          await start(l, a);
          while (rounds < ROUNDS && Date.now() < deadline) {
            const round = rounds++;
            const kind = kinds[round % kinds.length];
            if (kind === 'StreamConsole') await rebaseCounter(l, a);
            if (kind === 'ResumeVcpu') await call(l.vms, 'PauseVcpu', { vmId: a.id, vcpuId: 0 });
            // The victim first, then (after the swept delay) the delete and the create.
            let markDeleted!: () => void;
            const deleted = new Promise<void>((r) => (markDeleted = r));
            const out = victim(kind, l, a, deleted);
            await stagger(Math.floor(round / kinds.length));
            const del = settle(call(l.vms, 'DeleteVm', { vmId: a.id })).finally(markDeleted);
            const created = createVm(l);
            const [outcome, delResult] = await Promise.all([out, del]);
            const b = await created;
            if (!delResult.ok) unexpected.push(`round ${round}: DeleteVm ${delResult.status}`);
            (counts[kind] ??= {})[outcome.status] = (counts[kind][outcome.status] ?? 0) + 1;
            if (outcome.status !== 'OK' && outcome.status !== 'NOT_FOUND/VM_NOT_FOUND') unexpected.push(`round ${round}: ${kind} ended ${outcome.status}`);
            const fresh = await checkFresh(l, b, a).catch((e) => `checking the new VM failed: ${statusOf(e)} ${(e as Error).message}`);
            const record = (what: string) => {
              if (!crossVm.some((c) => c.round === round)) crossVmRounds[kind] = (crossVmRounds[kind] ?? 0) + 1;
              crossVm.push({ round, what: `round ${round} (${kind}): ${what}` });
            };
            for (const what of [outcome.crossVm, fresh]) if (what) record(what);
            a = await startOrReplace(l, b, record);
          }
          await call(l.vms, 'DeleteVm', { vmId: a.id });
        }),
      );
      const seconds = Number(process.hrtime.bigint() - started) / 1e9;
      const report = { rounds, lanes: LANES, seconds: Number(seconds.toFixed(1)), crossVmRounds, unexpected: unexpected.length, outcomes: counts };
      console.log(`cross-VM race: ${JSON.stringify(report)}\n${[...crossVm.map((c) => c.what), ...unexpected].slice(0, 20).join('\n')}`);
      expect(d.proc.exitCode).toBeNull(); // vcpud is still up
      expect(crossVm.map((c) => c.what)).toEqual([]);
      expect(unexpected).toEqual([]);
      expect(rounds).toBeGreaterThan(0);
    },
    (SECONDS + 120) * 1000,
  );
});
