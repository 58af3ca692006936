/**
 * Adversarial: vcpud's memory has a bound no client can exceed (issue 13, items 2, 7 and 8). Against
 * a real vcpud with small caps, each abuse runs for a few seconds while vcpud's RSS is sampled and a
 * bystander calls GetVm on its own connection; the peak RSS must stay within README's bound
 * (idle RSS + guest memory + N, N = memoryBoundBytes of the caps) and every bystander call must be
 * answered. The bystander's latency is measured and printed (RELIABILITY.md quotes it), never asserted.
 *
 * Settings a new vcpud takes only from the environment (VCPUD_MAX_REQUEST_BYTES_IN_FLIGHT,
 * VCPUD_UPLOAD_STALL_TIMEOUT): an older build ignores them, so VCPUD_MAIN=<unfixed build> runs the
 * same abuses against it.
 */
import crypto from 'node:crypto';
import * as grpc from '@grpc/grpc-js';
import { loadConfig } from '../../src/server/config';
import { memoryBoundBytes } from '../../src/server/memory-bound';
import { describeKvm } from '../support/kvm';
import { fdTargets, rssBytes } from '../support/proc-resources';
import { connectRaw, decodeResponses, encodeRequest, messagePrefix, rawCall, within, type RawCall } from '../support/raw-grpc';
import { counterVm, runStream, uploadSnapshot } from '../support/snapshot';
import { call, callError, startVcpud, type VcpudProcess } from '../support/vcpud-process';
import { decodeStatusDetails } from '../../src/api/status-details';

type Client = grpc.Client & Record<string, Function>;
const MiB = 1024 * 1024;
const ENV = { VCPUD_MAX_REQUEST_BYTES_IN_FLIGHT: '16Mi', VCPUD_MAX_MESSAGE_BYTES: '16Mi', VCPUD_UPLOAD_STALL_TIMEOUT: '2s' };
/** The grpc-js clients of a test share one connection (grpc-js pools subchannels); the raw attacker has its own. */
const CONNECTIONS = 2;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Figures {
  abuse: string;
  idleMiB: number;
  peakMiB: number;
  boundMiB: number;
  bystanderCalls: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
  /** When calls over 500 ms started, in ms from the abuse's start. */
  slowCallsAtMs: number[];
}
const figures: Figures[] = [];
afterAll(() => {
  if (figures.length) console.log(`abuse-memory figures (RSS in MiB, bystander GetVm latency in ms):\n${JSON.stringify(figures, null, 1)}`);
});

const quantile = (sorted: number[], q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
const mib = (b: number) => Math.round((b / MiB) * 10) / 10;

/**
 * Runs `abuse` while sampling vcpud's RSS and a bystander's GetVm; returns the figures after
 * checking the bound and the bystander's answers. `guestBytes`: guest memory the abuse may legitimately hold.
 */
async function underAbuse(
  d: VcpudProcess,
  args: string[],
  name: string,
  bystanderVm: string,
  guestBytes: number,
  abuse: () => Promise<void>,
): Promise<Figures> {
  const pid = d.proc.pid!;
  const config = loadConfig(args, ENV);
  const idle = rssBytes(pid);
  const bound = idle + guestBytes + memoryBoundBytes(config, CONNECTIONS);
  let peak = idle;
  let running = true;
  const sampler = (async () => {
    while (running && d.proc.exitCode === null) {
      peak = Math.max(peak, rssBytes(pid));
      await sleep(100);
    }
  })();
  const bystander = d.client('VmService');
  const latencies: number[] = [];
  const slowCallsAtMs: number[] = [];
  const failures: string[] = [];
  const began = process.hrtime.bigint();
  const calls = (async () => {
    while (running) {
      const t = process.hrtime.bigint();
      try {
        await call(bystander, 'GetVm', { vmId: bystanderVm });
        const ms = Number(process.hrtime.bigint() - t) / 1e6;
        latencies.push(ms);
        if (ms > 500) slowCallsAtMs.push(Math.round(Number(t - began) / 1e6));
      } catch (e) {
        failures.push((e as Error).message);
      }
      await sleep(20);
    }
  })();
  try {
    await abuse();
  } finally {
    running = false;
    await Promise.all([sampler, calls]);
  }
  const sorted = [...latencies].sort((a, b) => a - b);
  const f: Figures = {
    abuse: name,
    idleMiB: mib(idle),
    peakMiB: mib(peak),
    boundMiB: mib(bound),
    bystanderCalls: latencies.length,
    p50Ms: Math.round(quantile(sorted, 0.5) * 10) / 10,
    p99Ms: Math.round(quantile(sorted, 0.99) * 10) / 10,
    maxMs: Math.round((sorted[sorted.length - 1] ?? NaN) * 10) / 10,
    slowCallsAtMs,
  };
  figures.push(f);
  expect(d.proc.exitCode).toBeNull();
  expect(failures).toEqual([]);
  expect(latencies.length).toBeGreaterThan(0);
  expect(peak).toBeLessThanOrEqual(bound);
  return f;
}

async function start(args: string[]): Promise<{ d: VcpudProcess; vms: Client; bystanderVm: string }> {
  const d = await startVcpud(args, ENV);
  const vms = d.client('VmService');
  const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 * MiB), vcpuCount: 1, name: 'bystander' });
  return { d, vms, bystanderVm: vm.id };
}

