#!/usr/bin/env node
/**
 * vcpuctl: the operator's CLI for vcpud. Human-readable tables by default, `--json` for one JSON
 * document on stdout. Exit codes: 0 ok, 1 the server (or the connection) returned an error,
 * 2 a usage error (unknown command or option, bad number, missing argument or input file).
 *
 *   vcpuctl [--server ADDR] [--json] [--timeout SECONDS] COMMAND ...   (vcpuctl --help lists them)
 */
import { Options, UsageError, commandHelp, optionLines, parseCommandLine, subcommandsOf, validateCommandLine, type OptionSpec } from './vcpuctl/args';
import { DEFAULT_SOCKET_RULE } from '../address';
import { SIZE_SYNTAX } from '../size';
import { VcpudClient, defaultServer, explainConnectionFailure } from './vcpuctl/client';
import { makeContext, type Command, type Io } from './vcpuctl/command';
import { capsCommands } from './vcpuctl/commands/caps';
import { consoleCommands } from './vcpuctl/commands/console';
import { memCommands } from './vcpuctl/commands/mem';
import { nestedCommands } from './vcpuctl/commands/nested';
import { programCommands } from './vcpuctl/commands/program';
import { snapshotCommands } from './vcpuctl/commands/snapshot';
import { stateCommands } from './vcpuctl/commands/state';
import { vmCommands } from './vcpuctl/commands/vm';
import { errorJson, formatError } from './vcpuctl/format';

export type { Io } from './vcpuctl/command';

export const EXIT_OK = 0;
export const EXIT_SERVER_ERROR = 1;
export const EXIT_USAGE = 2;

export const GLOBAL_OPTIONS: OptionSpec[] = [
  {
    name: 'server',
    type: 'string',
    arg: 'ADDR',
    help: `unix:PATH, a socket path (/abs, ./rel) or host:port (default: $VCPUD_ADDR, else ${DEFAULT_SOCKET_RULE}; a root vcpud's socket if that one is missing)`,
  },
  { name: 'tls-ca', type: 'string', arg: 'FILE', help: 'CA certificate(s) to verify the server with (TCP)' },
  { name: 'tls-cert', type: 'string', arg: 'FILE', help: 'client certificate chain for mTLS (TCP)' },
  { name: 'tls-key', type: 'string', arg: 'FILE', help: 'client private key for mTLS (TCP)' },
  { name: 'tls-server-name', type: 'string', arg: 'NAME', help: 'name to verify the server certificate against (default: the host)' },
  { name: 'insecure', type: 'bool', help: 'plaintext TCP (the server must allow it)' },
  { name: 'timeout', type: 'seconds', arg: 'SECONDS', help: 'deadline of each call (default 30; 0 = none)' },
  { name: 'json', type: 'bool', help: 'machine output: one JSON document on stdout' },
  { name: 'help', type: 'bool', help: 'show help (also after a command)' },
];

export const COMMANDS: Command[] = [
  ...capsCommands,
  ...vmCommands,
  ...programCommands,
  ...stateCommands,
  ...nestedCommands,
  ...consoleCommands,
  ...memCommands,
  ...snapshotCommands,
];

export const DEFAULT_TIMEOUT_SECONDS = 30;

/** The top-level help, or a group's (`vcpuctl vm --help`). */
export function topHelp(words: string[] = []): string {
  const cmds = COMMANDS.filter((c) => words.every((w, i) => c.path[i] === w));
  const usage = (c: Command) => ['vcpuctl', ...c.path, ...c.positionals].join(' ');
  const width = Math.max(...cmds.map((c) => usage(c).length)) + 2;
  return [
    `usage: vcpuctl [global options] ${words.length ? `${words.join(' ')} ` : ''}COMMAND [args] [options]`,
    '',
    'commands:',
    ...cmds.map((c) => `  ${usage(c).padEnd(width)}${c.summary}`),
    '',
    'global options:',
    ...optionLines(GLOBAL_OPTIONS),
    '',
    `Numbers: decimal or 0x hex. Sizes: ${SIZE_SYNTAX}. 'vcpuctl COMMAND --help' for a command's options.`,
    'Exit codes: 0 ok, 1 server error, 2 usage error.',
  ].join('\n');
}

