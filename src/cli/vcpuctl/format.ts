/**
 * Human-readable output of vcpuctl (tables, hex, hexdumps, state views) and the JSON form of
 * responses. Every formatter takes the objects grpc-js hands the client (the generated __Output
 * types: longs as decimal strings, enums as names, bytes as Buffers) and returns text without a
 * trailing newline.
 */
import * as grpc from '@grpc/grpc-js';
import { snakeCase } from '../../case';
import type { GetCapabilitiesResponse__Output } from '../../api/generated/vcpud/v1/GetCapabilitiesResponse';
import type { GetStateResponse__Output } from '../../api/generated/vcpud/v1/GetStateResponse';
import type { VcpuState__Output } from '../../api/generated/vcpud/v1/VcpuState';
import type { Segment__Output } from '../../api/generated/vcpud/v1/Segment';
import type { DescriptorTable__Output } from '../../api/generated/vcpud/v1/DescriptorTable';
import type { Sregs__Output } from '../../api/generated/vcpud/v1/Sregs';
import type { Sregs2__Output } from '../../api/generated/vcpud/v1/Sregs2';
import type { NestedState__Output } from '../../api/generated/vcpud/v1/NestedState';
import type { Vm__Output } from '../../api/generated/vcpud/v1/Vm';
import type { Vcpu__Output } from '../../api/generated/vcpud/v1/Vcpu';
import type { StreamConsoleResponse__Output } from '../../api/generated/vcpud/v1/StreamConsoleResponse';
import { isPlainCharacter } from '../../vm/vm-name';
import { UsageError } from './args';
import { ConnectionFailure, decodeStatusDetails, isServiceError, type DecodedStatus } from './client';
import { wellKnownJson } from './well-known-json';

// ---------------------------------------------------------------------------------------------
// Basics

type Numeric = string | number | bigint;

/** 0x-prefixed hex of an unsigned value (uint64 fields arrive as decimal strings); `digits` pads. */
export function hex(v: Numeric | null | undefined, digits = 0): string {
  if (v === null || v === undefined || v === '') return '-';
  return `0x${BigInt(v).toString(16).padStart(digits, '0')}`;
}

export const yesNo = (b: boolean | null | undefined) => (b ? 'yes' : 'no');

/** Strips an enum prefix and lower-cases: ("VCPU_RUN_STATE_STOPPED", "VCPU_RUN_STATE_") -> "stopped". */
export function enumShort(value: string | number | null | undefined, prefix: string): string {
  if (value === null || value === undefined) return '-';
  const s = String(value);
  return (s.startsWith(prefix) ? s.slice(prefix.length) : s).toLowerCase();
}

export const runStateName = (s: string | number | null | undefined) => enumShort(s, 'VCPU_RUN_STATE_');
export const sectionName = (s: string | number | null | undefined) => enumShort(s, 'STATE_SECTION_');

/** Bytes with a binary unit when exact: 67108864 -> "64 MiB". */
export function formatSize(v: Numeric): string {
  const n = BigInt(v);
  for (const [unit, shift] of [
    ['TiB', 40n],
    ['GiB', 30n],
    ['MiB', 20n],
    ['KiB', 10n],
  ] as const) {
    const m = 1n << shift;
    if (n >= m && n % m === 0n) return `${n / m} ${unit}`;
  }
  return `${n} bytes`;
}

/**
 * `text` with every character that does not print as itself (control, bidi and other format
 * characters, line breaks...) escaped as \xNN, \uNNNN or \u{NNNNN}: strings from the server (VM
 * names of old snapshots, messages) must not move the cursor, reorder a line or hide text.
 */
export function printable(text: string): string {
  let out = '';
  for (const c of text) {
    if (isPlainCharacter(c)) {
      out += c;
      continue;
    }
    const n = c.codePointAt(0) as number;
    out += n < 0x100 ? `\\x${n.toString(16).padStart(2, '0')}` : n < 0x10000 ? `\\u${n.toString(16).padStart(4, '0')}` : `\\u{${n.toString(16)}}`;
  }
  return out;
}

