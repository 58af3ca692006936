/**
 * What every vcpuctl command gets: its parsed options and positionals, the output streams, and a
 * lazily connected client. Commands print one JSON document on stdout with --json.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Options, CommandSpec, OptionSpec } from './args';
import type { VcpudClient } from './client';
import { toJson } from './format';
import { readInputFile } from './input-file';

/** Where output goes: process.stdout/stderr, or collectors in tests. */
export interface Io {
  stdout: { write(chunk: string | Uint8Array): unknown };
  stderr: { write(chunk: string | Uint8Array): unknown };
  /** Environment for defaults ($VCPUD_ADDR, $XDG_RUNTIME_DIR); process.env when absent. */
  env?: NodeJS.ProcessEnv;
  /** Directory relative file names (and relative socket paths) resolve against; process.cwd() when absent. */
  cwd?: string;
}

export interface Context {
  io: Io;
  json: boolean;
  options: Options;
  positionals: string[];
  cwd: string;
  /** The client, connected on first use (closed by run()). */
  client(): VcpudClient;
  /** A line (or lines) on stdout. */
  print(text: string): void;
  /** A line on stderr. */
  note(text: string): void;
  /** The one JSON document of --json on stdout. */
  printJson(value: unknown): void;
  /** Reads a file named on the command line (relative to cwd). */
  readFile(flag: string, file: string): Buffer;
  /** Writes a file named on the command line (relative to cwd). */
  writeFile(file: string, data: Uint8Array): string;
}

export interface Command extends CommandSpec {
  // biome-ignore lint/suspicious/noConfusingVoidType: a command that only prints resolves to nothing (exit 0); async bodies without a return are Promise<void>
  run(ctx: Context): Promise<number | void>;
}

export function makeContext(io: Io, json: boolean, options: Options, positionals: string[], client: () => VcpudClient): Context {
  const cwd = io.cwd ?? process.cwd();
  return {
    io,
    json,
    options,
    positionals,
    cwd,
    client,
    print: (text) => void io.stdout.write(text.endsWith('\n') ? text : `${text}\n`),
    note: (text) => void io.stderr.write(text.endsWith('\n') ? text : `${text}\n`),
    printJson: (value) => void io.stdout.write(`${toJson(value)}\n`),
    readFile: (flag, file) => readInputFile(flag, file, path.resolve(cwd, file)),
    writeFile(file, data) {
      const full = path.resolve(cwd, file);
      fs.writeFileSync(full, data);
      return full;
    },
  };
}

// Options several commands share.
export const VCPU_OPTION: OptionSpec = { name: 'vcpu', type: 'int', arg: 'N', help: 'the vCPU index (default 0)' };
export const NO_IMPLICIT_PAUSE: OptionSpec = {
  name: 'no-implicit-pause',
  type: 'bool',
  help: 'fail with FAILED_PRECONDITION instead of pausing a RUNNING vCPU for the call',
};

export const vcpuOf = (ctx: Context) => ctx.options.int('vcpu') ?? 0;
