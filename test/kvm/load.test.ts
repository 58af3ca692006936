/**
 * Load against a real vcpud (issue 9; short in CI, full with `npm run soak`): LOAD_CLIENTS clients
 * (64) for LOAD_SECONDS of mixed GetState / SetState / pause / resume with zero unexpected errors,
 * p99 reported, RSS growth after warm-up bounded; then CYCLES create/delete VM cycles with the
 * process's fd count and memory back where they started.
 */
import fs from 'node:fs';
import * as grpc from '@grpc/grpc-js';
import { GUESTS } from '../guests/guests';
import { describeKvm } from '../support/kvm';
import { fdCount, rssBytes } from '../support/proc-resources';
import { call, startVcpud, type VcpudProcess } from '../support/vcpud-process';

const CLIENTS = Number(process.env.LOAD_CLIENTS ?? 64);
const SECONDS = Number(process.env.LOAD_SECONDS ?? 10);
const CYCLES = Number(process.env.LOAD_CYCLES ?? 300);

type Client = grpc.Client & Record<string, Function>;

describeKvm(`load: ${CLIENTS} clients x ${SECONDS} s, ${CYCLES} create/delete cycles`, () => {
  let d: VcpudProcess;
  beforeAll(async () => {
    d = await startVcpud();
  });
  afterAll(async () => {
    expect(d.proc.exitCode).toBeNull();
    await d.stop();
  });

  it(
    'mixed Get/Set/pause/resume from many clients: no unexpected error, bounded RSS growth',
    async () => {
      const vms = d.client('VmService');
      const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 2 });
      await call(vms, 'LoadProgram', { vmId: vm.id, image: fs.readFileSync(GUESTS.counter64.file), loadAddress: '4096' });
      await call(vms, 'RunVm', { vmId: vm.id });
      const clients = Array.from({ length: CLIENTS }, (_, i) => ({ state: d.client('VcpuStateService') as Client, vms: d.client('VmService') as Client, i }));
      const latencies: number[] = [];
      const outcomes: Record<string, number> = {};
      const unexpected: string[] = [];
      let rssAfterWarmup = 0;
      // Warm-up: V8 sizes its heap to this load over the first ~40 s on our 2-core host (heap total
      // 57 -> 101 -> 106 -> 105 MiB at 10/30/40/60 s, while heap used swings 31-59 MiB with no trend).
      // The first two thirds of the run warm up; growth after that is what a leak would show.
      const warmupEnd = Date.now() + SECONDS * 667;
      const end = Date.now() + SECONDS * 1000;
      const pid = d.proc.pid!;
      await Promise.all(
        clients.map(async (c) => {
          let n = 0;
          while (Date.now() < end) {
            const vcpuId = (c.i + n++) % 2;
            const op = (c.i + n) % 8;
            const t = process.hrtime.bigint();
            let label = '';
            try {
              if (op < 4) {
                label = 'GetState';
                await call(c.state, 'GetState', { vmId: vm.id, vcpuId });
              } else if (op < 6) {
                label = 'SetState';
                const r = await call<{ state: { debugregs: object } }>(c.state, 'GetState', { vmId: vm.id, vcpuId, sections: ['STATE_SECTION_DEBUGREGS'] });
                await call(c.state, 'SetState', { vmId: vm.id, vcpuId, state: { debugregs: r.state.debugregs } });
              } else if (op === 6) {
                label = 'PauseVcpu';
                await call(c.vms, 'PauseVcpu', { vmId: vm.id, vcpuId });
              } else {
                label = 'ResumeVcpu';
                await call(c.vms, 'ResumeVcpu', { vmId: vm.id, vcpuId });
              }
              outcomes[`${label}:OK`] = (outcomes[`${label}:OK`] ?? 0) + 1;
            } catch (e) {
              const err = e as grpc.ServiceError;
              outcomes[`${label}:${grpc.status[err.code]}`] = (outcomes[`${label}:${grpc.status[err.code]}`] ?? 0) + 1;
              // Another client resumed (or paused) the vCPU first: the documented wrong-state answer.
              const race = label === 'ResumeVcpu' && err.code === grpc.status.FAILED_PRECONDITION;
              if (!race) unexpected.push(`${label}: ${grpc.status[err.code]} ${err.details}`);
            }
            latencies.push(Number(process.hrtime.bigint() - t) / 1e6);
            if (!rssAfterWarmup && Date.now() > warmupEnd) rssAfterWarmup = rssBytes(pid);
          }
        }),
      );
      const rssEnd = rssBytes(pid);
      latencies.sort((a, b) => a - b);
      const p = (q: number) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))].toFixed(2);
      console.log(
        `load: ${latencies.length} calls in ${SECONDS} s from ${CLIENTS} clients; p50 ${p(0.5)} ms, p99 ${p(0.99)} ms; ` +
          `RSS after warm-up ${(rssAfterWarmup / 2 ** 20).toFixed(1)} MiB, at end ${(rssEnd / 2 ** 20).toFixed(1)} MiB; ${JSON.stringify(outcomes)}`,
      );
      expect(unexpected.slice(0, 5)).toEqual([]);
      // The RSS bound is judged on the full run only (npm run soak, 60 s): over a few seconds the V8
      // heap is still growing toward its working size (seen: +20% in 10 s on a loaded machine).
      if (SECONDS >= 60) expect(rssEnd).toBeLessThan(rssAfterWarmup * 1.1);
      await call(vms, 'DeleteVm', { vmId: vm.id });
    },
    (SECONDS + 120) * 1000,
  );

  it(
    'create/delete cycles leave fds and memory where they started',
    async () => {
      const vms = d.client('VmService');
      const pid = d.proc.pid!;
      const cycle = async () => {
        const { vm } = await call<{ vm: { id: string } }>(vms, 'CreateVm', { memoryBytes: String(2 << 20), vcpuCount: 2 });
        await call(vms, 'DeleteVm', { vmId: vm.id });
      };
      for (let i = 0; i < Math.min(50, CYCLES); i++) await cycle(); // warm-up: lazy caches, allocator pools
      const fds = fdCount(pid);
      const rss = rssBytes(pid);
      for (let i = 0; i < CYCLES; i++) await cycle();
      const rssAfter = rssBytes(pid);
      console.log(`cycles: ${CYCLES}; fds ${fds} -> ${fdCount(pid)}; RSS ${(rss / 2 ** 20).toFixed(1)} -> ${(rssAfter / 2 ** 20).toFixed(1)} MiB`);
      expect(fdCount(pid)).toBe(fds);
      expect(rssAfter).toBeLessThan(rss * 1.1);
    },
    30 * 60_000,
  );
});
