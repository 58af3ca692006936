/**
 * Request bytes that are not their method's message type, sent to a real vcpud: every kind of call
 * (unary, server stream, client stream, first message or later) is answered INVALID_ARGUMENT with
 * ErrorInfo reason INVALID_REQUEST and rule request.undecodable, naming the type. grpc-js alone would
 * answer INTERNAL "Error deserializing request" with no details. Nothing changes: the paused vCPU's state
 * is the same, no VM appears, and the metrics count the calls as InvalidArgument.
 */
import fs from 'node:fs';
import type http2 from 'node:http2';
import * as grpc from '@grpc/grpc-js';
import { GUESTS } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { connectRaw, encodeRequest, messagePrefix, rawCall, within } from '../support/raw-grpc';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

type Client = grpc.Client & Record<string, Function>;
const MSR_IA32_TSC = 0x10; // advances on its own: left out of the before/after comparison

/**
 * Bytes protobufjs refuses for every request type: field 1 with wire type 7, and a varint cut short.
 * (A string field whose length runs past the end is not one: protobufjs clamps it and decodes.)
 */
const UNDECODABLE: [string, Buffer][] = [
  ['invalid wire type', Buffer.from([0x0f])],
  ['truncated varint', Buffer.from([0x08, 0xff])],
];
const frame = (body: Buffer) => Buffer.concat([messagePrefix(body.length), body]);

describeKvm('undecodable requests', () => {
  let d: VcpudProcess;
  let vms: Client;
  let state: Client;
  let session: http2.ClientHttp2Session;
  let vmId: string;
  let msrIndices: number[];

  beforeAll(async () => {
    d = await startVcpud();
    vms = d.client('VmService');
    state = d.client('VcpuStateService');
    session = connectRaw(d.serving.api);
    vmId = (await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 })).vm.id;
    await call(vms, 'LoadProgram', { vmId, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: '4096' });
    await call(vms, 'RunVm', { vmId });
    await new Promise((r) => setTimeout(r, 50));
    await call(vms, 'PauseVm', { vmId });
    msrIndices = (await call<{ msrIndices: number[] }>(state, 'GetCapabilities', {})).msrIndices.filter((i) => i !== MSR_IA32_TSC);
  }, 60_000);
  afterAll(async () => {
    session?.close();
    expect(d.proc.exitCode).toBeNull();
    await d.stop();
  });

  const vcpuState = async () => (await call<{ state: unknown }>(state, 'GetState', { vmId, vcpuId: 0, msrIndices })).state;
  const vmCount = async () => (await call<{ vms: unknown[] }>(vms, 'ListVms', {})).vms.length;
  const handled = async (method: string) => {
    const m = new RegExp(`grpc_server_handled_total\\{[^}]*grpc_method="${method}",grpc_code="InvalidArgument"} (\\d+)`).exec(await d.scrape());
    return Number(m?.[1] ?? 0);
  };

  const cases: [string, string, string, (bad: Buffer) => Buffer][] = [
    ['VcpuStateService', 'SetState', 'SetStateRequest', frame],
    ['VcpuStateService', 'GetState', 'GetStateRequest', frame],
    ['VmService', 'CreateVm', 'CreateVmRequest', frame],
    ['VmService', 'ReadMemory', 'ReadMemoryRequest', frame], // server stream
    ['SnapshotService', 'CreateSnapshot', 'CreateSnapshotRequest', frame], // server stream
    ['MigrationService', 'PrepareIncomingMigration', 'PrepareIncomingMigrationRequest', frame],
    ['SnapshotService', 'RestoreSnapshotStream', 'RestoreSnapshotStreamRequest', frame], // client stream, first message
    [
      'SnapshotService',
      'RestoreSnapshotStream',
      'RestoreSnapshotStreamRequest',
      (bad) => Buffer.concat([frame(encodeRequest('SnapshotService', 'RestoreSnapshotStream', { options: { vmName: 'never' } })), frame(bad)]), // a later message
    ],
  ];

  it.each(cases)('%s/%s (%s): INVALID_ARGUMENT, reason INVALID_REQUEST, nothing changed', async (service, method, type, body) => {
    const [before, vmsBefore, countedBefore] = [await vcpuState(), await vmCount(), await handled(method)];
    for (const [what, bad] of UNDECODABLE) {
      const status = await within(rawCall(session, service, method, body(bad)).status, 10_000, { code: -2, details: 'no status in 10 s' });
      expect({ what, ...status }).toEqual({
        what,
        code: grpc.status.INVALID_ARGUMENT,
        details: expect.stringContaining(`not a valid ${type}: `),
        reason: 'INVALID_REQUEST',
        limit: undefined,
        rule: 'request.undecodable',
      });
    }
    expect(await vcpuState()).toEqual(before);
    expect(await vmCount()).toBe(vmsBefore);
    expect(await handled(method)).toBe(countedBefore + UNDECODABLE.length);
  });

  it('a valid request on the same connection still works', async () => {
    const status = await rawCall(session, 'VcpuStateService', 'GetState', frame(encodeRequest('VcpuStateService', 'GetState', { vmId, vcpuId: 0 }))).status;
    expect(status.code).toBe(grpc.status.OK);
  });
});
