/**
 * Faults on the migration data plane, in one process: the source engine (src/vm/migration/outgoing.ts)
 * moves a running dirty64 VM from one registry to another through a proxy that can flip a byte or cut
 * the connection at a chosen point. Whatever happens, exactly one live copy is left: after a flipped
 * byte (the destination's checksum check refuses the frame) or a cut mid-pass, the source VM runs and
 * the destination registry is empty; after a cut right behind the COMMIT, the destination has the VM
 * (the engine asks it) and the source copy is gone.
 */
import net from 'node:net';
import path from 'node:path';
import { PAGE_FRAME_FORMAT } from '../../src/ffi/page-frames';
import type { ManagedVm } from '../../src/vm/managed-vm';
import type { IncomingMigration } from '../../src/vm/migration/incoming';
import { migrateVm, type DestinationControl } from '../../src/vm/migration/outgoing';
import { EnvelopeType } from '../../src/vm/migration/protocol';
import { DIRTY64, dirty64Control } from '../guests/guests';
import { inProcessMigration, type InProcessMigration } from '../support/in-process-migration';
import { describeKvm } from '../support/kvm';
import { loadGuest, waitUntil } from '../support/runtime';

const MiB = 1 << 20;
const MEMORY = 32 * MiB;
const STALL_MS = 2000;

/** What the proxy does to the source -> destination bytes. */
type Fault = { kind: 'none' } | { kind: 'flip'; atByte: number } | { kind: 'cut'; atByte: number } | { kind: 'cut-after-commit' };

/**
 * A unix-socket proxy in front of `target` that applies `fault` to what the source sends. For
 * 'cut-after-commit' it parses the envelopes (16-byte headers: type at 4, length at 8; after PAGES_STREAM,
 * bare page frames up to the end frame) and cuts both
 * directions right after forwarding COMMIT, so the destination commits and its answer is lost.
 */
async function faultyProxy(m: InProcessMigration, target: string, fault: Fault): Promise<{ path: string; close(): void }> {
  const { sockets, servers } = m;
  const at = path.join(m.dir, `proxy-${Math.random().toString(16).slice(2)}.sock`);
  const server = net.createServer((client) => {
    const upstream = net.connect({ path: target });
    sockets.add(client).add(upstream);
    let seen = 0;
    let header = Buffer.alloc(0);
    let skip = 0;
    let inFrames = false; // after PAGES_STREAM, up to the end frame
    const cutBoth = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('data', (chunk: Buffer) => {
      if (fault.kind === 'flip' && seen <= fault.atByte && fault.atByte < seen + chunk.length) chunk[fault.atByte - seen] ^= 0x40;
      if (fault.kind === 'cut' && seen + chunk.length > fault.atByte) {
        upstream.write(chunk.subarray(0, Math.max(0, fault.atByte - seen)));
        return cutBoth();
      }
      seen += chunk.length;
      if (fault.kind === 'cut-after-commit') {
        // Walk the envelopes in this chunk: forward up to the end of COMMIT, then cut.
        let off = 0;
        while (off < chunk.length) {
          if (skip) {
            const n = Math.min(skip, chunk.length - off);
            skip -= n;
            off += n;
            continue;
          }
          const headerBytes = inFrames ? PAGE_FRAME_FORMAT.headerBytes : 16;
          const need = headerBytes - header.length;
          header = Buffer.concat([header, chunk.subarray(off, off + need)]);
          off += Math.min(need, chunk.length - off);
          if (header.length < headerBytes) break;
          if (inFrames) {
            // A bare page frame (native/page_frames.h): its table and payload, or the end frame.
            skip = 8 * header.readUInt32LE(16) + (4 + 4096) * header.readUInt32LE(20); // table, page CRCs, pages
            inFrames = !(header.readUInt16LE(6) & 1);
            header = Buffer.alloc(0);
            continue;
          }
          const type = header.readUInt32LE(4);
          skip = header.readUInt32LE(8);
          header = Buffer.alloc(0);
          inFrames = type === EnvelopeType.PagesStream;
          if (type === EnvelopeType.Commit) {
            // The source never hears back; the destination gets the whole COMMIT, then its end.
            client.destroy();
            upstream.end(chunk.subarray(0, off + skip));
            return;
          }
        }
      }
      upstream.write(chunk);
    });
    upstream.on('data', (d) => !client.destroyed && client.write(d));
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('close', () => upstream.end());
    upstream.on('close', () => client.end());
  });
  await new Promise<void>((r) => server.listen(at, r));
  servers.add(server);
  return { path: at, close: () => server.close() };
}

