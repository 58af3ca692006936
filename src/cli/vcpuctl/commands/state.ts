/**
 * `vcpuctl state get|set`: read and write vCPU state sections. `get --out FILE` writes the binary
 * protobuf encoding of the VcpuState message, which `set --in FILE` takes back; `set --json-in`
 * takes a VcpuState (or a whole GetStateResponse, as `get --json` prints it); `set --set PATH=VALUE`
 * reads the sections involved, edits them and writes them back.
 */
import protobuf from 'protobufjs';
import { camelCase, snakeCase } from '../../../case';
import type { VcpuState__Output } from '../../../api/generated/vcpud/v1/VcpuState';
import { UsageError } from '../args';
import { messageType } from '../client';
import { NO_IMPLICIT_PAUSE, VCPU_OPTION, vcpuOf, type Command, type Context } from '../command';
import { applyEdits, parseSections, parseSetEdit, planEdits, sectionField } from '../edit';
import { formatGetState, sectionName } from '../format';

const vcpuStateType = () => messageType('vcpud.v1.VcpuState');

/** The binary protobuf encoding of a VcpuState as grpc-js returned it (the --out file). */
export function encodeVcpuState(state: VcpuState__Output | Record<string, unknown>): Uint8Array {
  const T = vcpuStateType();
  return T.encode(T.fromObject(state as Record<string, unknown>)).finish();
}

const TO_OBJECT: protobuf.IConversionOptions = { longs: String, enums: String, defaults: false };

/** Decodes a --out file back into a request-ready VcpuState object (only the sections present). */
export function decodeVcpuState(bytes: Uint8Array): Record<string, unknown> {
  const T = vcpuStateType();
  return T.toObject(T.decode(bytes), TO_OBJECT);
}

/** Recursively converts snake_case keys to camelCase and rejects keys the schema does not have. */
function normalizeJson(value: unknown, type: protobuf.Type, where: string): unknown {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return value;
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
    const key = camelCase(k);
    const field = type.fields[key];
    if (!field) {
      // oneof group names proto-loader adds (e.g. headerView) carry no data
      if (type.oneofs?.[key]) continue;
      throw new UsageError(`--json-in: ${where}${snakeCase(key)} is not a field of ${type.name} (${Object.keys(type.fields).map(snakeCase).join(', ')})`);
    }
    const sub = field.resolvedType instanceof protobuf.Type ? field.resolvedType : undefined;
    if (sub && Array.isArray(v)) out[key] = v.map((x, i) => normalizeJson(x, sub, `${where}${snakeCase(key)}[${i}].`));
    else if (sub) out[key] = normalizeJson(v, sub, `${where}${snakeCase(key)}.`);
    else out[key] = v;
  }
  return out;
}

/** A VcpuState from JSON: the state itself or a GetStateResponse ({ state, implicitly_paused }). */
export function vcpuStateFromJson(json: unknown): Record<string, unknown> {
  if (!json || typeof json !== 'object' || Array.isArray(json)) throw new UsageError('--json-in: expected a JSON object (a VcpuState)');
  let obj = json as Record<string, unknown>;
  const keys = Object.keys(obj);
  if ('state' in obj && keys.every((k) => ['state', 'implicitlyPaused', 'implicitly_paused'].includes(k))) obj = obj.state as Record<string, unknown>;
  const T = vcpuStateType();
  const normalized = normalizeJson(obj, T, '') as Record<string, unknown>;
  let message: protobuf.Message;
  try {
    message = T.fromObject(normalized);
  } catch (e) {
    throw new UsageError(`--json-in: ${(e as Error).message}`);
  }
  return T.toObject(message, TO_OBJECT);
}

function presentSections(state: Record<string, unknown>): string[] {
  return Object.keys(state)
    .filter((k) => state[k] !== null && state[k] !== undefined)
    .map(snakeCase);
}

