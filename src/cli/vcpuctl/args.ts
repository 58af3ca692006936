/**
 * A tiny command-line parser for vcpuctl: a tree of command words (`vm create`, `state get`), long
 * options (`--name value`, `--name=value`, booleans without a value, repeatable ones collected in
 * order), positionals, `--` to end options, and `-h`/`--help` anywhere. Values are converted while
 * parsing, so a bad number is a usage error (exit 2) before anything is sent to the server.
 */
import { parseByteSize, parseInteger } from '../../size';

/** A mistake on the command line: printed with a hint and exit code 2. */
export class UsageError extends Error {
  constructor(
    message: string,
    /** The command whose usage applies, e.g. "vm create"; empty for the top level. */
    readonly command = '',
  ) {
    super(message);
    this.name = 'UsageError';
  }
}

/**
 * How an option's value is read:
 * - `string`  as given
 * - `int`     a non-negative integer (decimal or 0x hex) that fits a JS number: counts, ids
 * - `u64`     a non-negative integer up to 2^64-1 as a bigint: addresses
 * - `size`    a byte size up to 2^64-1 in vcpud's syntax (src/size.ts): 64Mi, 4GiB, 1G, 0x1000
 * - `seconds` a non-negative decimal number, fractions allowed
 * - `bool`    a flag without a value (`--flag=true|false` also accepted)
 */
export type OptionType = 'string' | 'int' | 'u64' | 'size' | 'seconds' | 'bool';

export interface OptionSpec {
  /** Long name without the dashes, e.g. "load-address". */
  name: string;
  type: OptionType;
  /** Collect every occurrence into an array (in order) instead of keeping the last one. */
  repeat?: boolean;
  /** Placeholder in help, e.g. "ADDR". */
  arg?: string;
  help: string;
  required?: boolean;
}

export type OptionValue = string | number | bigint | boolean;

export interface CommandSpec {
  /** The command words, e.g. ["vm", "create"]. */
  path: string[];
  summary: string;
  /** Positional arguments in order, e.g. ["VM", "FILE"]; required unless written "[NAME]" (optional ones last). */
  positionals: string[];
  options: OptionSpec[];
  /** Extra help text printed after the options. */
  notes?: string;
}

export interface ParsedCommandLine<C extends CommandSpec = CommandSpec> {
  /** The command resolved, or undefined when argv named none (or only a group such as `vm`). */
  command?: C;
  /** The command words seen so far (a group when `command` is undefined). */
  words: string[];
  /** Option values by name; repeatable ones are arrays. */
  options: Record<string, OptionValue | OptionValue[]>;
  positionals: string[];
  help: boolean;
}

const U64_MAX = (1n << 64n) - 1n;
/**
 * Parses an integer: decimal, 0x hex, 0o octal or 0b binary, `_` separators allowed (src/size.ts).
 * Throws a plain Error describing the problem (the caller names the option).
 */
export function parseNumber(text: string, opts: { allowNegative?: boolean } = {}): bigint {
  const negative = opts.allowNegative === true && text.trim().startsWith('-');
  const value = parseInteger(negative ? text.trim().slice(1) : text);
  if (value === undefined) throw new Error(`'${text}' is not a number`);
  return negative ? -value : value;
}

function atMost(text: string, v: bigint, max: bigint): bigint {
  if (v > max) throw new Error(`'${text}' is too large (at most 0x${max.toString(16)})`);
  return v;
}

/** parseNumber checked against [0, max]. */
export function parseUnsigned(text: string, max: bigint): bigint {
  return atMost(text, parseNumber(text), max);
}

/** A size in bytes, as vcpud reads its size flags ("64Mi", "1G", "4096", "0x1000"), as a bigint. */
export function parseSize(text: string): bigint {
  return atMost(text, parseByteSize(text), U64_MAX);
}