function usageFailure(io: Io, e: UsageError, json: boolean): number {
  io.stderr.write(`${formatError(e)}\n`);
  io.stderr.write(`run 'vcpuctl ${e.command ? `${e.command} ` : ''}--help' for usage\n`);
  if (json) io.stdout.write(`${JSON.stringify(errorJson(e), null, 2)}\n`);
  return EXIT_USAGE;
}

/**
 * Runs vcpuctl with `argv` (without node and the script) writing to `io`; resolves to the exit code.
 * Never throws: every failure is printed and turned into exit code 1 or 2.
 */
export async function run(argv: string[], io: Io): Promise<number> {
  const json = argv.includes('--json') || argv.includes('--json=true');
  let parsed: ReturnType<typeof parseCommandLine<(typeof COMMANDS)[number]>>;
  try {
    parsed = parseCommandLine(argv, GLOBAL_OPTIONS, COMMANDS);
  } catch (e) {
    if (e instanceof UsageError) return usageFailure(io, e, json);
    throw e;
  }
  const command = parsed.command;
  if (parsed.help || parsed.options.help === true) {
    io.stdout.write(`${command ? commandHelp(command, GLOBAL_OPTIONS) : topHelp(parsed.words)}\n`);
    return EXIT_OK;
  }
  const opts = new Options(parsed.options);
  if (!command) {
    if (!parsed.words.length) {
      io.stderr.write(`${topHelp()}\n`);
      return usageFailure(io, new UsageError('missing command'), json);
    }
    const subs = subcommandsOf(COMMANDS, parsed.words).join(', ');
    return usageFailure(io, new UsageError(`'${parsed.words.join(' ')}' needs a subcommand (${subs})`, parsed.words.join(' ')), json);
  }

  let client: VcpudClient | undefined;
  try {
    validateCommandLine(parsed);
    const timeout = opts.has('timeout') ? (opts.values.timeout as number) : DEFAULT_TIMEOUT_SECONDS;
    const connect = () => {
      const server = opts.has('server') ? { address: opts.string('server') as string, source: 'from --server' } : defaultServer(io.env ?? process.env);
      client ??= new VcpudClient({
        server: server.address,
        serverSource: server.source,
        tlsCa: opts.string('tls-ca'),
        tlsCert: opts.string('tls-cert'),
        tlsKey: opts.string('tls-key'),
        tlsServerName: opts.string('tls-server-name'),
        insecure: opts.bool('insecure'),
        timeoutMs: Math.round(timeout * 1000),
        cwd: io.cwd,
      });
      return client;
    };
    const ctx = makeContext(io, opts.bool('json'), opts, parsed.positionals, connect);
    const code = await command.run(ctx);
    return code ?? EXIT_OK;
  } catch (e) {
    if (e instanceof UsageError) return usageFailure(io, e.command ? e : new UsageError(e.message, command.path.join(' ')), json);
    const error = client ? explainConnectionFailure(e, client) : e;
    io.stderr.write(`${formatError(error)}\n`);
    if (json) io.stdout.write(`${JSON.stringify(errorJson(error), null, 2)}\n`);
    return EXIT_SERVER_ERROR;
  } finally {
    client?.close();
  }
}

if (require.main === module) {
  // grpc-js passes an IP address as the TLS server name (DEP0123): not the operator's concern
  process.noDeprecation = true;
  process.stdout.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code === 'EPIPE') process.exit(EXIT_OK); // `vcpuctl ... | head`
    throw e;
  });
  // `vcpuctl ... 2>&1 >/dev/null | head`: diagnostics nobody reads any more; the command itself goes on.
  process.stderr.on('error', (e: NodeJS.ErrnoException) => {
    if (e.code !== 'EPIPE') throw e;
  });
  run(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr }).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`vcpuctl: internal error: ${(e as Error)?.stack ?? String(e)}\n`);
      process.exitCode = EXIT_SERVER_ERROR;
    },
  );
}
