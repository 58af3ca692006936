/**
 * The node side of scripts/h2load.sh (h2load driving GetState over plaintext TCP h2c):
 *
 *   prepare --target HOST:PORT --metrics HOST:PORT --dir DIR [--vm ID] [--vcpu N] [--section S]
 *       creates a paused counter64 VM unless --vm is given (prints its id), writes DIR/body.bin
 *       (the GetState request in gRPC framing, for h2load -d) and DIR/before.json (the server's
 *       grpc_server_handled_total for GetState, by code)
 *   check --metrics HOST:PORT --dir DIR
 *       reads h2load's output from DIR/h2load.txt and compares its success count with the server's
 *       delta since before.json: h2load calls any HTTP 200 a success, even with grpc-status != 0,
 *       so only the server knows how many GetState calls really succeeded. Exit 1 on a mismatch.
 */
import fs from 'node:fs';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { Options, UsageError, optionLines, parseCommandLine, validateCommandLine, type CommandSpec } from '../src/cli/vcpuctl/args';
import { vcpudProto } from '../src/api/proto';
import { pausedCounterVm, table } from './floors';
import { GET_STATE_PATH, getStateRequest, grpcFrame, handledDelta, scrapeHandled } from './loadgen';

export interface H2loadCounts {
  total: number;
  done: number;
  succeeded: number;
  failed: number;
  errored: number;
  timeout: number;
  reqPerSecond: number;
}

/** The counts of h2load's summary ("requests: N total, N started, N done, N succeeded, ..."). */
export function parseH2loadOutput(text: string): H2loadCounts {
  const req = /requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout/.exec(text);
  if (!req) throw new Error('no "requests: ..." summary line in the h2load output');
  const rate = /finished in [\d.]+\w+, ([\d.]+) req\/s/.exec(text);
  const [total, , done, succeeded, failed, errored, timeout] = req.slice(1).map(Number);
  return { total, done, succeeded, failed, errored, timeout, reqPerSecond: rate ? Number(rate[1]) : NaN };
}

export interface CrossCheck {
  h2load: H2loadCounts;
  server: Record<string, number>;
  serverCalls: number;
  agree: boolean;
}

/** Agreement: every request h2load finished was handled by the server, and its successes were gRPC OKs. */
export function crossCheck(h2load: H2loadCounts, server: Record<string, number>): CrossCheck {
  const serverCalls = Object.values(server).reduce((a, b) => a + b, 0);
  return { h2load, server, serverCalls, agree: serverCalls === h2load.done && (server.OK ?? 0) === h2load.succeeded };
}

export function formatCrossCheck(c: CrossCheck): string {
  const h = c.h2load;
  const codes =
    Object.entries(c.server)
      .map(([k, n]) => `${k} ${n}`)
      .join(', ') || '(none)';
  return [
    table(
      ['count of GetState', 'calls', 'detail'],
      [
        [
          'h2load',
          String(h.done),
          `${h.succeeded} succeeded (HTTP 2xx), ${h.failed} failed, ${h.errored} errored, ${h.timeout} timeout; ${h.reqPerSecond.toFixed(0)} req/s`,
        ],
        ['server grpc_server_handled_total delta', String(c.serverCalls), codes],
      ],
    ),
    c.agree
      ? `cross-check: agree (h2load succeeded ${h.succeeded} = server OK ${c.server.OK ?? 0}, ${c.serverCalls} handled)`
      : `cross-check: MISMATCH (h2load succeeded ${h.succeeded}, done ${h.done}; server OK ${c.server.OK ?? 0}, handled ${c.serverCalls})`,
  ].join('\n');
}

const COMMANDS: CommandSpec[] = [
  {
    path: ['prepare'],
    summary: 'create the VM, write DIR/body.bin and DIR/before.json',
    positionals: [],
    options: [
      { name: 'target', type: 'string', arg: 'HOST:PORT', help: 'vcpud serving plaintext h2c (--insecure on loopback)', required: true },
      { name: 'metrics', type: 'string', arg: 'HOST:PORT', help: "vcpud's Prometheus endpoint", required: true },
      { name: 'dir', type: 'string', arg: 'DIR', help: 'where to write the files', required: true },
      { name: 'vm', type: 'string', arg: 'ID', help: 'use this VM instead of creating one' },
      { name: 'vcpu', type: 'int', arg: 'N', help: 'the vCPU (default 0)' },
      { name: 'section', type: 'string', repeat: true, arg: 'NAME', help: 'a section to read (default every readable one)' },
    ],
  },
  {
    path: ['check'],
    summary: "compare DIR/h2load.txt with the server's delta since DIR/before.json",
    positionals: [],
    options: [
      { name: 'metrics', type: 'string', arg: 'HOST:PORT', help: "vcpud's Prometheus endpoint", required: true },
      { name: 'dir', type: 'string', arg: 'DIR', help: 'where prepare wrote its files and h2load.txt is', required: true },
    ],
  },
];

async function prepare(o: Options): Promise<void> {
  const dir = o.string('dir')!;
  let vmId = o.string('vm');
  if (!vmId) {
    const Ctor = vcpudProto().vcpud.v1.VmService as unknown as grpc.ServiceClientConstructor;
    const vms = new Ctor(o.string('target')!, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
    try {
      vmId = (await pausedCounterVm(vms)).id;
    } finally {
      vms.close();
    }
  }
  fs.writeFileSync(path.join(dir, 'body.bin'), grpcFrame(getStateRequest(vmId, o.int('vcpu') ?? 0, o.strings('section'))));
  fs.writeFileSync(path.join(dir, 'before.json'), JSON.stringify(await scrapeHandled(o.string('metrics')!, GET_STATE_PATH)));
  console.log(vmId);
}

async function check(o: Options): Promise<boolean> {
  const dir = o.string('dir')!;
  const h2load = parseH2loadOutput(fs.readFileSync(path.join(dir, 'h2load.txt'), 'utf8'));
  const before = JSON.parse(fs.readFileSync(path.join(dir, 'before.json'), 'utf8')) as Record<string, number>;
  const c = crossCheck(h2load, handledDelta(before, await scrapeHandled(o.string('metrics')!, GET_STATE_PATH)));
  console.log(formatCrossCheck(c));
  return c.agree;
}

function help(): string {
  return COMMANDS.map((c) => [`usage: h2load ${c.path[0]} ...  ${c.summary}`, ...optionLines(c.options)].join('\n')).join('\n\n');
}

async function main(argv: string[]): Promise<number> {
  try {
    const parsed = parseCommandLine(argv, [], COMMANDS);
    if (parsed.help || !parsed.command) {
      console.log(help());
      return parsed.help ? 0 : 2;
    }
    validateCommandLine(parsed);
    const o = new Options(parsed.options);
    if (parsed.command.path[0] === 'prepare') await prepare(o);
    else if (!(await check(o))) return 1;
    return 0;
  } catch (e) {
    console.error(`h2load helper: ${(e as Error).message}`);
    return e instanceof UsageError ? 2 : 1;
  }
}

if (require.main === module) main(process.argv.slice(2)).then((code) => (process.exitCode = code));
