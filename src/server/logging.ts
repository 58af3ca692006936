/**
 * Structured logs: one JSON object per line on stderr ({time, level, msg, ...fields}), so a sidecar's
 * output goes straight into the cluster's log pipeline. stdout stays free for a CLI's real output.
 */
import type { LogLevel } from './config';

export type LogFields = Record<string, unknown>;

export interface Logger {
  readonly level: LogLevel;
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** True when `level` would be written: skip building costly fields otherwise. */
  enabled(level: LogLevel): boolean;
  /** A logger adding `fields` to every line (e.g. request_id, method). */
  child(fields: LogFields): Logger;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** Receives each finished line (without newline); default: process.stderr. */
  sink?: (line: string) => void;
  /** Fields on every line. */
  fields?: LogFields;
  /** Clock, for tests. */
  now?: () => Date;
}

const RANK: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };
const RESERVED = { time: 1, level: 1, msg: 1 };

/** Errors do not serialize with JSON.stringify (message and stack are not enumerable). */
function plain(value: unknown): unknown {
  if (value instanceof Error) {
    const e = value as Error & { kind?: unknown; code?: unknown };
    const out: LogFields = { name: e.name, message: e.message };
    if (e.kind !== undefined) out.kind = e.kind;
    if (e.code !== undefined) out.code = e.code;
    return out;
  }
  if (typeof value === 'bigint') return value.toString();
  return value;
}

function encode(record: LogFields): string {
  try {
    return JSON.stringify(record, (_k, v) => plain(v));
  } catch {
    // A cycle or a throwing getter in some field must not lose the line itself.
    return JSON.stringify({ time: record.time, level: record.level, msg: record.msg, log_error: 'unserializable fields' });
  }
}

class JsonLogger implements Logger {
  constructor(
    readonly level: LogLevel,
    private readonly sink: (line: string) => void,
    private readonly fields: LogFields,
    private readonly now: () => Date,
  ) {}

  enabled(level: LogLevel): boolean {
    return RANK[level] >= RANK[this.level];
  }

  private write(level: LogLevel, msg: string, fields?: LogFields): void {
    if (!this.enabled(level)) return;
    // time, level and msg come first and are never overwritten by a field of the same name.
    const record: LogFields = { time: this.now().toISOString(), level, msg };
    for (const source of [this.fields, fields ?? {}]) for (const [k, v] of Object.entries(source)) if (!(k in RESERVED)) record[k] = v;
    this.sink(encode(record));
  }

  debug(msg: string, fields?: LogFields): void {
    this.write('debug', msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    this.write('info', msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    this.write('warn', msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    this.write('error', msg, fields);
  }

  child(fields: LogFields): Logger {
    return new JsonLogger(this.level, this.sink, { ...this.fields, ...fields }, this.now);
  }
}

export function createLogger(options: LoggerOptions = {}): Logger {
  const sink = options.sink ?? ((line: string) => process.stderr.write(`${line}\n`));
  return new JsonLogger(options.level ?? 'info', sink, options.fields ?? {}, options.now ?? (() => new Date()));
}

/** A logger that writes nothing (tests, library use). */
export function silentLogger(): Logger {
  return createLogger({ level: 'error', sink: () => {} });
}
