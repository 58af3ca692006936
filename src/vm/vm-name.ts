/**
 * The one rule for VM names, checked wherever a name enters vcpud (CreateVm, RestoreSnapshot,
 * RestoreSnapshotStream, MigrateVm, a snapshot's stored name):
 * - at most MAX_VM_NAME_BYTES (253) bytes of UTF-8, the bound of a DNS name and of a Kubernetes object
 *   name, so that an orchestrator's object name always fits; unbounded names made snapshot headers
 *   that no reader accepts and ListVms responses over every client's message limit;
 * - every character a letter, mark, number, punctuation, symbol (Unicode categories L, M, N, P, S) or
 *   the space U+0020. Refused: control characters (C0, DEL, C1), format characters (bidi overrides
 *   and isolates U+202A-202E/U+2066-2069, zero-width joiners, soft hyphen, BOM), other separators
 *   (NBSP, line and paragraph separators), private-use, surrogate and unassigned code points: a name
 *   is printed in tables, logs and terminals and must read as what it is.
 * The empty name means "no name".
 */
import { invalidArgument } from '../errors';

export const MAX_VM_NAME_BYTES = 253;

const ALLOWED_CHARACTER = /[\p{L}\p{M}\p{N}\p{P}\p{S} ]/u;

/** A character a VM name may hold: one that prints as itself (vcpuctl escapes the others). */
export const isPlainCharacter = (c: string): boolean => ALLOWED_CHARACTER.test(c);

/** The rule, for violation messages (VM names and the snapshot names vcpud writes). */
export const PLAIN_CHARACTERS =
  'letters, marks, numbers, punctuation, symbols and spaces only: no control, format (bidi, zero-width), other separator, private-use or unassigned characters';

const codePoint = (c: string) => `U+${(c.codePointAt(0) as number).toString(16).toUpperCase().padStart(4, '0')}`;

/** The first character of `name` that does not print as itself (U+XXXX) and its position, if any. */
export function firstNonPlainCharacter(name: string): { codePoint: string; index: number } | undefined {
  let index = 0;
  for (const c of name) {
    if (!isPlainCharacter(c)) return { codePoint: codePoint(c), index };
    index++;
  }
  return undefined;
}

/**
 * Refuses (INVALID_ARGUMENT naming `field` and the rule) a name that breaks the rule. `source` says
 * where the name came from when it is not the request field itself (a snapshot's stored name).
 * The message never repeats the name: it may be huge or hold the very characters refused.
 */
export function checkVmName(name: string | undefined, field: string, source = field): void {
  if (!name) return;
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > MAX_VM_NAME_BYTES)
    throw invalidArgument(`${source} is ${bytes} bytes of UTF-8; a VM name has at most ${MAX_VM_NAME_BYTES}`, [
      { rule: 'vm_name.length', field, message: `at most ${MAX_VM_NAME_BYTES} bytes of UTF-8` },
    ]);
  const bad = firstNonPlainCharacter(name);
  if (bad)
    throw invalidArgument(`${source} has the character ${bad.codePoint} at position ${bad.index}, which a VM name cannot hold`, [
      { rule: 'vm_name.characters', field, message: PLAIN_CHARACTERS },
    ]);
}