/** Left-aligned columns separated by two spaces; trailing blanks trimmed; cells made printable. */
export function table(header: readonly string[], rows: readonly (readonly Numeric[])[], indent = ''): string[] {
  const cells = [header, ...rows].map((r) => r.map((c) => printable(String(c))));
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  return cells.map((r) => (indent + r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).trimEnd());
}

/** "key value" lines with the keys padded to one width; values made printable. */
export function keyValues(pairs: readonly (readonly [string, Numeric])[], indent = ''): string[] {
  const width = Math.max(0, ...pairs.map(([k]) => k.length));
  return pairs.map(([k, v]) => `${indent}${k.padEnd(width)}  ${printable(String(v))}`.trimEnd());
}

/** `hexdump -C` style lines, offsets from `base` (a guest-physical address). */
export function hexdump(data: Uint8Array, base: bigint | number = 0): string {
  const b = BigInt(base);
  const lines: string[] = [];
  const width = (b + BigInt(data.length)).toString(16).length > 8 ? 16 : 8;
  for (let off = 0; off < data.length; off += 16) {
    const row = data.subarray(off, Math.min(off + 16, data.length));
    let hexPart = '';
    for (let i = 0; i < 16; i++) {
      hexPart += i < row.length ? row[i].toString(16).padStart(2, '0') : '  ';
      hexPart += i === 7 ? '  ' : ' ';
    }
    const ascii = Array.from(row, (c) => (c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : '.')).join('');
    lines.push(`${(b + BigInt(off)).toString(16).padStart(width, '0')}  ${hexPart} |${ascii}|`);
  }
  return lines.join('\n');
}

/** Bytes of a little-endian register (st/xmm) as one hex number. */
function leHex(buf: Uint8Array): string {
  return `0x${Buffer.from(buf).reverse().toString('hex')}`;
}

/**
 * JSON of a response as the proto3 JSON mapping has it: bytes as base64, Timestamps as RFC 3339 and
 * Durations as "1.500s" strings; bigints as strings. Pretty-printed.
 */
export function toJson(value: unknown): string {
  return JSON.stringify(
    value,
    function (this: unknown, key: string, v: unknown) {
      const raw = (this as Record<string, unknown>)[key];
      if (raw instanceof Uint8Array) return Buffer.from(raw).toString('base64');
      if (typeof v === 'bigint') return v.toString();
      return wellKnownJson(key, v);
    },
    2,
  );
}

// ---------------------------------------------------------------------------------------------
// Capabilities