describeKvm('live migration faults on the data plane (real KVM, in process)', () => {
  const m = inProcessMigration(MEMORY, STALL_MS);

  async function runningGuest(): Promise<ManagedVm> {
    const vm = m.source.create({ memoryBytes: MEMORY, vcpuCount: 1 });
    // Random memory so that pass 1 carries data the proxy can damage.
    for (let gpa = 8 * MiB; gpa < MEMORY; gpa += MiB) vm.writeMemory(gpa, Buffer.alloc(MiB, gpa / MiB));
    await loadGuest(vm, 'dirty64');
    vm.writeMemory(DIRTY64.control, dirty64Control({ rangeStart: 4 * MiB, rangePages: 256 }));
    await vm.resumeAll();
    await waitUntil(() => vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0) > 1000n, 'dirty64 to run');
    return vm;
  }

  /** A destination in this process, reached through a proxy applying `fault`. */
  function destination(fault: Fault): DestinationControl & { incoming?: IncomingMigration } {
    let proxy: { close(): void } | undefined;
    const control: DestinationControl & { incoming?: IncomingMigration } = {
      name: 'the in-process destination',
      async prepare(header) {
        const { incoming, socket } = await m.prepare(header);
        control.incoming = incoming;
        const p = await faultyProxy(m, socket, fault);
        proxy = p;
        return { migrationId: incoming.id, endpoint: `unix:${p.path}`, token: incoming.token };
      },
      connect: m.connect,
      async abort(_id, reason) {
        proxy?.close();
        // As a remote destination would: the abort arrives after whatever the destination was doing
        // with what it had received (here: it lets a commit in progress finish first).
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([control.incoming?.done(), new Promise((r) => (timer = setTimeout(r, STALL_MS)))]);
        clearTimeout(timer);
        return control.incoming?.discard(reason) === 'committed' ? 'committed' : 'aborted';
      },
    };
    return control;
  }

  const migrate = (vm: ManagedVm, d: DestinationControl) => migrateVm(vm, d, m.options(vm, {}));

  async function expectOnlyTheSource(vm: ManagedVm, d: { incoming?: IncomingMigration }): Promise<void> {
    expect(m.source.list().map((v) => v.id)).toEqual([vm.id]);
    expect(vm.statuses()[0].state).toBe('running');
    expect(vm.heldBy()).toBeUndefined();
    await waitUntil(() => d.incoming?.state === 'aborted', 'the destination to discard its copy');
    expect(m.dest.list()).toEqual([]);
    // And it keeps writing.
    const at = vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0);
    await waitUntil(() => vm.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0) > at + 1000n, 'dirty64 to go on here');
  }

  // Pre-copy frames go zero-copy and tearable (native/page_frames.h): a page failing its CRC in
  // pass 1 may be one the guest rewrote in flight, so it is refused once pass 2 does not carry it.
  it('a byte flipped in a page frame: the destination refuses it (checksum) once the next pass does not carry it again, the VM runs here, nothing there', async () => {
    const vm = await runningGuest();
    const d = destination({ kind: 'flip', atByte: 4 * MiB });
    const err = await migrate(vm, d).then(
      () => undefined,
      (e: Error & { kind?: string; details?: { reason?: string } }) => e,
    );
    expect({ kind: err?.kind, reason: err?.details?.reason }).toEqual({ kind: 'data_loss', reason: 'MIGRATION_FAILED' });
    expect(err?.message).toMatch(
      /pre-copy, pass 2: .*reported: 1 page\(s\) failed their CRC in pass 1 and pass 2 did not carry them again .*kept running here as it was/,
    );
    await expectOnlyTheSource(vm, d);
  });

  it('the data connection cut mid-pass: the VM runs here, nothing there', async () => {
    const vm = await runningGuest();
    const d = destination({ kind: 'cut', atByte: 3 * MiB });
    const err = await migrate(vm, d).then(
      () => undefined,
      (e: Error & { kind?: string }) => e,
    );
    expect(err?.kind).toBe('unavailable');
    expect(err?.message).toMatch(/pre-copy, pass 1: .*kept running here as it was/);
    await expectOnlyTheSource(vm, d);
  });

  it('the destination fails to make its KVM VM (made while the pages arrive): the VM runs here, nothing there, the error says why', async () => {
    const vm = await runningGuest();
    const d = destination({ kind: 'none' });
    // The source's VM exists already: only the destination's KVM VM fails, once pass 1 is under way.
    const made = jest
      .spyOn(m.kvm, 'createVmAsync')
      .mockImplementationOnce(() => new Promise((_, reject) => setTimeout(() => reject(new Error('KVM_CREATE_VM failed: EMFILE (injected)')), 20)));
    const err = await migrate(vm, d).then(
      () => undefined,
      (e: Error & { details?: { reason?: string } }) => e,
    );
    made.mockRestore();
    expect(err?.details?.reason).toBe('MIGRATION_FAILED');
    expect(d.incoming?.error).toMatch(/could not make the KVM VM: KVM_CREATE_VM failed: EMFILE \(injected\)/);
    await expectOnlyTheSource(vm, d);
  });

  it("the commit's acknowledgement lost: the engine asks the destination, which has it; the source copy goes", async () => {
    const vm = await runningGuest();
    const d = destination({ kind: 'cut-after-commit' });
    const err = await migrate(vm, d).then(
      () => undefined,
      (e: Error) => e,
    );
    expect(err?.message).toMatch(/the destination committed but its acknowledgement was lost/);
    expect(m.source.list()).toEqual([]);
    expect(m.dest.list()).toHaveLength(1);
    const moved = m.dest.list()[0];
    expect(moved.statuses()[0].state).toBe('running');
    const at = moved.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0);
    await waitUntil(() => moved.readMemory(DIRTY64.control + DIRTY64.lastValue, 8).readBigUInt64LE(0) > at + 1000n, 'dirty64 to go on there');
  });
});
