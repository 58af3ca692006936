/**
 * State sections and `state set --set PATH=VALUE` edits.
 *
 * A path names a field of VcpuState: `regs.rbx`, `sregs.cs.base`, `vcpu_events.nmi.pending`,
 * `debugregs.db[2]`, `cpuid2.entries[0].eax`, `mp_state.value`. snake_case and camelCase both work.
 * MSRs are addressed by index or by name: `msrs.0x174=0x8`, `msrs[0x10]=0`, `msrs.SYSENTER_CS=0x8` (a name
 * vcpud knows becomes its index, so it is read and written even when the default MSR list lacks it).
 * Values: integers (decimal, 0x hex, 0o, 0b), booleans (true/false/yes/no/1/0), enum names with or
 * without their prefix (`mp_state.value=halted`), bytes as hex (`fpu.xmm[0]=0x00ff...`). The field's
 * type in the proto schema decides how a value is checked and converted.
 */
import protobuf from 'protobufjs';
import { camelCase, snakeCase } from '../../case';
import { MSR, type MsrName } from '../../ffi/sections/msr-names';
import { UsageError, parseNumber } from './args';
import { messageType } from './client';

/** The StateSection values (without UNSPECIFIED), in proto order. */
export const SECTIONS = [
  'STATE_SECTION_REGS',
  'STATE_SECTION_SREGS',
  'STATE_SECTION_SREGS2',
  'STATE_SECTION_FPU',
  'STATE_SECTION_XSAVE',
  'STATE_SECTION_XCRS',
  'STATE_SECTION_MSRS',
  'STATE_SECTION_LAPIC',
  'STATE_SECTION_VCPU_EVENTS',
  'STATE_SECTION_DEBUGREGS',
  'STATE_SECTION_MP_STATE',
  'STATE_SECTION_CPUID2',
  'STATE_SECTION_TSC_KHZ',
] as const;
export type SectionName = (typeof SECTIONS)[number];

/** The VcpuState field of a section: STATE_SECTION_VCPU_EVENTS -> vcpuEvents. */
export function sectionField(section: SectionName): string {
  return camelCase(section.slice('STATE_SECTION_'.length).toLowerCase());
}

/** The section of a VcpuState field: vcpuEvents (or vcpu_events) -> STATE_SECTION_VCPU_EVENTS. */
export function fieldSection(field: string): SectionName | undefined {
  const name = `STATE_SECTION_${snakeCase(camelCase(field)).toUpperCase()}`;
  return (SECTIONS as readonly string[]).includes(name) ? (name as SectionName) : undefined;
}

/** A section as typed on the command line: regs, REGS, vcpu_events, vcpu-events, vcpuEvents, STATE_SECTION_MSRS. */
export function parseSection(text: string): SectionName {
  const bare = text.trim().replace(/^STATE_SECTION_/i, '');
  const isCamel = /[a-z]/.test(bare) && /[A-Z]/.test(bare);
  const s = bare ? fieldSection(isCamel ? bare : bare.toLowerCase().replace(/-/g, '_')) : undefined;
  if (!s) throw new UsageError(`unknown section '${text}' (one of: ${SECTIONS.map((x) => snakeCase(sectionField(x))).join(', ')})`);
  return s;
}

/** `--section regs,sregs --section msrs` -> the sections, deduplicated, in the order given. */
export function parseSections(values: readonly string[]): SectionName[] {
  const out: SectionName[] = [];
  for (const v of values) for (const part of v.split(',').filter((p) => p.trim())) if (!out.includes(parseSection(part))) out.push(parseSection(part));
  return out;
}

// ---------------------------------------------------------------------------------------------
// --set

export type PathSegment = string | number;

export interface SetEdit {
  /** The expression as given. */
  text: string;
  /** Field names (camelCase; MSR names kept as given) and list indices / MSR indices (numbers). */
  path: PathSegment[];
  /** The value: a bigint when it reads as an integer, otherwise the text. */
  value: bigint | string;
  /** The value's text as given (bytes fields use it to keep leading zeros). */
  raw: string;
}

const NUMERIC_SEGMENT = /^(0x[0-9a-f]+|0o[0-7]+|0b[01]+|[0-9]+)$/i;

/** `msrs.EFER`, `msrs.IA32_SYSENTER_CS`, `msrs.msr_lstar`: the index of an MSR vcpud names, else undefined. */
function msrIndexByName(name: string): number | undefined {
  const bare = name
    .toUpperCase()
    .replace(/^MSR_/, '')
    .replace(/^IA32_/, '');
  return bare in MSR ? MSR[bare as MsrName] : undefined;
}