export function formatCapabilities(c: GetCapabilitiesResponse__Output): string {
  const n = c.nested;
  const lines = [
    'host',
    ...keyValues(
      [
        ['kernel', c.kernelRelease || '-'],
        ['KVM module', `${c.kvmModule || '-'} (API version ${c.kvmApiVersion})`],
        ['vendor', enumShort(c.vendor, 'VENDOR_')],
        ['xsave size', `${c.xsaveSize} bytes`],
        ['vcpu mmap size', `${c.vcpuMmapSize} bytes`],
        ['MSR index list', `${c.msrIndices.length} MSRs`],
      ],
      '  ',
    ),
    '',
  ];
  if (n) {
    const facts = [
      `max state ${n.maxStateSize} bytes`,
      `module parameter nested=${n.moduleParameter || '(absent)'}`,
      `VMX/SVM ${n.guestCpuidExposesVirtualization ? '' : 'not '}offered to guests`,
    ].join('; ');
    lines.push(n.supported ? `nested: supported (${facts})` : `nested: unsupported: ${n.reason || 'no reason given'} (${facts})`);
  } else {
    lines.push('nested: unknown');
  }
  lines.push(
    '',
    ...table(
      ['SECTION', 'READ', 'WRITE', 'CAPABILITY', 'REASON'],
      c.sections.map((s) => [sectionName(s.section), yesNo(s.readable), yesNo(s.writable), s.capability || '-', s.reason]),
    ),
    '',
    ...table(
      ['CAPABILITY', 'VALUE'],
      c.capabilities.map((k) => [k.name, k.value]),
    ),
  );
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// VMs

function timestamp(t: { seconds: string; nanos: number } | null | undefined): string {
  if (!t) return '-';
  const ms = Number(t.seconds) * 1000 + Math.floor(t.nanos / 1e6);
  return new Date(ms).toISOString();
}

function stopDetails(d: Record<string, number> | undefined): string {
  const entries = Object.entries(d ?? {});
  if (!entries.length) return '';
  return entries.map(([k, v]) => (/addr|port|value|code|rip/i.test(k) && Number.isInteger(v) && v >= 0 ? `${k}=${hex(v)}` : `${k}=${v}`)).join(' ');
}

/** One row per vCPU: id, run state, stop reason and details, exits; then each stop's description. */
export function formatVcpus(vcpus: readonly Vcpu__Output[]): string {
  const rows = table(
    ['VCPU', 'STATE', 'STOP REASON', 'EXITS', 'DETAILS'],
    vcpus.map((v) => [v.id, runStateName(v.runState), v.stopReason || '-', v.exits, stopDetails(v.stopDetails)]),
  );
  const described = vcpus.filter((v) => v.stopDescription).map((v) => printable(`vcpu ${v.id} stopped: ${v.stopDescription}`));
  return [...rows, ...(described.length ? ['', ...described] : [])].join('\n');
}

export function formatVm(vm: Vm__Output): string {
  const lines = keyValues([
    ['id', vm.id],
    ['name', vm.name || '-'],
    ['memory', `${formatSize(vm.memoryBytes)} (${hex(vm.memoryBytes)})`],
    ['vcpus', vm.vcpus.length],
    ['irqchip', yesNo(vm.irqchip)],
    ['nested', vm.nestedExposed ? 'exposed' : 'not exposed'],
    ['created', timestamp(vm.createTime)],
  ]);
  lines.push('', formatVcpus(vm.vcpus));
  const counts = vm.vcpus.filter((v) => Object.keys(v.exitCounts ?? {}).length);
  if (counts.length) {
    lines.push('', 'exits by reason');
    for (const v of counts)
      lines.push(
        `  vcpu ${v.id}: ` +
          Object.entries(v.exitCounts)
            .sort((a, b) => Number(b[1]) - Number(a[1]))
            .map(([k, n]) => `${k.replace(/^KVM_EXIT_/, '').toLowerCase()}=${n}`)
            .join(' '),
      );
  }
  return lines.join('\n');
}

export function formatVmList(vms: readonly Vm__Output[]): string {
  if (!vms.length) return 'no VMs';
  return table(
    ['ID', 'NAME', 'MEMORY', 'VCPUS', 'STATES', 'CREATED'],
    vms.map((vm) => [
      vm.id,
      vm.name || '-',
      formatSize(vm.memoryBytes),
      vm.vcpus.length,
      vm.vcpus.map((v) => `${v.id}:${runStateName(v.runState)}`).join(' '),
      timestamp(vm.createTime),
    ]),
  ).join('\n');
}

// ---------------------------------------------------------------------------------------------
// State

const SEGMENTS = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;

function segmentRows(s: Sregs__Output | Sregs2__Output): string[] {
  const rows = SEGMENTS.map((name) => {
    const g: Segment__Output | null = s[name];
    if (!g) return [name, '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-', '-'];
    const bit = (b: boolean) => (b ? '1' : '0');
    return [
      name,
      hex(g.selector, 4),
      hex(g.base, 16),
      hex(g.limit, 8),
      hex(g.type),
      g.dpl,
      bit(g.present),
      bit(g.s),
      bit(g.db),
      bit(g.l),
      bit(g.g),
      bit(g.avl),
      bit(g.unusable),
    ];
  });
  return table(['SEG', 'SELECTOR', 'BASE', 'LIMIT', 'TYPE', 'DPL', 'P', 'S', 'DB', 'L', 'G', 'AVL', 'UNUSABLE'], rows, '  ');
}

function dtable(name: string, d: DescriptorTable__Output | null): string {
  return d ? `  ${name}  base ${hex(d.base, 16)}  limit ${hex(d.limit, 4)}` : `  ${name}  -`;
}

function controlRegs(s: Sregs__Output | Sregs2__Output): string[] {
  return [
    `  cr0 ${hex(s.cr0, 16)}  cr2 ${hex(s.cr2, 16)}  cr3 ${hex(s.cr3, 16)}`,
    `  cr4 ${hex(s.cr4, 16)}  cr8 ${hex(s.cr8)}  efer ${hex(s.efer)}  apic_base ${hex(s.apicBase)}`,
  ];
}

/** Vectors set in the 256-bit interrupt bitmap (4 little-endian u64 words). */
export function pendingVectors(words: readonly Numeric[]): number[] {
  const out: number[] = [];
  words.forEach((w, i) => {
    const v = BigInt(w);
    for (let b = 0; b < 64; b++) if ((v >> BigInt(b)) & 1n) out.push(i * 64 + b);
  });
  return out;
}

const EVENT_FLAGS: [number, string][] = [
  [0x1, 'NMI_PENDING'],
  [0x2, 'SIPI_VECTOR'],
  [0x4, 'SHADOW'],
  [0x8, 'SMM'],
  [0x10, 'PAYLOAD'],
  [0x20, 'TRIPLE_FAULT'],
];

export function flagNames(value: number, names: readonly [number, string][]): string[] {
  const out = names.filter(([bit]) => value & bit).map(([, n]) => n);
  const known = names.reduce((a, [bit]) => a | bit, 0);
  const rest = value & ~known;
  if (rest) out.push(`UNKNOWN_${hex(rest)}`);
  return out;
}

function flagsText(value: number, names: readonly string[]): string {
  return `${hex(value)}${names.length ? ` (${names.join(' ')})` : ''}`;
}

/** The human view of a vCPU state: one block per section present. */
export function formatVcpuState(st: VcpuState__Output): string {
  const out: string[] = [];
  const section = (title: string, body: string[]) => out.push(title, ...body, '');

  if (st.regs) {
    const r = st.regs;
    const cell = (n: keyof typeof r) => `${String(n).padEnd(3)} ${hex(r[n], 16)}`;
    section('regs', [
      `  ${[cell('rax'), cell('rbx'), cell('rcx'), cell('rdx')].join('  ')}`,
      `  ${[cell('rsi'), cell('rdi'), cell('rsp'), cell('rbp')].join('  ')}`,
      `  ${[cell('r8'), cell('r9'), cell('r10'), cell('r11')].join('  ')}`,
      `  ${[cell('r12'), cell('r13'), cell('r14'), cell('r15')].join('  ')}`,
      `  ${cell('rip')}  rflags ${hex(r.rflags, 8)}`,
    ]);
  }
  if (st.sregs) {
    const s = st.sregs;
    const vectors = pendingVectors(s.interruptBitmap ?? []);
    section('sregs', [
      ...segmentRows(s),
      dtable('gdt', s.gdt),
      dtable('idt', s.idt),
      ...controlRegs(s),
      `  pending interrupts: ${vectors.length ? vectors.map((v) => hex(v)).join(' ') : 'none'}`,
    ]);
  }
  if (st.sregs2) {
    const s = st.sregs2;
    section('sregs2', [
      ...segmentRows(s),
      dtable('gdt', s.gdt),
      dtable('idt', s.idt),
      ...controlRegs(s),
      `  flags ${flagsText(Number(s.flags), flagNames(Number(s.flags), [[0x1, 'PDPTRS_VALID']]))}  pdptrs ${(s.pdptrs ?? []).map((p) => hex(p)).join(' ') || '-'}`,
    ]);
  }
  if (st.fpu) {
    const f = st.fpu;
    const regs = [...(f.fpr ?? []).map((b, i) => [`st${i}`, b] as const), ...(f.xmm ?? []).map((b, i) => [`xmm${i}`, b] as const)].filter(([, b]) =>
      b.some((x) => x !== 0),
    );
    section('fpu', [
      `  fcw ${hex(f.fcw)}  fsw ${hex(f.fsw)}  ftwx ${hex(f.ftwx)}  last_opcode ${hex(f.lastOpcode)}  last_ip ${hex(f.lastIp)}  last_dp ${hex(f.lastDp)}  mxcsr ${hex(f.mxcsr)}`,
      regs.length ? `  ${regs.map(([n, b]) => `${n} ${leHex(b)}`).join('\n  ')}` : '  st0-7, xmm0-15: all zero',
    ]);
  }
  if (st.xsave) {
    const x = st.xsave;
    section(`xsave  ${x.raw?.length ?? 0} bytes`, [`  xstate_bv ${hex(x.xstateBv)}  xcomp_bv ${hex(x.xcompBv)}  mxcsr ${hex(x.mxcsr)}  fcw ${hex(x.fcw)}`]);
  }
  if (st.xcrs) {
    const x = st.xcrs;
    section('xcrs', [`  ${(x.xcrs ?? []).map((c) => `xcr${c.xcr} ${hex(c.value)}`).join('  ') || 'none'}${x.flags ? `  flags ${hex(x.flags)}` : ''}`]);
  }
  if (st.msrs) {
    const m = st.msrs;
    const body = table(
      ['INDEX', 'NAME', 'VALUE'],
      (m.entries ?? []).map((e) => [hex(e.index, 8), e.name || '-', hex(e.data, 16)]),
      '  ',
    );
    if (m.unreadableIndices?.length) body.push(`  unreadable: ${m.unreadableIndices.map((i) => hex(i, 8)).join(' ')}`);
    section(`msrs  ${m.entries?.length ?? 0} entries`, body);
  }
  if (st.lapic) {
    const l = st.lapic;
    section(`lapic  ${l.raw?.length ?? 0} bytes`, [
      `  apic_id ${l.apicId}  version ${hex(l.version)}  tpr ${hex(l.tpr)}  svr ${hex(l.svr)}${l.svr & 0x100 ? ' (enabled)' : ' (disabled)'}  ldr ${hex(l.ldr)}`,
      `  lvt_timer ${hex(l.lvtTimer)}  timer initial ${l.timerInitialCount} current ${l.timerCurrentCount} divide ${hex(l.timerDivide)}`,
    ]);
  }
  if (st.vcpuEvents) {
    const e = st.vcpuEvents;
    const x = e.exception;
    const i = e.interrupt;
    const n = e.nmi;
    const s = e.smi;
    section(`vcpu_events  flags ${flagsText(e.flags, flagNames(e.flags, EVENT_FLAGS))}`, [
      x
        ? `  exception  injected=${yesNo(x.injected)} pending=${yesNo(x.pending)} nr=${x.nr} error_code=${x.hasErrorCode ? hex(x.errorCode) : '-'} payload=${x.hasPayload ? hex(x.payload) : '-'}`
        : '  exception  -',
      i ? `  interrupt  injected=${yesNo(i.injected)} nr=${i.nr} soft=${yesNo(i.soft)} shadow=${hex(i.shadow)}` : '  interrupt  -',
      n ? `  nmi        injected=${yesNo(n.injected)} pending=${yesNo(n.pending)} masked=${yesNo(n.masked)}` : '  nmi        -',
      s
        ? `  smi        smm=${yesNo(s.smm)} pending=${yesNo(s.pending)} smm_inside_nmi=${yesNo(s.smmInsideNmi)} latched_init=${yesNo(s.latchedInit)}`
        : '  smi        -',
      `  sipi_vector ${hex(e.sipiVector)}  triple_fault_pending ${yesNo(e.tripleFaultPending)}`,
    ]);
  }
  if (st.debugregs) {
    const d = st.debugregs;
    section('debugregs', [
      `  ${(d.db ?? []).map((v, k) => `dr${k} ${hex(v)}`).join('  ')}`,
      `  dr6 ${hex(d.dr6)}  dr7 ${hex(d.dr7)}${BigInt(d.flags || 0) ? `  flags ${hex(d.flags)}` : ''}`,
    ]);
  }
  if (st.mpState) out.push(`mp_state  ${enumShort(st.mpState.value, 'MP_STATE_')} (KVM ${st.mpState.kvmValue})`, '');
  if (st.cpuid2) {
    const entries = st.cpuid2.entries ?? [];
    section(
      `cpuid2  ${entries.length} entries`,
      table(
        ['FUNCTION', 'INDEX', 'FLAGS', 'EAX', 'EBX', 'ECX', 'EDX'],
        entries.map((e) => [hex(e.function, 8), hex(e.index), hex(e.flags), hex(e.eax, 8), hex(e.ebx, 8), hex(e.ecx, 8), hex(e.edx, 8)]),
        '  ',
      ),
    );
  }
  if (st.tscKhz) out.push(`tsc_khz  ${st.tscKhz.khz} kHz`, '');
  while (out.length && out[out.length - 1] === '') out.pop();
  return out.length ? out.join('\n') : '(no sections)';
}

/** GetStateResponse for humans, optionally headed by the VM and vCPU it came from. */
export function formatGetState(resp: GetStateResponse__Output, where?: { vmId: string; vcpuId: number }): string {
  const head = where
    ? `vm ${where.vmId} vcpu ${where.vcpuId}${resp.implicitlyPaused ? ' (implicitly paused for the read)' : ''}`
    : resp.implicitlyPaused
      ? '(implicitly paused for the read)'
      : '';
  const body = resp.state ? formatVcpuState(resp.state) : '(no state)';
  return head ? `${head}\n\n${body}` : body;
}

// ---------------------------------------------------------------------------------------------
// Nested state

const ALL_ONES = (1n << 64n) - 1n;

function paOrNone(v: Numeric): string {
  return BigInt(v) === ALL_ONES ? 'none (-1)' : hex(v);
}

/** Every field of a decoded message as "snake_name value" lines (numbers in hex, lists joined). */
function fieldLines(obj: object, indent: string): string[] {
  const pairs: [string, string][] = [];
  for (const [k, v] of Object.entries(obj)) {
    if (v === null || v === undefined) continue;
    if (Array.isArray(v)) pairs.push([snakeCase(k), v.length ? v.map((x) => (typeof x === 'string' && !/^\d+$/.test(x) ? x : hex(x))).join(' ') : '-']);
    else if (typeof v === 'boolean') pairs.push([snakeCase(k), yesNo(v)]);
    else if (typeof v === 'number' || (typeof v === 'string' && /^\d+$/.test(v))) pairs.push([snakeCase(k), hex(v)]);
    else if (typeof v === 'string') pairs.push([snakeCase(k), v]);
  }
  return keyValues(pairs, indent);
}

export function formatNestedState(n: NestedState__Output): string {
  const lines = [
    `format  ${enumShort(n.format, 'NESTED_FORMAT_')} (${n.formatValue})`,
    `size    ${n.size} bytes (raw ${n.raw?.length ?? 0})`,
    `flags   ${flagsText(n.flags, n.flagNames ?? [])}`,
  ];
  if (n.vmx) {
    const v = n.vmx;
    lines.push(
      '',
      'vmx header',
      ...keyValues(
        [
          ['vmxon_pa', paOrNone(v.vmxonPa)],
          ['vmcs12_pa', paOrNone(v.vmcs12Pa)],
          ['smm_flags', flagsText(v.smmFlags, v.smmFlagNames ?? [])],
          ['flags', flagsText(v.flags, v.flagNames ?? [])],
          ['preemption_timer_deadline', hex(v.preemptionTimerDeadline)],
        ],
        '  ',
      ),
    );
  }
  if (n.svm) lines.push('', 'svm header', `  vmcb_pa  ${hex(n.svm.vmcbPa)}`);
  if (n.vmcs12)
    lines.push(
      '',
      `vmcs12  revision ${hex(n.vmcs12.revisionId)}${n.vmcs12.revisionId === 0x11e57ed0 ? ' (VMCS12_REVISION)' : ''}  ${n.vmcs12.raw?.length ?? 0} bytes`,
    );
  if (n.shadowVmcs12) lines.push(`shadow vmcs12  revision ${hex(n.shadowVmcs12.revisionId)}  ${n.shadowVmcs12.raw?.length ?? 0} bytes`);
  if (n.vmcb12) {
    const c = n.vmcb12.control;
    const s = n.vmcb12.save;
    if (c) lines.push('', 'vmcb12 control', ...fieldLines(c, '  '));
    if (s) {
      const segs = ['es', 'cs', 'ss', 'ds', 'fs', 'gs', 'gdtr', 'ldtr', 'idtr', 'tr'] as const;
      const rest = Object.fromEntries(Object.entries(s).filter(([k]) => !(segs as readonly string[]).includes(k)));
      lines.push(
        '',
        'vmcb12 save',
        ...table(
          ['SEG', 'SELECTOR', 'ATTRIB', 'LIMIT', 'BASE'],
          segs.map((k) => {
            const g = s[k];
            return g ? [k, hex(g.selector, 4), hex(g.attrib, 4), hex(g.limit, 8), hex(g.base, 16)] : [k, '-', '-', '-', '-'];
          }),
          '  ',
        ),
        ...fieldLines(rest, '  '),
      );
    }
  }
  if (!n.dataView && n.size <= 128) lines.push('', 'no data area (header only)');
  return lines.join('\n');
}

// ---------------------------------------------------------------------------------------------
// Console

/** A console event other than output as the stderr line `[vcpu 0: stopped (done)]`. */
export function formatConsoleEvent(ev: StreamConsoleResponse__Output): string | undefined {
  if (ev.stateChange) {
    const c = ev.stateChange;
    return `[vcpu ${c.vcpuId}: ${runStateName(c.runState)}${c.reason ? ` (${printable(c.reason)})` : ''}${c.description ? `: ${printable(c.description)}` : ''}]`;
  }
  if (ev.debug) {
    const d = ev.debug;
    return `[vcpu ${d.vcpuId}: ${d.done ? 'done' : 'debug'} ${hex(d.value)} (${d.value})]`;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Errors

/** grpc status code number -> name ("INVALID_ARGUMENT"). */
export function statusName(code: number): string {
  return (grpc.status as unknown as Record<number, string>)[code] ?? `CODE_${code}`;
}

/**
 * The error lines vcpuctl prints: `vcpuctl: <CODE> (<reason>): <message>` and one
 * `  - <field>: <description> [<rule>]` per BadRequest violation (and per PreconditionFailure one).
 */
export function formatError(e: unknown): string {
  if (e instanceof UsageError) return `vcpuctl: ${e.message}`;
  if (e instanceof ConnectionFailure) return [`vcpuctl: UNAVAILABLE: ${printable(e.details)}`, ...e.hints.map((h) => `  - ${h}`)].join('\n');
  if (isServiceError(e)) {
    const st = decodeStatusDetails(e.metadata);
    const message = printable((st?.message || e.details || e.message || '').trim());
    const reason = st?.errorInfo?.reason;
    const lines = [`vcpuctl: ${statusName(e.code)}${reason ? ` (${reason})` : ''}: ${message}`];
    for (const v of st?.badRequest ?? []) lines.push(printable(`  - ${v.field}: ${v.description}${v.reason ? ` [${v.reason}]` : ''}`));
    for (const v of st?.preconditionFailure ?? []) lines.push(printable(`  - ${v.subject}: ${v.description}${v.type ? ` [${v.type}]` : ''}`));
    return lines.join('\n');
  }
  return `vcpuctl: ${(e as Error)?.message ?? String(e)}`;
}

/** The JSON document of an error (`--json`): code, its name, message and the decoded details. */
export function errorJson(e: unknown): { error: Record<string, unknown> } {
  if (isServiceError(e)) {
    const st: DecodedStatus | undefined = decodeStatusDetails(e.metadata);
    return {
      error: {
        code: e.code,
        status: statusName(e.code),
        message: st?.message || e.details || e.message || '',
        ...(st?.errorInfo ? { reason: st.errorInfo.reason, domain: st.errorInfo.domain, metadata: st.errorInfo.metadata } : {}),
        ...(st?.badRequest ? { violations: st.badRequest } : {}),
        ...(st?.preconditionFailure ? { preconditionFailures: st.preconditionFailure } : {}),
      },
    };
  }
  return { error: { status: e instanceof UsageError ? 'USAGE' : 'LOCAL', message: (e as Error)?.message ?? String(e) } };
}
