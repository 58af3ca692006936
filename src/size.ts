/**
 * Integers and byte sizes as people type them, one syntax for vcpud's flags and config file and for
 * vcpuctl's options: decimal, 0x hex, 0o octal or 0b binary with `_` separators; a size may end in a
 * binary unit (Ki, Mi, Gi, Ti: powers of 1024) or a decimal one (K, M, G, T: powers of 1000), either
 * optionally followed by B, in any case: `64Mi`, `4GiB`, `1G`, `0x10Ki`, `512`.
 */

export const SIZE_SYNTAX = 'bytes, or a number with Ki, Mi, Gi, Ti (powers of 1024) or K, M, G, T (powers of 1000), e.g. 64Mi, 4GiB, 1G';

const INTEGER = /^(0x[0-9a-f]+|0o[0-7]+|0b[01]+|[0-9]+)$/i;
const UNIT = /([kmgt])(i?)b?$/i;
const POWER: Record<string, bigint> = { k: 1n, m: 2n, g: 3n, t: 4n };

/** A non-negative integer literal (see the module comment); undefined when `text` is not one. */
export function parseInteger(text: string): bigint | undefined {
  const s = text.trim().replace(/_/g, '');
  return INTEGER.test(s) ? BigInt(s.toLowerCase()) : undefined;
}

/** A byte count; throws `not a size: ...` naming the syntax. */
export function parseByteSize(text: string): bigint {
  const s = text.trim().replace(/_/g, '');
  const unit = UNIT.exec(s);
  // `0x1b` is hex, not 1 byte: a unit letter is needed before a B to make it a unit
  const digits = unit ? s.slice(0, unit.index) : /^[0-9_]+b$/i.test(s) ? s.slice(0, -1) : s;
  const n = digits ? parseInteger(digits) : undefined;
  if (n === undefined) throw new Error(`not a size: '${text}' (expected ${SIZE_SYNTAX})`);
  if (!unit) return n;
  const base = unit[2] ? 1024n : 1000n;
  return n * base ** POWER[unit[1].toLowerCase()];
}