/** One framed request message. */
const framed = (service: 'VmService' | 'VcpuStateService' | 'SnapshotService', method: string, req: object) => {
  const body = encodeRequest(service, method, req);
  return Buffer.concat([messagePrefix(body.length), body]);
};

describeKvm('abuse: vcpud memory stays within its stated bound', () => {
  let current: VcpudProcess | undefined;
  afterEach(async () => {
    await current?.stop();
    current = undefined;
  });

  it("StreamConsole clients that never read: output beyond each stream's buffer is dropped and counted", async () => {
    const args = ['--max-concurrent-streams', '64', '--max-vms', '2'];
    const s = await start(args);
    const d = s.d;
    current = d;
    const id = await counterVm(s.vms, { memory: 2 * MiB });
    await call(s.vms, 'RunVm', { vmId: id });
    const session = connectRaw(d.serving.api);
    // The bystander's latency with the same guest running and nobody abusing anything, for comparison.
    await underAbuse(d, args, 'baseline: counter64 running, no abuse, 3 s', s.bystanderVm, 4 * MiB, async () => {
      await sleep(3000);
    });
    const request = framed('VmService', 'StreamConsole', { vmId: id });
    const streams: RawCall[] = [];
    await underAbuse(d, args, '64 unread StreamConsole streams, counter64 running, 8 s', s.bystanderVm, 4 * MiB, async () => {
      for (let i = 0; i < 64; i++) streams.push(rawCall(session, 'VmService', 'StreamConsole', request, { read: false }));
      await sleep(8000);
    });
    // A client that reads again after a while is told how much it missed.
    const received: Buffer[] = [];
    streams[0].stream.on('data', (b: Buffer) => received.push(b));
    streams[0].stream.resume();
    await sleep(1000);
    session.destroy();
    const messages = decodeResponses<{ droppedOutputBytes: string; droppedEvents: string }>('VmService', 'StreamConsole', Buffer.concat(received));
    expect(messages.reduce((n, m) => n + Number(m.droppedOutputBytes), 0)).toBeGreaterThan(0);
    expect(messages.reduce((n, m) => n + Number(m.droppedEvents), 0)).toBeGreaterThan(0);
  });

  it('ReadMemory streams that are never read wait for their client instead of queueing chunks', async () => {
    const args = ['--max-concurrent-streams', '64', '--max-vms', '2'];
    const s = await start(args);
    const d = s.d;
    current = d;
    const { vm } = await call<{ vm: { id: string } }>(s.vms, 'CreateVm', { memoryBytes: String(32 * MiB), vcpuCount: 1 });
    const session = connectRaw(d.serving.api);
    const request = framed('VmService', 'ReadMemory', { vmId: vm.id, guestPhysicalAddress: '0', length: String(32 * MiB) });
    await underAbuse(d, args, '63 unread ReadMemory streams of 32 MiB, 5 s', s.bystanderVm, 34 * MiB, async () => {
      for (let i = 0; i < 63; i++) rawCall(session, 'VmService', 'ReadMemory', request, { read: false });
      await sleep(5000);
    });
    session.destroy();
    // A reader still gets every byte.
    const read = await runStream(s.vms.ReadMemory({ vmId: vm.id, guestPhysicalAddress: '0', length: String(3 * MiB) }));
    expect(read.error).toBeUndefined();
    expect(read.messages.reduce((n, m) => n + m.data.length, 0)).toBe(3 * MiB);
  });

  it('request messages: per-method limits before reassembly, one budget for large ones, a stall timeout, msr_indices bounded', async () => {
    const args = ['--max-concurrent-streams', '64', '--max-vms', '2'];
    const s = await start(args);
    const d = s.d;
    current = d;
    const { vm } = await call<{ vm: { id: string } }>(s.vms, 'CreateVm', { memoryBytes: String(16 * MiB), vcpuCount: 1 });
    const session = connectRaw(d.serving.api);
    const declared = 16 * MiB;
    const header = encodeRequest('VmService', 'WriteMemory', { vmId: vm.id, guestPhysicalAddress: '0' });
    // WriteMemory's data field (3, bytes) announcing `declared - header - 5` bytes, of which 12 MiB follow.
    const dataTag = Buffer.from([0x1a, ...varint(declared - header.length - 1 - varint(declared).length)]);
    const opening = Buffer.concat([messagePrefix(declared), header, dataTag]);
    const payload = crypto.randomBytes(12 * MiB);
    const calls: RawCall[] = [];
    let giant: RawCall | undefined;
    await underAbuse(d, args, '62 WriteMemory messages declaring 16 MiB, 12 MiB sent, never finished', s.bystanderVm, 20 * MiB, async () => {
      for (let i = 0; i < 62; i++) {
        const c = rawCall(session, 'VmService', 'WriteMemory', opening, { end: false });
        c.stream.write(payload);
        calls.push(c);
      }
      // A state call declaring 60 MiB is refused when its 5-byte prefix arrives.
      giant = rawCall(session, 'VcpuStateService', 'GetState', Buffer.concat([messagePrefix(60 * MiB), Buffer.alloc(MiB)]), { end: false });
      await sleep(6000);
    });
    const outcomes = await Promise.all(calls.map((c) => within(c.status, 10_000, { code: -2, reason: 'no status within 10 s' })));
    session.destroy();
    const by = (reason?: string) => outcomes.filter((o) => o.code === grpc.status.RESOURCE_EXHAUSTED && o.reason === reason).length;
    // The budget (16 MiB) admits one message at a time; the others are refused; the admitted one stalls.
    expect(by('LIMIT_EXCEEDED')).toBe(61);
    expect(by('UPLOAD_STALLED')).toBe(1);
    expect(await giant!.status).toMatchObject({ code: grpc.status.RESOURCE_EXHAUSTED, reason: 'LIMIT_EXCEEDED', limit: 'max_request_message_bytes' });

    // msr_indices longer than the host's MSR list: INVALID_ARGUMENT naming the field and the limit.
    const state = d.client('VcpuStateService');
    const caps = await call<{ msrIndices: number[] }>(state, 'GetCapabilities', {});
    const hostMsrs = caps.msrIndices.length;
    const err = await callError(state, 'GetState', {
      vmId: vm.id,
      vcpuId: 0,
      sections: ['STATE_SECTION_MSRS'],
      msrIndices: Array.from({ length: hostMsrs + 1 }, () => 0x10),
    });
    expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(err.details).toContain(`over the limit of ${hostMsrs}`);
    expect(decodeStatusDetails(err.metadata)?.badRequest?.[0]).toMatchObject({ field: 'msr_indices', reason: 'msr_indices.max_count' });
  });

  it('restore uploads reserve their VM and memory from the header before the bytes, and stalled ones time out', async () => {
    const args = ['--max-concurrent-streams', '16', '--max-vms', '3', '--max-memory-total', '64Mi'];
    const s = await start(args);
    const d = s.d;
    current = d;
    const snaps = d.client('SnapshotService');
    // A 40 MiB VM whose memory is all data: its snapshot carries 38 MiB of pages.
    const { vm: source } = await call<{ vm: { id: string } }>(s.vms, 'CreateVm', { memoryBytes: String(40 * MiB), vcpuCount: 1 });
    const fill = crypto.randomBytes(4 * MiB);
    for (let gpa = 0; gpa < 40 * MiB; gpa += fill.length) await call(s.vms, 'WriteMemory', { vmId: source.id, guestPhysicalAddress: String(gpa), data: fill });
    const parts: Buffer[] = [];
    const snap = await runStream(snaps.CreateSnapshot({ vmId: source.id, stream: true }), (m) => m.data && parts.push(m.data));
    expect(snap.error).toBeUndefined();
    const bytes = Buffer.concat(parts);
    await call(s.vms, 'DeleteVm', { vmId: source.id });
    await sleep(1000);

    const results: { ok: boolean; code?: number; limit?: string }[] = [];
    await underAbuse(d, args, '8 concurrent 40 MiB uploads under --max-memory-total 64Mi', s.bystanderVm, 64 * MiB, async () => {
      const uploads = Array.from({ length: 8 }, (_, i) =>
        uploadSnapshot(snaps, bytes, { vmName: `up${i}` }).then(
          () => results.push({ ok: true }),
          (e: grpc.ServiceError) => results.push({ ok: false, code: e.code, limit: decodeStatusDetails(e.metadata)?.errorInfo?.metadata?.limit }),
        ),
      );
      await Promise.all(uploads);
    });
    expect(results.filter((r) => r.ok).length).toBe(1);
    expect(results.filter((r) => !r.ok).every((r) => r.code === grpc.status.RESOURCE_EXHAUSTED)).toBe(true);
    const { vms: listed } = await call<{ vms: { id: string; name: string }[] }>(s.vms, 'ListVms', {});
    for (const v of listed.filter((x) => x.name !== 'bystander')) await call(s.vms, 'DeleteVm', { vmId: v.id });

    // Uploads that stop after the header hold at most --max-vms VMs, and only until the stall timeout.
    const stalled = Array.from({ length: 10 }, (_, i) => {
      const up = snaps.RestoreSnapshotStream((err: grpc.ServiceError | null) => up.emit('outcome', err)) as grpc.ClientWritableStream<object>;
      up.on('error', () => {});
      const outcome = new Promise<grpc.ServiceError | null>((resolve) => up.once('outcome', resolve));
      up.write({ options: { vmName: `stall${i}` } });
      up.write({ data: bytes.subarray(0, MiB) });
      return outcome;
    });
    await sleep(1000);
    const kvmVms = () => [...fdTargets(d.proc.pid!).values()].filter((t) => t === 'anon_inode:kvm-vm').length;
    expect(kvmVms()).toBeLessThanOrEqual(3);
    const ended = await Promise.all(stalled.map((o) => within(o, 10_000, 'no status within 10 s')));
    const outcome = (e: unknown) => {
      const info = typeof e === 'string' ? undefined : decodeStatusDetails((e as grpc.ServiceError).metadata)?.errorInfo;
      return info ? `${info.reason}${info.metadata.limit ? ` ${info.metadata.limit}` : ''}` : String(e);
    };
    // Two uploads get the two free VMs; the first header takes 40 MiB, so the second header is over the total.
    expect(ended.map(outcome).sort()).toEqual([
      'LIMIT_EXCEEDED max_memory_total_bytes',
      ...Array(8).fill('LIMIT_EXCEEDED max_vms'),
      'UPLOAD_STALLED upload_stall_timeout',
    ]);
    expect(kvmVms()).toBe(1); // the bystander's
    const { vm } = await call<{ vm: { id: string } }>(s.vms, 'CreateVm', { memoryBytes: String(32 * MiB), vcpuCount: 1 });
    expect(vm.id).toBeTruthy();
  });
});

function varint(n: number): number[] {
  const out: number[] = [];
  while (n > 0x7f) {
    out.push((n & 0x7f) | 0x80);
    n = Math.floor(n / 128);
  }
  out.push(n);
  return out;
}
