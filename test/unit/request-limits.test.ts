/** The bounded reassembly of request messages (src/server/request-limits.ts) and the registry's reservations. */
import type { VcpudError } from '../../src/errors';
import type { Kvm } from '../../src/ffi/kvm';
import { BoundedMessageDecoder, maxRequestBytes, RequestBudget, STATE_MESSAGE_MAX, UPLOAD_MESSAGE_MAX } from '../../src/server/request-limits';
import { VmRegistry } from '../../src/vm/registry';

const frame = (payload: Buffer, compressed = 0) => {
  const p = Buffer.alloc(5);
  p[0] = compressed;
  p.writeUInt32BE(payload.length, 1);
  return Buffer.concat([p, payload]);
};

function decoder(limit: number, budget = new RequestBudget(1 << 30), stallMs = 10_000) {
  const errors: VcpudError[] = [];
  const d = new BoundedMessageDecoder('/test.Service/Method', limit, budget, stallMs, (e) => errors.push(e));
  return { d, errors, budget };
}

describe('BoundedMessageDecoder', () => {
  it('hands on whole framed messages however the bytes are split', () => {
    const { d, errors } = decoder(1 << 20);
    const bytes = Buffer.concat([frame(Buffer.from('first')), frame(Buffer.alloc(0)), frame(Buffer.alloc(70_000, 7))]);
    const out: Buffer[] = [];
    for (let at = 0; at < bytes.length; at += 3) out.push(...d.write(bytes.subarray(at, at + 3)));
    expect(out.map((b) => b.length)).toEqual([10, 5, 70_005]);
    expect(out[0].subarray(5).toString()).toBe('first');
    expect(Buffer.concat(out)).toEqual(bytes);
    expect(errors).toEqual([]);
    d.close();
  });

  it('hands on messages that arrive whole in one chunk as they are, with the checks and the stall timer of split ones', async () => {
    const { d, errors } = decoder(1024, new RequestBudget(1 << 30), 50);
    const small = [frame(Buffer.from('first')), frame(Buffer.alloc(0)), frame(Buffer.alloc(1000, 3))];
    const out = d.write(Buffer.concat(small));
    expect(out).toEqual(small);
    // Whole messages, then the start of one more in the same chunk: that one is assembled, and can stall.
    const next = frame(Buffer.alloc(900, 9));
    const got = d.write(Buffer.concat([small[0], next.subarray(0, 300)]));
    expect(got).toEqual([small[0]]);
    expect(d.write(next.subarray(300))).toEqual([next]);
    d.write(next.subarray(0, 10));
    await new Promise((r) => setTimeout(r, 150));
    expect(errors[0]).toMatchObject({ kind: 'resource_exhausted', details: { reason: 'UPLOAD_STALLED' } });
    // Refusals do not depend on how the bytes arrive.
    for (const bytes of [frame(Buffer.alloc(2000)), frame(Buffer.from('x'), 1)]) {
      const whole = decoder(1024);
      expect(whole.d.write(bytes)).toEqual([]);
      const split = decoder(1024);
      split.d.write(bytes.subarray(0, 5));
      expect(whole.errors.map((e) => e.message)).toEqual(split.errors.map((e) => e.message));
      expect(whole.errors).toHaveLength(1);
    }
  });

  it('refuses a message over the method limit as soon as its prefix arrives', () => {
    const { d, errors } = decoder(1024);
    const p = Buffer.alloc(5);
    p.writeUInt32BE(60 << 20, 1);
    expect(d.write(p)).toEqual([]);
    expect(errors[0]).toMatchObject({ kind: 'resource_exhausted', details: { limit: 'max_request_message_bytes' } });
    expect(d.write(Buffer.alloc(4096))).toEqual([]); // nothing more is assembled
  });

  it('counts large messages against the shared budget until they are complete, refusing what does not fit', () => {
    const budget = new RequestBudget(100_000);
    const a = decoder(1 << 20, budget);
    const b = decoder(1 << 20, budget);
    const big = frame(Buffer.alloc(80_000));
    a.d.write(big.subarray(0, 1000));
    expect(budget.inFlight).toBe(80_000);
    b.d.write(big.subarray(0, 1000));
    expect(b.errors[0]).toMatchObject({ kind: 'resource_exhausted', details: { limit: 'max_request_bytes_in_flight' } });
    expect(a.d.write(big.subarray(1000))).toHaveLength(1);
    expect(budget.inFlight).toBe(0);
    // Small messages are never counted; a call that ends midway gives its share back.
    a.d.write(frame(Buffer.alloc(STATE_MESSAGE_MAX)));
    a.d.write(big.subarray(0, 10));
    expect(budget.inFlight).toBe(80_000);
    a.d.close();
    expect(budget.inFlight).toBe(0);
  });

  it('ends a message that stops arriving for the stall timeout (UPLOAD_STALLED), unless the server paused the stream', async () => {
    const stalled = decoder(1 << 20, new RequestBudget(1 << 30), 50);
    stalled.d.write(frame(Buffer.alloc(100_000)).subarray(0, 100));
    let paused = true;
    const errors: VcpudError[] = [];
    const held = new BoundedMessageDecoder(
      '/m',
      1 << 20,
      new RequestBudget(1 << 30),
      50,
      (e) => errors.push(e),
      () => paused,
    );
    held.write(frame(Buffer.alloc(100_000)).subarray(0, 100));
    await new Promise((r) => setTimeout(r, 200));
    expect(stalled.errors[0]).toMatchObject({ kind: 'resource_exhausted', details: { reason: 'UPLOAD_STALLED', limit: 'upload_stall_timeout' } });
    expect(stalled.errors[0].message).toMatch(/95 of 100000 bytes received\) stalled: nothing arrived for 50 ms/);
    expect(errors).toEqual([]);
    paused = false;
    await new Promise((r) => setTimeout(r, 200));
    expect(errors[0]?.details.reason).toBe('UPLOAD_STALLED');
    held.close();
  });

  it('refuses compressed messages (their inflated size cannot be bounded first)', () => {
    const { d, errors } = decoder(1 << 20);
    expect(d.write(frame(Buffer.from('x'), 1))).toEqual([]);
    expect(errors[0]).toMatchObject({ kind: 'invalid_argument' });
  });

  it('method limits: bulk methods get --max-message-bytes, uploads chunks, everything else a state-sized request', () => {
    const limits = { maxMessageBytes: 64 << 20 };
    expect(maxRequestBytes('/vcpud.v1.VmService/WriteMemory', limits)).toBe(64 << 20);
    expect(maxRequestBytes('/vcpud.v1.VmService/LoadProgram', limits)).toBe(64 << 20);
    expect(maxRequestBytes('/vcpud.v1.SnapshotService/RestoreSnapshotStream', limits)).toBe(UPLOAD_MESSAGE_MAX);
    expect(maxRequestBytes('/vcpud.v1.VcpuStateService/GetState', limits)).toBe(STATE_MESSAGE_MAX);
    expect(maxRequestBytes('/vcpud.v1.VcpuStateService/GetState', { maxMessageBytes: 1024 })).toBe(1024);
  });
});