function convert(spec: OptionSpec, raw: string, command = ''): OptionValue {
  const where = `--${spec.name}`;
  try {
    switch (spec.type) {
      case 'string':
        return raw;
      case 'bool':
        if (/^(true|yes|1)$/i.test(raw)) return true;
        if (/^(false|no|0)$/i.test(raw)) return false;
        throw new Error(`'${raw}' is not a boolean`);
      case 'int':
        return Number(parseUnsigned(raw, BigInt(Number.MAX_SAFE_INTEGER)));
      case 'u64':
        return parseUnsigned(raw, U64_MAX);
      case 'size':
        return parseSize(raw);
      case 'seconds': {
        const n = Number(raw);
        if (raw.trim() === '' || !Number.isFinite(n) || n < 0) throw new Error(`'${raw}' is not a number of seconds`);
        return n;
      }
    }
  } catch (e) {
    throw new UsageError(`bad value for ${where}: ${(e as Error).message}`, command);
  }
}

/** A node of the command tree: a group word with children, or a leaf command. */
interface TreeNode<C> {
  children: Map<string, TreeNode<C>>;
  command?: C;
}

function buildTree<C extends CommandSpec>(commands: readonly C[]): TreeNode<C> {
  const root: TreeNode<C> = { children: new Map() };
  for (const c of commands) {
    let node = root;
    for (const w of c.path) {
      let next = node.children.get(w);
      if (!next) node.children.set(w, (next = { children: new Map() }));
      node = next;
    }
    node.command = c;
  }
  return root;
}

/** The subcommand words under a group, for messages. */
export function subcommandsOf(commands: readonly CommandSpec[], words: string[]): string[] {
  const names = new Set<string>();
  for (const c of commands) if (c.path.length > words.length && words.every((w, i) => c.path[i] === w)) names.add(c.path[words.length]);
  return [...names];
}

/**
 * Parses argv against global options and a command table. Global options may appear anywhere;
 * a command's own options only after its words. Errors are UsageErrors.
 */
export function parseCommandLine<C extends CommandSpec>(
  argv: readonly string[],
  globalOptions: readonly OptionSpec[],
  commands: readonly C[],
): ParsedCommandLine<C> {
  const tree = buildTree(commands);
  let node = tree;
  const words: string[] = [];
  const result: ParsedCommandLine<C> = { words, options: {}, positionals: [], help: false };
  const commandName = () => words.join(' ');

  const lookup = (name: string): OptionSpec | undefined => globalOptions.find((o) => o.name === name) ?? node.command?.options.find((o) => o.name === name);

  const store = (spec: OptionSpec, value: OptionValue) => {
    if (spec.repeat) {
      const list = (result.options[spec.name] as OptionValue[] | undefined) ?? [];
      list.push(value);
      result.options[spec.name] = list;
    } else {
      result.options[spec.name] = value;
    }
  };

  const positional = (word: string) => {
    if (!node.command) {
      const next = node.children.get(word);
      if (!next) {
        const where = words.length ? `'${commandName()}' has no subcommand` : 'unknown command';
        const choices = [...node.children.keys()].join(', ');
        throw new UsageError(`${where} '${word}' (expected one of: ${choices})`, commandName());
      }
      node = next;
      words.push(word);
      if (node.command) result.command = node.command;
      return;
    }
    result.positionals.push(word);
  };

  let endOfOptions = false;
  for (let i = 0; i < argv.length; i++) {
    const token = argv[i];
    if (endOfOptions) {
      positional(token);
      continue;
    }
    if (token === '--') {
      endOfOptions = true;
      continue;
    }
    if (token === '-h' || token === '--help') {
      result.help = true;
      continue;
    }
    if (token.startsWith('--')) {
      const eq = token.indexOf('=');
      const name = token.slice(2, eq < 0 ? undefined : eq);
      const spec = lookup(name);
      if (!spec) {
        const elsewhere = !node.command && commands.some((c) => c.options.some((o) => o.name === name));
        const hint = elsewhere ? ' (command options go after the command words)' : '';
        throw new UsageError(`unknown option --${name}${hint}`, commandName());
      }
      if (spec.type === 'bool') {
        store(spec, eq < 0 ? true : convert(spec, token.slice(eq + 1), commandName()));
        continue;
      }
      let raw: string;
      if (eq >= 0) raw = token.slice(eq + 1);
      else {
        if (i + 1 >= argv.length) throw new UsageError(`option --${name} needs a value${spec.arg ? ` (${spec.arg})` : ''}`, commandName());
        raw = argv[++i];
      }
      store(spec, convert(spec, raw, commandName()));
      continue;
    }
    if (token.length > 1 && token.startsWith('-') && !/^-\d/.test(token))
      throw new UsageError(`unknown option ${token} (options are long: --name)`, commandName());
    positional(token);
  }
  return result;
}

