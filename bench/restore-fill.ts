/**
 * What a streamed restore spends putting received bytes into fresh guest memory (no gRPC): one
 * GuestMemory.writePages of BENCH_FILL_MIB random bytes, in 4 MiB chunks of 1 MiB pieces cut as a
 * stream's messages are, into new anonymous memory, plain (MADV_POPULATE_WRITE, copy, CRC-32C) and
 * `exclusive` (UFFDIO_COPY, CRC-32C), alternating for BENCH_FILL_ROUNDS rounds. Reported: the
 * process's CPU time per GiB (the pool threads' included) and minor faults, medians.
 *
 * Fresh memory costs what the host makes it cost: on this VM (virtio_balloon free page reporting),
 * pages the guest kernel reported to the host cost a host fault on first touch, whichever way they
 * are filled (BENCHMARKS.md, "RestoreSnapshotStream: where the time goes").
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import { native } from '../src/ffi/native';
import { fatal, knob, median, MiB, table } from './floors';

const FILL = Number(knob('BENCH_FILL_MIB', '1024', 'restore-fill: bytes written per fill in MiB')) * MiB;
const ROUNDS = Number(knob('BENCH_FILL_ROUNDS', '5', 'restore-fill: rounds, each both ways'));
const PAGE = 4096;
const CHUNK = 4 * MiB; // a snapshot memory chunk (CHUNK_PAGES pages)
const MESSAGE = MiB - 6; // a RestoreSnapshotStream data message less a record header: pages cut across pieces

const minorFaults = () => Number(fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ')[7]);
const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

async function fill(data: Buffer, exclusive: boolean): Promise<{ cpuMsPerGiB: number; faults: number }> {
  const mem = new native.GuestMemory(FILL);
  const bitmap = Buffer.alloc(CHUNK / PAGE / 8, 0xff);
  const [c0, f0] = [cpuMs(), minorFaults()];
  let at = 0;
  const pending: Promise<number>[] = [];
  for (let gpa = 0; gpa < FILL; gpa += CHUNK) {
    const pieces: Buffer[] = [];
    for (let left = CHUNK; left > 0; ) {
      const n = Math.min(left, MESSAGE - (at % MESSAGE), data.length - (at % data.length));
      pieces.push(data.subarray(at % data.length, (at % data.length) + n));
      at += n;
      left -= n;
    }
    pending.push(mem.writePages(gpa, CHUNK / PAGE, bitmap, pieces, exclusive));
    if (pending.length >= 2) await pending.shift(); // two chunks in flight, as the restore keeps them
  }
  await Promise.all(pending);
  const result = { cpuMsPerGiB: ((cpuMs() - c0) * (1 << 30)) / FILL, faults: minorFaults() - f0 };
  mem.release();
  return result;
}

async function main(): Promise<void> {
  const data = crypto.randomBytes(64 * MiB);
  const runs = { plain: [] as { cpuMsPerGiB: number; faults: number }[], exclusive: [] as { cpuMsPerGiB: number; faults: number }[] };
  for (let round = 0; round < ROUNDS; round++) {
    const order: (keyof typeof runs)[] = round % 2 ? ['exclusive', 'plain'] : ['plain', 'exclusive'];
    for (const way of order) runs[way].push(await fill(data, way === 'exclusive'));
    console.error(`round ${round}: plain ${runs.plain[round].cpuMsPerGiB.toFixed(0)} exclusive ${runs.exclusive[round].cpuMsPerGiB.toFixed(0)} ms CPU per GiB`);
  }
  const row = (name: string, r: { cpuMsPerGiB: number; faults: number }[]) => [
    name,
    median(r.map((x) => x.cpuMsPerGiB)).toFixed(0),
    r.map((x) => x.cpuMsPerGiB.toFixed(0)).join(' '),
    String(Math.round(median(r.map((x) => x.faults)))),
  ];
  console.log(`${FILL / MiB} MiB into fresh anonymous memory in ${CHUNK / MiB} MiB chunks, ${ROUNDS} alternating rounds\n`);
  console.log(
    table(
      ['writePages', 'CPU ms per GiB (median)', 'each round', 'minor faults'],
      [row('plain: populate, copy, CRC-32C', runs.plain), row('exclusive: UFFDIO_COPY, CRC-32C', runs.exclusive)],
    ),
  );
}

if (require.main === module) main().catch(fatal);