/** Parses `regs.rbx=0x10` into { path: ['regs', 'rbx'], value: 16n }. */
export function parseSetEdit(text: string): SetEdit {
  const eq = text.indexOf('=');
  if (eq <= 0) throw new UsageError(`--set ${text}: expected PATH=VALUE, e.g. regs.rbx=0x10`);
  const lhs = text.slice(0, eq).trim();
  const raw = text.slice(eq + 1).trim();
  if (!raw) throw new UsageError(`--set ${text}: missing value after '='`);
  const path: PathSegment[] = [];
  for (const part of lhs.split('.')) {
    const m = /^([^[\]]*)((?:\[[^[\]]+\])*)$/.exec(part);
    if (!m || (!m[1] && !m[2])) throw new UsageError(`--set ${text}: bad path '${lhs}'`);
    const msrIndex = path.length === 1 && path[0] === 'msrs' ? msrIndexByName(m[1]) : undefined;
    if (msrIndex !== undefined) path.push(msrIndex);
    else if (m[1]) path.push(NUMERIC_SEGMENT.test(m[1]) ? Number(parseNumber(m[1])) : /^[a-z0-9_]+$/.test(m[1]) ? camelCase(m[1]) : m[1]);
    for (const idx of m[2].match(/\[([^[\]]+)\]/g) ?? []) {
      const inner = idx.slice(1, -1).trim();
      path.push(NUMERIC_SEGMENT.test(inner) ? Number(parseNumber(inner)) : inner);
    }
  }
  if (typeof path[0] !== 'string' || !fieldSection(path[0]))
    throw new UsageError(`--set ${text}: '${String(path[0])}' is not a state section (one of: ${SECTIONS.map((x) => snakeCase(sectionField(x))).join(', ')})`);
  path[0] = camelCase(path[0]);
  let value: bigint | string = raw;
  try {
    value = parseNumber(raw, { allowNegative: true });
  } catch {
    // not an integer: booleans, enum names, ... are checked against the field when applied
  }
  return { text, path, value, raw };
}

/** What to read before applying edits: the sections and, when MSRs are named by index only, those MSRs. */
export interface EditPlan {
  sections: SectionName[];
  /** MSR indices for GetState.msr_indices; empty = the server's default list. */
  msrIndices: number[];
}

function isMsrShortcut(e: SetEdit): boolean {
  return e.path[0] === 'msrs' && e.path.length >= 2 && e.path[1] !== 'entries' && e.path[1] !== 'unreadableIndices';
}

export function planEdits(edits: readonly SetEdit[]): EditPlan {
  const sections: SectionName[] = [];
  for (const e of edits) {
    const s = fieldSection(e.path[0] as string) as SectionName;
    if (!sections.includes(s)) sections.push(s);
  }
  const msrEdits = edits.filter((e) => e.path[0] === 'msrs');
  const byIndex = msrEdits.length > 0 && msrEdits.every((e) => isMsrShortcut(e) && typeof e.path[1] === 'number');
  const msrIndices = byIndex ? [...new Set(msrEdits.map((e) => e.path[1] as number))] : [];
  return { sections, msrIndices };
}

/** Fields the server derives from other fields and ignores on SetState. */
const OUTPUT_ONLY: Record<string, readonly string[]> = {
  Xsave: ['xstateBv', 'xcompBv', 'mxcsr', 'fcw'],
  Lapic: ['apicId', 'version', 'tpr', 'svr', 'ldr', 'lvtTimer', 'timerInitialCount', 'timerCurrentCount', 'timerDivide'],
  MsrEntry: ['name'],
  Msrs: ['unreadableIndices'],
};

const U64 = (1n << 64n) - 1n;

function convertScalar(field: protobuf.Field, e: SetEdit): unknown {
  const bad = (why: string) => new UsageError(`--set ${e.text}: ${why}`);
  const int = (min: bigint, max: bigint): bigint => {
    if (typeof e.value !== 'bigint') throw bad(`'${e.raw}' is not an integer`);
    if (e.value < min || e.value > max) throw bad(`${e.raw} is out of range for ${field.type} (${min}..${hex(max)})`);
    return e.value;
  };
  if (field.resolvedType instanceof protobuf.Enum) {
    const en = field.resolvedType;
    if (typeof e.value === 'bigint') {
      const name = en.valuesById[Number(e.value)];
      if (name === undefined) throw bad(`${e.raw} is not a value of ${en.name}`);
      return name;
    }
    const want = e.raw.toUpperCase().replace(/-/g, '_');
    const names = Object.keys(en.values);
    const found = names.find((n) => n === want) ?? names.find((n) => n.endsWith(`_${want}`));
    if (!found) throw bad(`'${e.raw}' is not a value of ${en.name} (${names.join(', ')})`);
    return found;
  }
  switch (field.type) {
    case 'uint64':
    case 'fixed64':
      return int(0n, U64).toString();
    case 'int64':
    case 'sint64':
    case 'sfixed64':
      return int(-(1n << 63n), (1n << 63n) - 1n).toString();
    case 'uint32':
    case 'fixed32':
      return Number(int(0n, 0xffffffffn));
    case 'int32':
    case 'sint32':
    case 'sfixed32':
      return Number(int(-(1n << 31n), (1n << 31n) - 1n));
    case 'bool':
      if (e.value === 0n || /^(false|no|off)$/i.test(e.raw)) return false;
      if (e.value === 1n || /^(true|yes|on)$/i.test(e.raw)) return true;
      throw bad(`'${e.raw}' is not a boolean (true/false)`);
    case 'bytes': {
      const h = e.raw.replace(/^0x/i, '').replace(/[\s_:]/g, '');
      if (!/^([0-9a-f]{2})*$/i.test(h)) throw bad(`'${e.raw}' is not hex bytes (e.g. 0x00ff10)`);
      return Buffer.from(h, 'hex');
    }
    case 'string':
      return e.raw;
    default:
      throw bad(`cannot set a field of type ${field.type}`);
  }
}