/** Checks positionals and required options of a resolved command. */
export function validateCommandLine(parsed: ParsedCommandLine): void {
  const c = parsed.command;
  if (!c) return;
  const name = c.path.join(' ');
  const want = c.positionals;
  const required = want.filter((p) => !p.startsWith('[')).length; // "[NAME]": optional, last
  if (parsed.positionals.length < required) throw new UsageError(`'${name}' needs ${want.slice(parsed.positionals.length, required).join(' ')}`, name);
  if (parsed.positionals.length > want.length)
    throw new UsageError(`'${name}' takes ${want.length ? want.join(' ') : 'no arguments'}; unexpected '${parsed.positionals[want.length]}'`, name);
  for (const o of c.options)
    if (o.required && parsed.options[o.name] === undefined) throw new UsageError(`'${name}' needs --${o.name}${o.arg ? ` ${o.arg}` : ''}`, name);
}

/** Typed access to parsed option values. */
export class Options {
  constructor(readonly values: Record<string, OptionValue | OptionValue[]>) {}

  has(name: string): boolean {
    return this.values[name] !== undefined;
  }
  string(name: string): string | undefined {
    const v = this.values[name];
    return v === undefined ? undefined : String(Array.isArray(v) ? v[v.length - 1] : v);
  }
  int(name: string): number | undefined {
    const v = this.values[name];
    return v === undefined ? undefined : Number(Array.isArray(v) ? v[v.length - 1] : v);
  }
  big(name: string): bigint | undefined {
    const v = this.values[name];
    return v === undefined ? undefined : BigInt(Array.isArray(v) ? (v[v.length - 1] as bigint) : (v as bigint));
  }
  bool(name: string): boolean {
    return this.values[name] === true;
  }
  list(name: string): OptionValue[] {
    const v = this.values[name];
    return v === undefined ? [] : Array.isArray(v) ? v : [v];
  }
  strings(name: string): string[] {
    return this.list(name).map(String);
  }
}

/** The help text of one command. */
export function commandHelp(c: CommandSpec, globalOptions: readonly OptionSpec[]): string {
  const usage = [
    'vcpuctl',
    ...c.path,
    ...c.positionals,
    ...c.options.map((o) => {
      const s = o.type === 'bool' ? `--${o.name}` : `--${o.name} ${o.arg ?? 'VALUE'}`;
      return o.required ? s + (o.repeat ? ' ...' : '') : `[${s}]${o.repeat ? '...' : ''}`;
    }),
  ].join(' ');
  const lines = [`usage: ${usage}`, '', c.summary];
  if (c.options.length) lines.push('', 'options:', ...optionLines(c.options));
  if (c.notes) lines.push('', c.notes);
  lines.push('', 'global options:', ...optionLines(globalOptions));
  return lines.join('\n');
}

export function optionLines(options: readonly OptionSpec[]): string[] {
  const left = options.map((o) => `  --${o.name}${o.type === 'bool' ? '' : ` ${o.arg ?? 'VALUE'}`}`);
  const width = Math.max(...left.map((l) => l.length)) + 2;
  return options.map((o, i) => `${left[i].padEnd(width)}${o.help}${o.repeat ? ' (repeatable)' : ''}`);
}
