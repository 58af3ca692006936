/**
 * GetState (all sections, one paused vCPU) over the Unix socket of a real vcpud process: p50 / p99
 * latency and throughput, against an empty grpc-js unary call (a trivial handler in its own process,
 * same socket kind) and the raw ioctl sum (bench/c/ioctl_floor), all in the same run.
 * Target: p50 <= 1.3 x (empty-call p50 + raw ioctl sum).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { call, startVcpud } from '../test/support/vcpud-process';
import { cFloor, guestBin, table } from './floors';

const N = Number(process.env.BENCH_CALLS ?? 2000);
const SECTION_IOCTLS = [
  'KVM_GET_MP_STATE', 'KVM_GET_VCPU_EVENTS', 'KVM_GET_REGS', 'KVM_GET_FPU', 'KVM_GET_XSAVE2', 'KVM_GET_XCRS', 'KVM_GET_SREGS',
  'KVM_GET_SREGS2', 'KVM_GET_LAPIC', 'KVM_GET_MSRS', 'KVM_GET_DEBUGREGS', 'KVM_GET_CPUID2', 'KVM_GET_TSC_KHZ',
];

/** The empty-call floor: grpc-js serving one no-op unary method on a Unix socket, in its own process. */
const EMPTY_SERVER = `
const grpc = require('@grpc/grpc-js');
const s = new grpc.Server();
const id = (x) => x;
s.addService({ Empty: { path: '/bench.Empty/Call', requestStream: false, responseStream: false,
  requestSerialize: id, requestDeserialize: id, responseSerialize: id, responseDeserialize: id } },
  { Empty: (call, cb) => cb(null, Buffer.alloc(0)) });
s.bindAsync('unix:' + process.argv[1], grpc.ServerCredentials.createInsecure(), () => console.log('ready'));
`;

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))];
}

async function timeCalls(fn: () => Promise<unknown>, n: number): Promise<{ p50: number; p99: number; perSecond: number }> {
  for (let i = 0; i < Math.min(200, n); i++) await fn(); // warm-up
  const lat: number[] = [];
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const t = process.hrtime.bigint();
    await fn();
    lat.push(Number(process.hrtime.bigint() - t) / 1000);
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { p50: percentile(lat, 50), p99: percentile(lat, 99), perSecond: n / seconds };
}

async function emptyFloor(): Promise<{ p50: number; p99: number; perSecond: number }> {
  const sock = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'bench-empty-')), 'e.sock');
  const proc = spawn(process.execPath, ['-e', EMPTY_SERVER, sock], { stdio: ['ignore', 'pipe', 'inherit'], cwd: path.join(__dirname, '..', '..') });
  await new Promise((r) => proc.stdout!.once('data', r));
  const id = (x: Buffer) => x;
  const client = new grpc.Client(`unix:${sock}`, grpc.credentials.createInsecure());
  const once = () =>
    new Promise((resolve, reject) => client.makeUnaryRequest('/bench.Empty/Call', id, id, Buffer.alloc(0), (e, r) => (e ? reject(e) : resolve(r))));
  const r = await timeCalls(once, N);
  client.close();
  proc.kill();
  return r;
}

async function main(): Promise<void> {
  const floor = cFloor('ioctl_floor', ['5000', guestBin('counter64')]) as Record<string, number>;
  const rawSumUs = SECTION_IOCTLS.reduce((a, k) => a + (floor[k] ?? 0), 0) / 1000;
  const empty = await emptyFloor();

  const d = await startVcpud();
  try {
    const vms = d.client('VmService');
    const state = d.client('VcpuStateService');
    const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 1 });
    await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(guestBin('counter64')), loadAddress: '4096' });
    await call(vms, 'RunVm', { vmId: vm.id });
    await new Promise((r) => setTimeout(r, 50));
    await call(vms, 'PauseVm', { vmId: vm.id });
    const req = { vmId: vm.id, vcpuId: 0 };
    const get = await timeCalls(() => call(state, 'GetState', req), N);
    const target = 1.3 * (empty.p50 + rawSumUs);
    console.log(`GetState, all 13 sections of one paused vCPU, over the Unix socket (${N} sequential calls; microseconds)\n`);
    console.log(
      table(
        ['measure', 'p50 us', 'p99 us', 'calls/s'],
        [
          ['raw ioctl sum (C, 13 GET ioctls)', rawSumUs, rawSumUs, 1e6 / rawSumUs],
          ['empty grpc-js unary call (UDS)', empty.p50, empty.p99, empty.perSecond],
          ['GetState through vcpud', get.p50, get.p99, get.perSecond],
        ],
      ),
    );
    console.log(
      `\nratio p50 / (empty p50 + raw sum) = ${(get.p50 / (empty.p50 + rawSumUs)).toFixed(2)} (target <= 1.3, i.e. p50 <= ${target.toFixed(0)} us): ${get.p50 <= target ? 'met' : 'NOT met'}`,
    );
  } finally {
    await d.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