async function stateSet(ctx: Context): Promise<void> {
  const o = ctx.options;
  const modes = ['in', 'json-in', 'set'].filter((m) => o.has(m));
  if (modes.length !== 1) throw new UsageError(`'state set' needs exactly one of --in FILE, --json-in FILE or --set PATH=VALUE`, 'state set');
  const vmId = ctx.positionals[0];
  const vcpuId = vcpuOf(ctx);
  const noImplicitPause = o.bool('no-implicit-pause');
  const client = ctx.client();
  let state: Record<string, unknown>;
  if (o.has('in')) {
    const file = o.string('in') as string;
    try {
      state = decodeVcpuState(ctx.readFile('--in', file));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      throw new UsageError(`--in ${file}: not a binary VcpuState (${(e as Error).message})`);
    }
  } else if (o.has('json-in')) {
    const file = o.string('json-in') as string;
    let json: unknown;
    try {
      json = JSON.parse(ctx.readFile('--json-in', file).toString('utf8'));
    } catch (e) {
      if (e instanceof UsageError) throw e;
      throw new UsageError(`--json-in ${file}: ${(e as Error).message}`);
    }
    state = vcpuStateFromJson(json);
  } else {
    const edits = o.strings('set').map(parseSetEdit);
    const plan = planEdits(edits);
    const current = await client.getState({ vmId, vcpuId, sections: plan.sections, msrIndices: plan.msrIndices, noImplicitPause });
    state = applyEdits((current.state ?? {}) as unknown as Record<string, unknown>, edits);
  }
  const only = parseSections(o.strings('section'));
  if (only.length) {
    if (o.has('set')) throw new UsageError('--section selects sections of --in/--json-in; --set names its own', 'state set');
    const keep = new Set(only.map(sectionField));
    for (const k of Object.keys(state)) if (!keep.has(k)) delete state[k];
  }
  if (!presentSections(state).length) throw new UsageError('the state to set has no sections', 'state set');
  const resp = await client.setState({ vmId, vcpuId, state, noImplicitPause });
  if (ctx.json) ctx.printJson(resp);
  else ctx.print(`applied: ${resp.applied.map(sectionName).join(', ') || '(nothing)'}`);
}

export const stateCommands: Command[] = [
  {
    path: ['state', 'get'],
    summary: 'Read state sections of one vCPU as one consistent snapshot (GetState).',
    positionals: ['VM'],
    options: [
      VCPU_OPTION,
      {
        name: 'section',
        type: 'string',
        repeat: true,
        arg: 'NAME',
        help: 'a section to read (regs, sregs, msrs, ...; comma lists too); default: every readable one',
      },
      { name: 'msr', type: 'int', repeat: true, arg: 'INDEX', help: 'an MSR to read for the msrs section; default: the host MSR index list' },
      NO_IMPLICIT_PAUSE,
      {
        name: 'out',
        type: 'string',
        arg: 'FILE',
        help: 'write the binary VcpuState to FILE (for `state set --in`) instead of the table; --json still prints it',
      },
    ],
    notes: 'sections: regs sregs sregs2 fpu xsave xcrs msrs lapic vcpu_events debugregs mp_state cpuid2 tsc_khz',
    async run(ctx) {
      const vmId = ctx.positionals[0];
      const vcpuId = vcpuOf(ctx);
      const sections = parseSections(ctx.options.strings('section'));
      const msrIndices = ctx.options.list('msr').map(Number);
      if (msrIndices.some((i) => i > 0xffffffff)) throw new UsageError('--msr: an MSR index is a 32-bit number', 'state get');
      const resp = await ctx.client().getState({ vmId, vcpuId, sections, msrIndices, noImplicitPause: ctx.options.bool('no-implicit-pause') });
      const out = ctx.options.string('out');
      if (out !== undefined) {
        const bytes = encodeVcpuState(resp.state ?? {});
        const full = ctx.writeFile(out, bytes);
        if (!ctx.json)
          ctx.note(
            `wrote ${bytes.length} bytes (VcpuState: ${presentSections((resp.state ?? {}) as unknown as Record<string, unknown>).join(', ')}) to ${full}`,
          );
      }
      if (ctx.json) ctx.printJson(resp);
      else if (out === undefined) ctx.print(formatGetState(resp, { vmId, vcpuId })); // with --out the file is the output
    },
  },
  {
    path: ['state', 'set'],
    summary: 'Write state sections of one vCPU atomically (SetState) and print the sections applied.',
    positionals: ['VM'],
    options: [
      VCPU_OPTION,
      { name: 'in', type: 'string', arg: 'FILE', help: 'a binary VcpuState written by `state get --out`' },
      { name: 'json-in', type: 'string', arg: 'FILE', help: 'a JSON VcpuState (or the output of `state get --json`)' },
      { name: 'set', type: 'string', repeat: true, arg: 'PATH=VALUE', help: 'edit a field of the current state, e.g. regs.rbx=0x10' },
      { name: 'section', type: 'string', repeat: true, arg: 'NAME', help: 'with --in/--json-in: write only these sections of the file' },
      NO_IMPLICIT_PAUSE,
    ],
    notes: [
      '--set paths: regs.rip, sregs.cs.base, sregs.cr0, vcpu_events.nmi.pending, debugregs.db[0], cpuid2.entries[3].eax,',
      'mp_state.value=halted, msrs.0x174=0x8 (an MSR by index) or msrs.SYSENTER_CS=0x8 (the same MSR by name).',
      'EFER, APIC_BASE, FS_BASE and GS_BASE are sregs fields (sregs.efer, sregs.apic_base, sregs.fs.base, sregs.gs.base):',
      'set them there; vcpud refuses msrs.EFER etc. unless the value repeats the sregs one.',
      'Only the sections named are read and written back; for msrs only the MSRs named.',
    ].join('\n'),
    run: stateSet,
  },
];