describe('VmRegistry reservations', () => {
  const registry = () => new VmRegistry({} as Kvm, { maxVms: 2, maxVcpusPerVm: 4, maxMemoryPerVmBytes: 64 << 20, maxMemoryTotalBytes: 64 << 20 });
  const spec = (mib: number) => ({ memoryBytes: mib << 20, vcpuCount: 1 });

  it('a VM slot counts against max_vms, its memory once the header is known; release gives both back', () => {
    const r = registry();
    const a = r.reserve();
    const b = r.reserve();
    expect(() => r.reserve()).toThrow(/max_vms=2/);
    r.reserve(spec(40), a);
    expect(() => r.reserve(spec(40), b)).toThrow(/max_memory_total_bytes/);
    r.reserve(spec(24), b);
    a.release();
    a.release(); // idempotent
    expect(() => r.checkSpec(spec(40))).not.toThrow();
    b.release();
    expect(() => r.reserve(spec(64))).not.toThrow();
  });

  it('checkSpec leaves out the reservation a VM is created under', () => {
    const r = registry();
    const a = r.reserve(spec(64));
    expect(() => r.checkSpec(spec(64))).toThrow(/max_memory_total_bytes/);
    expect(() => r.checkSpec(spec(64), a)).not.toThrow();
  });
});