function hex(v: bigint): string {
  return `0x${v.toString(16)}`;
}

type Obj = Record<string, unknown>;

/** Finds (or, for an index the read did not return, appends) the MSR entry an edit addresses. */
function msrEntry(msrs: Obj, e: SetEdit): Obj {
  const entries = ((msrs.entries as Obj[] | undefined) ?? (msrs.entries = [])) as Obj[];
  const key = e.path[1];
  if (typeof key === 'number') {
    let entry = entries.find((x) => x.index === key);
    if (!entry) entries.push((entry = { index: key, data: '0', name: '' }));
    return entry;
  }
  const want = String(key).toUpperCase();
  const entry = entries.find((x) => {
    const n = String(x.name ?? '').toUpperCase();
    return n === want || n === `IA32_${want}` || `IA32_${n}` === want || `MSR_${n}` === want;
  });
  if (!entry) throw new UsageError(`--set ${e.text}: no MSR named '${key}' in the vCPU's MSR list (use its index, e.g. msrs.0xc0000080)`);
  return entry;
}

/**
 * Applies edits to a VcpuState read with GetState (the __Output shape) and returns the state to
 * write: only the edited sections, and for MSRs only the edited entries.
 */
export function applyEdits(state: Obj, edits: readonly SetEdit[]): Obj {
  const root = messageType('vcpud.v1.VcpuState');
  const out: Obj = {};
  const touchedMsrs = new Set<number>();
  for (const e of edits) {
    const sectionName = e.path[0] as string;
    const fail = (why: string) => new UsageError(`--set ${e.text}: ${why}`);
    let obj = state[sectionName] as Obj | null | undefined;
    if (!obj) throw fail(`the server returned no ${snakeCase(sectionName)} section`);
    out[sectionName] = obj;
    let type = root.fields[sectionName].resolvedType as protobuf.Type;
    let rest = e.path.slice(1);
    if (sectionName === 'msrs' && isMsrShortcut(e)) {
      obj = msrEntry(obj, e);
      touchedMsrs.add(Number(obj.index));
      type = (type.fields.entries.resolvedType as protobuf.Type) ?? type;
      rest = e.path.length > 2 ? e.path.slice(2) : ['data'];
    }
    if (!rest.length) throw fail(`name a field of ${snakeCase(sectionName)} (${Object.keys(type.fields).map(snakeCase).join(', ')})`);
    for (let i = 0; i < rest.length; i++) {
      const seg = rest[i];
      const last = i === rest.length - 1;
      if (typeof seg !== 'string') throw fail(`unexpected index [${seg}]`);
      const field = type.fields[seg];
      if (!field) throw fail(`${type.name} has no field '${snakeCase(seg)}' (${Object.keys(type.fields).map(snakeCase).join(', ')})`);
      if (OUTPUT_ONLY[type.name]?.includes(seg)) throw fail(`${snakeCase(seg)} is output only; the server derives it`);
      if (field.repeated || field.map) {
        const idx = rest[i + 1];
        if (typeof idx !== 'number') throw fail(`${snakeCase(seg)} is a list: give an index, e.g. ${snakeCase(seg)}[0]`);
        const list = obj[seg] as unknown[] | undefined;
        if (!list || idx >= list.length) throw fail(`${snakeCase(seg)}[${idx}] is out of range (the list has ${list?.length ?? 0} entries)`);
        i++;
        const elemLast = i === rest.length - 1;
        if (field.resolvedType instanceof protobuf.Type) {
          if (elemLast) throw fail(`${snakeCase(seg)}[${idx}] is a message; name one of its fields`);
          if (sectionName === 'msrs' && seg === 'entries') touchedMsrs.add(Number((list[idx] as Obj).index));
          obj = list[idx] as Obj;
          type = field.resolvedType;
          continue;
        }
        if (!elemLast) throw fail(`${snakeCase(seg)}[${idx}] has no fields`);
        list[idx] = convertScalar(field, e);
        break;
      }
      if (field.resolvedType instanceof protobuf.Type) {
        if (last) throw fail(`${snakeCase(seg)} is a message; name one of its fields (${Object.keys(field.resolvedType.fields).map(snakeCase).join(', ')})`);
        obj = (obj[seg] as Obj | null) ?? (obj[seg] = {});
        type = field.resolvedType;
        continue;
      }
      if (!last) throw fail(`${snakeCase(seg)} has no fields`);
      obj[seg] = convertScalar(field, e);
    }
  }
  if (out.msrs) {
    const msrs = out.msrs as Obj;
    out.msrs = { entries: ((msrs.entries as Obj[]) ?? []).filter((x) => touchedMsrs.has(Number(x.index))) };
  }
  return out;
}
