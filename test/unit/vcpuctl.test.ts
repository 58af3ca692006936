/**
 * vcpuctl without KVM: argument parsing, number and size syntax, the human formatters, the --set edit
 * parser, binary/JSON VcpuState input, the error printer (with a real grpc-status-details-bin trailer
 * from src/server/errors.ts), and run() end to end against an in-process fake vcpud on a unix socket.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import { VcpudError } from '../../src/errors';
import { toServiceError } from '../../src/server/errors';
import type { GetCapabilitiesResponse__Output } from '../../src/api/generated/vcpud/v1/GetCapabilitiesResponse';
import type { GetStateResponse__Output } from '../../src/api/generated/vcpud/v1/GetStateResponse';
import type { NestedState__Output } from '../../src/api/generated/vcpud/v1/NestedState';
import type { Regs__Output } from '../../src/api/generated/vcpud/v1/Regs';
import type { Segment__Output } from '../../src/api/generated/vcpud/v1/Segment';
import type { Vm__Output } from '../../src/api/generated/vcpud/v1/Vm';
import { run } from '../../src/cli/vcpuctl';
import { Options, UsageError, parseCommandLine, parseNumber, parseSize, type CommandSpec, type OptionSpec } from '../../src/cli/vcpuctl/args';
import { defaultSocketAddress } from '../../src/address';
import { parseSize as parseServerSize } from '../../src/server/config';
import { decodeStatusDetails, defaultServer, loadVcpudProto, resolveTarget } from '../../src/cli/vcpuctl/client';
import { durationJson, timestampJson } from '../../src/cli/vcpuctl/well-known-json';
import { applyEdits, parseSection, parseSections, parseSetEdit, planEdits } from '../../src/cli/vcpuctl/edit';
import { decodeVcpuState, encodeVcpuState, vcpuStateFromJson } from '../../src/cli/vcpuctl/commands/state';
import {
  errorJson,
  formatCapabilities,
  formatConsoleEvent,
  formatError,
  formatGetState,
  formatNestedState,
  formatSize,
  formatVm,
  hex,
  hexdump,
  pendingVectors,
  table,
  toJson,
} from '../../src/cli/vcpuctl/format';

// ---------------------------------------------------------------------------------------------
// Helpers

function collector() {
  let text = '';
  const chunks: Buffer[] = [];
  return {
    write(chunk: string | Uint8Array) {
      const b = typeof chunk === 'string' ? Buffer.from(chunk) : Buffer.from(chunk);
      chunks.push(b);
      text += b.toString('utf8');
      return true;
    },
    get text() {
      return text;
    },
    bytes: () => Buffer.concat(chunks),
  };
}

async function vcpuctl(argv: string[], extra: { env?: NodeJS.ProcessEnv; cwd?: string } = {}) {
  const stdout = collector();
  const stderr = collector();
  const code = await run(argv, { stdout, stderr, env: extra.env ?? {}, cwd: extra.cwd });
  return { code, stdout: stdout.text, stderr: stderr.text, raw: stdout.bytes() };
}

const U64 = (v: bigint | number) => BigInt(v).toString();

function seg(over: Partial<Segment__Output> = {}): Segment__Output {
  return {
    base: '0',
    limit: 0xffff,
    selector: 0,
    type: 3,
    present: true,
    dpl: 0,
    db: false,
    s: true,
    l: false,
    g: false,
    avl: false,
    unusable: false,
    ...over,
  };
}

function regs(over: Partial<Regs__Output> = {}): Regs__Output {
  const r = {} as Regs__Output;
  for (const k of ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp', 'r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'] as const)
    r[k] = '0';
  return { ...r, rflags: '2', ...over };
}

function sampleState(): GetStateResponse__Output {
  return {
    implicitlyPaused: true,
    state: {
      regs: regs({ rbx: '16', rip: U64(0x1005), rax: U64(0xffffffffffffffffn) }),
      sregs: {
        cs: seg({ selector: 0, type: 0xb }),
        ds: seg(),
        es: seg(),
        fs: seg(),
        gs: seg(),
        ss: seg(),
        tr: seg({ type: 0xb, s: false }),
        ldt: seg({ type: 2, s: false }),
        gdt: { base: '0', limit: 0xffff },
        idt: { base: '0', limit: 0xffff },
        cr0: U64(0x60000010),
        cr2: '0',
        cr3: '0',
        cr4: '0',
        cr8: '0',
        efer: '0',
        apicBase: U64(0xfee00900),
        interruptBitmap: ['0', U64(1n << 2n), '0', '0'],
      },
      sregs2: null,
      fpu: null,
      xsave: { raw: Buffer.alloc(4096), xstateBv: '3', xcompBv: '0', mxcsr: 0x1f80, fcw: 0x37f },
      xcrs: { xcrs: [{ xcr: 0, value: '7' }], flags: 0 },
      msrs: {
        entries: [
          { index: 0xc0000080, data: U64(0x500), name: 'EFER' },
          { index: 0x10, data: U64(123456789), name: 'TSC' },
        ],
        unreadableIndices: [0x48],
      },
      lapic: null,
      vcpuEvents: {
        exception: { injected: false, nr: 0, hasErrorCode: false, pending: false, errorCode: 0, hasPayload: false, payload: '0' },
        interrupt: { injected: false, nr: 0, soft: false, shadow: 0 },
        nmi: { injected: false, pending: true, masked: false },
        sipiVector: 0,
        flags: 0x9,
        smi: { smm: false, pending: false, smmInsideNmi: false, latchedInit: false },
        tripleFaultPending: false,
      },
      debugregs: { db: ['0', '0', '0', '0'], dr6: U64(0xffff0ff0), dr7: U64(0x400), flags: '0' },
      mpState: { value: 'MP_STATE_RUNNABLE', kvmValue: 0 },
      cpuid2: { entries: [{ function: 0, index: 0, flags: 0, eax: 0xd, ebx: 0x756e6547, ecx: 0x6c65746e, edx: 0x49656e69 }] },
      tscKhz: { khz: 2_900_000 },
    },
  };
}

function sampleCaps(): GetCapabilitiesResponse__Output {
  return {
    kvmApiVersion: 12,
    kernelRelease: '6.1.0-27-amd64',
    kvmModule: 'kvm_intel',
    vendor: 'VENDOR_INTEL',
    nested: { maxStateSize: 0, moduleParameter: 'N', guestCpuidExposesVirtualization: false, supported: false, reason: 'kvm_intel.nested is off' },
    capabilities: [
      { name: 'KVM_CAP_NESTED_STATE', value: '0' },
      { name: 'KVM_CAP_XSAVE2', value: '4096' },
    ],
    xsaveSize: 4096,
    vcpuMmapSize: 12288,
    msrIndices: [0x10, 0xc0000080],
    sections: [
      { section: 'STATE_SECTION_REGS', readable: true, writable: true, capability: '', reason: '' },
      { section: 'STATE_SECTION_SREGS2', readable: false, writable: false, capability: 'KVM_CAP_SREGS2', reason: 'KVM_CAP_SREGS2 is absent' },
    ],
  };
}

// ---------------------------------------------------------------------------------------------
// Arguments

describe('numbers and sizes', () => {
  it('parses decimal, hex, octal, binary and separators', () => {
    expect(parseNumber('4096')).toBe(4096n);
    expect(parseNumber('0x1000')).toBe(0x1000n);
    expect(parseNumber('0XfF')).toBe(255n);
    expect(parseNumber('0o17')).toBe(15n);
    expect(parseNumber('0b101')).toBe(5n);
    expect(parseNumber('1_000_000')).toBe(1_000_000n);
    expect(parseNumber('0xffffffffffffffff')).toBe((1n << 64n) - 1n);
  });

  it('takes binary size suffixes only where a size is meant', () => {
    expect(parseSize('64Mi')).toBe(64n << 20n);
    expect(parseSize('4Ki')).toBe(4096n);
    expect(parseSize('2GiB')).toBe(2n << 30n);
    expect(parseSize('0x10Ki')).toBe(16n * 1024n);
    expect(parseSize('0x1000')).toBe(0x1000n);
    expect(parseSize('64M')).toBe(64_000_000n);
    expect(() => parseNumber('64Mi')).toThrow(/not a number/);
  });

  it('sizes take the same syntax as vcpud: binary and decimal units, B optional (one parser for both)', () => {
    for (const [text, bytes] of [
      ['1G', 1_000_000_000],
      ['1Gi', 1 << 30],
      ['4GB', 4_000_000_000],
      ['3k', 3000],
      ['2MiB', 2 << 20],
      ['512B', 512],
      ['0x1b', 0x1b],
      ['1_024', 1024],
    ] as const) {
      expect(parseSize(text)).toBe(BigInt(bytes));
      expect(parseServerSize(text)).toBe(bytes);
    }
    for (const bad of ['', 'Gi', '1.5Gi', '4 gigs', '-1', 'G1']) {
      expect(() => parseSize(bad)).toThrow(/not a size/);
      expect(() => parseServerSize(bad)).toThrow(/not a size/);
    }
  });

  it('rejects what is not a number', () => {
    for (const bad of ['', 'abc', '0x', '12.5', '-1', '0xg']) expect(() => parseNumber(bad)).toThrow();
    expect(parseNumber('-1', { allowNegative: true })).toBe(-1n);
  });
});

describe('command line parser', () => {
  const globals: OptionSpec[] = [
    { name: 'json', type: 'bool', help: '' },
    { name: 'server', type: 'string', help: '' },
  ];
  const commands: CommandSpec[] = [
    {
      path: ['state', 'get'],
      summary: '',
      positionals: ['VM'],
      options: [
        { name: 'vcpu', type: 'int', help: '' },
        { name: 'section', type: 'string', repeat: true, help: '' },
        { name: 'gpa', type: 'u64', help: '' },
        { name: 'memory', type: 'size', help: '' },
      ],
    },
    { path: ['caps'], summary: '', positionals: [], options: [] },
  ];

  it('resolves command words, positionals, typed values and repeated flags', () => {
    const p = parseCommandLine(
      ['--server', 'unix:/x', 'state', 'get', 'vm-1', '--vcpu', '0x2', '--section', 'regs', '--section=sregs', '--gpa=0x1000', '--memory', '64Mi', '--json'],
      globals,
      commands,
    );
    expect(p.command?.path).toEqual(['state', 'get']);
    expect(p.positionals).toEqual(['vm-1']);
    const o = new Options(p.options);
    expect(o.int('vcpu')).toBe(2);
    expect(o.strings('section')).toEqual(['regs', 'sregs']);
    expect(o.big('gpa')).toBe(0x1000n);
    expect(o.big('memory')).toBe(64n << 20n);
    expect(o.bool('json')).toBe(true);
    expect(o.string('server')).toBe('unix:/x');
  });

  it('treats everything after -- as positionals and sees --help anywhere', () => {
    const p = parseCommandLine(['state', 'get', '--', '--weird-vm-id'], globals, commands);
    expect(p.positionals).toEqual(['--weird-vm-id']);
    const help = parseCommandLine(['state', '--help'], globals, commands);
    expect(help).toMatchObject({ help: true, words: ['state'] });
    expect(help.command).toBeUndefined();
  });

  it('reports unknown commands, unknown flags, missing values and bad numbers as UsageErrors', () => {
    expect(() => parseCommandLine(['nope'], globals, commands)).toThrow(new UsageError("unknown command 'nope' (expected one of: state, caps)"));
    expect(() => parseCommandLine(['state', 'frob'], globals, commands)).toThrow(/'state' has no subcommand 'frob'/);
    expect(() => parseCommandLine(['caps', '--frob'], globals, commands)).toThrow(/unknown option --frob/);
    expect(() => parseCommandLine(['caps', '--vcpu', '1'], globals, commands)).toThrow(/unknown option --vcpu/);
    expect(() => parseCommandLine(['--vcpu', '1', 'state', 'get'], globals, commands)).toThrow(/command options go after the command/);
    expect(() => parseCommandLine(['state', 'get', 'vm', '--vcpu'], globals, commands)).toThrow(/--vcpu needs a value/);
    expect(() => parseCommandLine(['state', 'get', 'vm', '--vcpu', 'one'], globals, commands)).toThrow(/bad value for --vcpu: 'one' is not a number/);
    expect(() => parseCommandLine(['state', 'get', 'vm', '-v'], globals, commands)).toThrow(/unknown option -v/);
  });
});

describe('run(): usage errors exit 2 without touching the network', () => {
  it('unknown flag', async () => {
    const r = await vcpuctl(['vm', 'list', '--bogus']);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain('vcpuctl: unknown option --bogus');
    expect(r.stderr).toContain("run 'vcpuctl vm list --help' for usage");
  });

  it('unknown command, missing command, missing subcommand', async () => {
    expect(await vcpuctl(['frobnicate'])).toMatchObject({ code: 2, stderr: expect.stringContaining("unknown command 'frobnicate'") });
    expect(await vcpuctl([])).toMatchObject({ code: 2, stderr: expect.stringContaining('missing command') });
    expect(await vcpuctl(['vm'])).toMatchObject({ code: 2, stderr: expect.stringContaining("'vm' needs a subcommand (create, list, get, delete)") });
  });

  it('bad numbers and sizes, missing arguments and required options', async () => {
    expect(await vcpuctl(['vm', 'create', '--memory', 'lots'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("bad value for --memory: not a size: 'lots'"),
    });
    expect(await vcpuctl(['vm', 'create'])).toMatchObject({ code: 2, stderr: expect.stringContaining("'vm create' needs --memory SIZE") });
    expect(await vcpuctl(['state', 'get', '--vcpu', 'x1', 'vm-1'])).toMatchObject({ code: 2 });
    expect(await vcpuctl(['vm', 'get'])).toMatchObject({ code: 2, stderr: expect.stringContaining("'vm get' needs VM") });
    expect(await vcpuctl(['vm', 'get', 'a', 'b'])).toMatchObject({ code: 2, stderr: expect.stringContaining("unexpected 'b'") });
    expect(await vcpuctl(['state', 'get', 'vm-1', '--section', 'bogus'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining("unknown section 'bogus'"),
    });
    expect(await vcpuctl(['state', 'set', 'vm-1', '--set', 'regs.rbx=1', '--in', 'f'])).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('exactly one of'),
    });
    expect(await vcpuctl(['load', 'vm-1', '/nonexistent/file.bin'])).toMatchObject({ code: 2, stderr: expect.stringContaining('no such file') });
  });

  it('--json usage errors also put one JSON document on stdout', async () => {
    const r = await vcpuctl(['--json', 'vm', 'create', '--memory', '1KB2']);
    expect(r.code).toBe(2);
    expect(JSON.parse(r.stdout)).toEqual({ error: { status: 'USAGE', message: expect.stringContaining('--memory') } });
  });

  it('--help prints usage and exits 0, per command too', async () => {
    const top = await vcpuctl(['--help']);
    expect(top.code).toBe(0);
    for (const c of ['caps', 'vm create', 'state get', 'state set', 'nested show', 'console', 'mem read', 'load']) expect(top.stdout).toContain(`vcpuctl ${c}`);
    const one = await vcpuctl(['state', 'get', '--help']);
    expect(one.code).toBe(0);
    expect(one.stdout).toContain('usage: vcpuctl state get VM');
    expect(one.stdout).toContain('--section NAME');
    expect(one.stdout).toContain('--server ADDR');
    expect((await vcpuctl(['vm', '--help'])).stdout).toContain('vcpuctl vm create');
  });

  it('TLS options do not apply to unix sockets', async () => {
    const r = await vcpuctl(['--server', 'unix:/tmp/x.sock', '--tls-ca', 'ca.pem', 'caps']);
    expect(r).toMatchObject({ code: 2, stderr: expect.stringContaining('apply to TCP addresses') });
    const r2 = await vcpuctl(['--server', '127.0.0.1:1', '--insecure', '--tls-ca', 'ca.pem', 'caps']);
    expect(r2).toMatchObject({ code: 2, stderr: expect.stringContaining('--insecure conflicts') });
  });
});

describe('server address', () => {
  it("defaults like vcpud, whatever the current directory: $VCPUD_ADDR, then vcpud's own default socket", () => {
    const none = () => false;
    expect(defaultServer({ VCPUD_ADDR: '127.0.0.1:7000', XDG_RUNTIME_DIR: '/run/user/1' }, none).address).toBe('127.0.0.1:7000');
    expect(defaultServer({ XDG_RUNTIME_DIR: '/run/user/1' }, none).address).toBe('unix:/run/user/1/vcpud/vcpud.sock');
    expect(defaultServer({}, none).address).toBe(defaultSocketAddress({}));
    expect(defaultServer({}, none).address).not.toContain(process.cwd());
    // a root vcpud's socket when this user's default has none
    expect(defaultServer({ XDG_RUNTIME_DIR: '/run/user/1' }, (p) => p === '/run/vcpud/vcpud.sock').address).toBe('unix:/run/vcpud/vcpud.sock');
  });

  it('resolves unix targets, and plain paths, to absolute unix: paths', () => {
    expect(resolveTarget('unix:/a/b.sock')).toEqual({ kind: 'unix', address: 'unix:/a/b.sock' });
    expect(resolveTarget('unix:///a/b.sock')).toEqual({ kind: 'unix', address: 'unix:/a/b.sock' });
    expect(resolveTarget('unix:run/x.sock', '/w')).toEqual({ kind: 'unix', address: 'unix:/w/run/x.sock' });
    expect(resolveTarget('/a/b.sock')).toEqual({ kind: 'unix', address: 'unix:/a/b.sock' });
    expect(resolveTarget('./x.sock', '/w')).toEqual({ kind: 'unix', address: 'unix:/w/x.sock' });
    expect(resolveTarget('localhost:50051')).toEqual({ kind: 'tcp', address: 'localhost:50051' });
  });

  it('a connection failure says what was tried and what to check, not grpc-js internals', async () => {
    const sock = path.join(os.tmpdir(), `vcpuctl-none-${process.pid}.sock`);
    const r = await vcpuctl(['--server', sock, '--timeout', '5', 'caps']);
    expect(r.code).toBe(1);
    expect(r.stderr).not.toMatch(/Resolution note|Name resolution failed|dns:/);
    expect(r.stderr).toContain(`cannot reach vcpud at unix:${sock} (from --server): no socket at that path`);
    expect(r.stderr).toMatch(/is vcpud running\?/);
    expect(r.stderr).toMatch(/owner and mode/);
    expect(r.stderr).toMatch(/VCPUD_ADDR/);
    const env = await vcpuctl(['--timeout', '5', 'caps'], { env: { VCPUD_ADDR: `unix:${sock}` } });
    expect(env.stderr).toContain('(from $VCPUD_ADDR)');
    const tcp = await vcpuctl(['--server', '127.0.0.1:1', '--insecure', '--timeout', '5', 'caps']);
    expect(tcp.stderr).toMatch(/^vcpuctl: UNAVAILABLE: cannot reach vcpud at 127\.0\.0\.1:1 \(from --server\): nothing is listening there/);
  });
});

// ---------------------------------------------------------------------------------------------
// Formatting

describe('formatting', () => {
  it('hex, sizes, tables, hexdump', () => {
    expect(hex('18446744073709551615')).toBe('0xffffffffffffffff');
    expect(hex(0x10, 4)).toBe('0x0010');
    expect(formatSize(String(64 << 20))).toBe('64 MiB');
    expect(formatSize(4097)).toBe('4097 bytes');
    expect(
      table(
        ['A', 'LONGER'],
        [
          ['xx', 'y'],
          ['x', ''],
        ],
      ),
    ).toEqual(['A   LONGER', 'xx  y', 'x']);
    expect(hexdump(Buffer.from('Hello, world!\n\0\x01AB'), 0x1000n).split('\n')).toEqual([
      '00001000  48 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 0a 00 01  |Hello, world!...|',
      '00001010  41 42                                             |AB|',
    ]);
    expect(pendingVectors(['1', '0', '0', String(1n << 63n)])).toEqual([0, 255]);
  });

  it('capabilities: host summary, nested verdict with reason, section and capability tables', () => {
    const text = formatCapabilities(sampleCaps());
    expect(text).toContain('kernel          6.1.0-27-amd64');
    expect(text).toContain('KVM module      kvm_intel (API version 12)');
    expect(text).toContain('vendor          intel');
    expect(text).toContain('MSR index list  2 MSRs');
    expect(text).toMatch(/^nested: unsupported: kvm_intel.nested is off \(max state 0 bytes; module parameter nested=N; VMX\/SVM not offered to guests\)$/m);
    expect(text).toMatch(/^SECTION\s+READ\s+WRITE\s+CAPABILITY\s+REASON$/m);
    expect(text).toMatch(/^regs\s+yes\s+yes\s+-$/m);
    expect(text).toMatch(/^sregs2\s+no\s+no\s+KVM_CAP_SREGS2\s+KVM_CAP_SREGS2 is absent$/m);
    expect(text).toMatch(/^KVM_CAP_XSAVE2\s+4096$/m);
    const ok = formatCapabilities({
      ...sampleCaps(),
      nested: { maxStateSize: 8320, moduleParameter: 'Y', guestCpuidExposesVirtualization: true, supported: true, reason: '' },
    });
    expect(ok).toContain('nested: supported (max state 8320 bytes; module parameter nested=Y; VMX/SVM offered to guests)');
  });

  it('GetStateResponse: regs, segments table, events, mp_state, msrs table, raw sections summarized', () => {
    const text = formatGetState(sampleState(), { vmId: 'vm-1', vcpuId: 0 });
    expect(text.split('\n')[0]).toBe('vm vm-1 vcpu 0 (implicitly paused for the read)');
    expect(text).toContain('rax 0xffffffffffffffff  rbx 0x0000000000000010');
    expect(text).toContain('rip 0x0000000000001005  rflags 0x00000002');
    expect(text).toMatch(/^ {2}SEG\s+SELECTOR\s+BASE\s+LIMIT\s+TYPE\s+DPL\s+P\s+S\s+DB\s+L\s+G\s+AVL\s+UNUSABLE$/m);
    expect(text).toMatch(/^ {2}cs\s+0x0000\s+0x0000000000000000\s+0x0000ffff\s+0xb\s+0\s+1\s+1\s+0\s+0\s+0\s+0\s+0$/m);
    expect(text).toContain('cr0 0x0000000060000010');
    expect(text).toContain('apic_base 0xfee00900');
    expect(text).toContain('pending interrupts: 0x42');
    expect(text).toContain('xsave  4096 bytes');
    expect(text).toContain('xstate_bv 0x3  xcomp_bv 0x0  mxcsr 0x1f80  fcw 0x37f');
    expect(text).toContain('xcr0 0x7');
    expect(text).toMatch(/^ {2}INDEX\s+NAME\s+VALUE$/m);
    expect(text).toMatch(/^ {2}0xc0000080\s+EFER\s+0x0000000000000500$/m);
    expect(text).toContain('unreadable: 0x00000048');
    expect(text).toContain('vcpu_events  flags 0x9 (NMI_PENDING SMM)');
    expect(text).toContain('nmi        injected=no pending=yes masked=no');
    expect(text).toContain('dr6 0xffff0ff0  dr7 0x400');
    expect(text).toContain('mp_state  runnable (KVM 0)');
    expect(text).toMatch(/^ {2}0x00000000\s+0x0\s+0x0\s+0x0000000d\s+0x756e6547/m);
    expect(text).toContain('tsc_khz  2900000 kHz');
    expect(text).not.toContain('sregs2');
    expect(text).not.toContain('lapic');
  });

  it('JSON output: bytes as base64, longs as strings', () => {
    const doc = JSON.parse(toJson({ raw: Buffer.from([1, 2, 3]), n: 5n, s: '18446744073709551615' }));
    expect(doc).toEqual({ raw: 'AQID', n: '5', s: '18446744073709551615' });
  });

  it('VMs and console events', () => {
    const vm: Vm__Output = {
      id: 'vm-1',
      name: 'test',
      memoryBytes: String(2 << 20),
      vcpus: [
        {
          id: 0,
          runState: 'VCPU_RUN_STATE_STOPPED',
          stopReason: 'done',
          stopDetails: { value: 42 },
          exits: '7',
          exitCounts: { KVM_EXIT_IO: '7' },
          stopDescription: '',
        },
      ],
      createTime: { seconds: '1700000000', nanos: 0 },
      nestedExposed: false,
      irqchip: true,
    };
    const text = formatVm(vm);
    expect(text).toContain('memory   2 MiB (0x200000)');
    expect(text).toMatch(/^0\s+stopped\s+done\s+7\s+value=0x2a$/m);
    expect(text).toContain('vcpu 0: io=7');
    expect(
      formatConsoleEvent({
        stateChange: { vcpuId: 0, runState: 'VCPU_RUN_STATE_STOPPED', reason: 'done', description: '' },
        event: 'stateChange',
        droppedOutputBytes: '0',
        droppedEvents: '0',
      }),
    ).toBe('[vcpu 0: stopped (done)]');
    expect(formatConsoleEvent({ debug: { vcpuId: 1, value: '42', done: false }, event: 'debug', droppedOutputBytes: '0', droppedEvents: '0' })).toBe(
      '[vcpu 1: debug 0x2a (42)]',
    );
  });

  it('nested state: flags by name, format, header view, vmcs12 revision', () => {
    const n: NestedState__Output = {
      raw: Buffer.alloc(8320),
      flags: 0x1,
      flagNames: ['GUEST_MODE'],
      format: 'NESTED_FORMAT_VMX',
      formatValue: 0,
      size: 8320,
      header: Buffer.alloc(128),
      vmx: { vmxonPa: U64(0x10000), vmcs12Pa: '18446744073709551615', smmFlags: 0, smmFlagNames: [], flags: 0, flagNames: [], preemptionTimerDeadline: '0' },
      vmcs12: { revisionId: 0x11e57ed0, raw: Buffer.alloc(4096) },
      shadowVmcs12: null,
      headerView: 'vmx',
      dataView: 'vmcs12',
    };
    const text = formatNestedState(n);
    expect(text).toContain('format  vmx (0)');
    expect(text).toContain('flags   0x1 (GUEST_MODE)');
    expect(text).toContain('vmxon_pa                   0x10000');
    expect(text).toContain('vmcs12_pa                  none (-1)');
    expect(text).toContain('vmcs12  revision 0x11e57ed0 (VMCS12_REVISION)');
  });
});

// ---------------------------------------------------------------------------------------------
// Sections and --set

describe('sections and --set edits', () => {
  it('parses section names in every spelling', () => {
    expect(parseSection('regs')).toBe('STATE_SECTION_REGS');
    expect(parseSection('VCPU_EVENTS')).toBe('STATE_SECTION_VCPU_EVENTS');
    expect(parseSection('vcpu-events')).toBe('STATE_SECTION_VCPU_EVENTS');
    expect(parseSection('vcpuEvents')).toBe('STATE_SECTION_VCPU_EVENTS');
    expect(parseSection('STATE_SECTION_TSC_KHZ')).toBe('STATE_SECTION_TSC_KHZ');
    expect(parseSections(['regs,sregs', 'regs', 'mp_state'])).toEqual(['STATE_SECTION_REGS', 'STATE_SECTION_SREGS', 'STATE_SECTION_MP_STATE']);
    expect(() => parseSection('nested')).toThrow(/unknown section 'nested'/);
  });

  it('parses PATH=VALUE into a path and a bigint', () => {
    expect(parseSetEdit('regs.rbx=0x10')).toEqual({ text: 'regs.rbx=0x10', path: ['regs', 'rbx'], value: 16n, raw: '0x10' });
    expect(parseSetEdit('vcpu_events.nmi.pending=true')).toMatchObject({ path: ['vcpuEvents', 'nmi', 'pending'], value: 'true' });
    expect(parseSetEdit('sregs.cs.base=4096')).toMatchObject({ path: ['sregs', 'cs', 'base'], value: 4096n });
    expect(parseSetEdit('debugregs.db[2]=0x1')).toMatchObject({ path: ['debugregs', 'db', 2], value: 1n });
    expect(parseSetEdit('cpuid2.entries[3].eax=7')).toMatchObject({ path: ['cpuid2', 'entries', 3, 'eax'], value: 7n });
    expect(parseSetEdit('msrs.0xc0000080=0x500')).toMatchObject({ path: ['msrs', 0xc0000080], value: 0x500n });
    expect(parseSetEdit('msrs[0x10]=0')).toMatchObject({ path: ['msrs', 0x10], value: 0n });
    // an MSR name vcpud knows is its index (IA32_/MSR_ prefixes and case do not matter); others stay names
    expect(parseSetEdit('msrs.IA32_EFER=0x500')).toMatchObject({ path: ['msrs', 0xc0000080] });
    expect(parseSetEdit('msrs.sysenter_cs=8')).toMatchObject({ path: ['msrs', 0x174] });
    expect(parseSetEdit('msrs.MSR_LSTAR=0')).toMatchObject({ path: ['msrs', 0xc0000082] });
    expect(parseSetEdit('msrs.SOME_VENDOR_MSR=0')).toMatchObject({ path: ['msrs', 'SOME_VENDOR_MSR'] });
    expect(parseSetEdit('sregs.apic_base=0xfee00900')).toMatchObject({ path: ['sregs', 'apicBase'] });
    expect(() => parseSetEdit('regs.rbx')).toThrow(/expected PATH=VALUE/);
    expect(() => parseSetEdit('regs.rbx=')).toThrow(/missing value/);
    expect(() => parseSetEdit('nested.flags=1')).toThrow(/'nested' is not a state section/);
  });

  it('plans the reads: the sections involved and MSRs by index', () => {
    const plan = planEdits(['regs.rbx=1', 'msrs.0xc0000080=0x500', 'regs.rcx=2', 'msrs[0x10]=0'].map(parseSetEdit));
    expect(plan).toEqual({ sections: ['STATE_SECTION_REGS', 'STATE_SECTION_MSRS'], msrIndices: [0xc0000080, 0x10] });
    expect(planEdits(['msrs.EFER=0'].map(parseSetEdit)).msrIndices).toEqual([0xc0000080]);
    expect(planEdits(['msrs.SOME_VENDOR_MSR=0'].map(parseSetEdit)).msrIndices).toEqual([]);
  });

  it('applies edits through the schema and returns only the edited sections', () => {
    const state = sampleState().state as unknown as Record<string, unknown>;
    const out = applyEdits(
      state,
      [
        'regs.rbx=0x10',
        'regs.rax=18446744073709551615',
        'vcpu_events.nmi.pending=no',
        'debugregs.db[1]=0x1000',
        'mp_state.value=halted',
        'msrs.EFER=0xd01',
        'sregs.cs.selector=0x8',
        'cpuid2.entries[0].eax=0x16',
      ].map(parseSetEdit),
    );
    expect(Object.keys(out).sort()).toEqual(['cpuid2', 'debugregs', 'mpState', 'msrs', 'regs', 'sregs', 'vcpuEvents']);
    expect(out.regs).toMatchObject({ rbx: '16', rax: '18446744073709551615', rip: U64(0x1005) });
    expect((out.vcpuEvents as { nmi: { pending: boolean } }).nmi.pending).toBe(false);
    expect((out.debugregs as { db: string[] }).db).toEqual(['0', '4096', '0', '0']);
    expect((out.mpState as { value: string }).value).toBe('MP_STATE_HALTED');
    expect(out.msrs).toEqual({ entries: [{ index: 0xc0000080, data: String(0xd01), name: 'EFER' }] });
    expect((out.sregs as { cs: { selector: number } }).cs.selector).toBe(8);
    expect((out.cpuid2 as { entries: { eax: number }[] }).entries[0].eax).toBe(0x16);
  });

  it('rejects unknown fields, wrong types, out-of-range values and output-only fields', () => {
    const state = () => sampleState().state as unknown as Record<string, unknown>;
    const apply = (e: string) => () => applyEdits(state(), [parseSetEdit(e)]);
    expect(apply('regs.rzz=1')).toThrow(/Regs has no field 'rzz'/);
    expect(apply('regs.rbx=hello')).toThrow(/'hello' is not an integer/);
    expect(apply('regs.rbx=0x10000000000000000')).toThrow(/out of range for uint64/);
    expect(apply('sregs.cs.selector=0x100000000')).toThrow(/out of range for uint32/);
    expect(apply('sregs.cs=1')).toThrow(/cs is a message/);
    expect(apply('debugregs.db=1')).toThrow(/db is a list/);
    expect(apply('debugregs.db[9]=1')).toThrow(/out of range/);
    expect(apply('vcpu_events.nmi.pending=maybe')).toThrow(/not a boolean/);
    expect(apply('mp_state.value=sleepy')).toThrow(/not a value of MpState/);
    expect(apply('xsave.xstate_bv=1')).toThrow(/output only/);
    expect(apply('msrs.NO_SUCH_MSR=1')).toThrow(/no MSR named/);
    expect(apply('lapic.tpr=1')).toThrow(/no lapic section/);
  });

  it('adds an MSR the read did not return when it is named by index', () => {
    const out = applyEdits({ msrs: { entries: [], unreadableIndices: [] } }, [parseSetEdit('msrs.0x48=1')]);
    expect(out.msrs).toEqual({ entries: [{ index: 0x48, data: '1', name: '' }] });
  });
});

describe('VcpuState files', () => {
  it('the binary --out encoding round-trips through --in', () => {
    const state = sampleState().state!;
    const bytes = encodeVcpuState(state);
    const back = decodeVcpuState(bytes) as Record<string, Record<string, unknown>>;
    expect(Object.keys(back).sort()).toEqual(['cpuid2', 'debugregs', 'mpState', 'msrs', 'regs', 'sregs', 'tscKhz', 'vcpuEvents', 'xcrs', 'xsave']);
    expect(back.regs).toMatchObject({ rax: '18446744073709551615', rbx: '16', rip: String(0x1005) });
    expect(back.mpState).toMatchObject({ value: 'MP_STATE_RUNNABLE' });
    expect(Buffer.from(back.xsave.raw as Uint8Array)).toHaveLength(4096);
  });

  it('JSON input takes `state get --json` output, snake_case keys and base64 bytes; rejects unknown keys', () => {
    const fromGet = vcpuStateFromJson(JSON.parse(toJson(sampleState())));
    expect((fromGet.regs as Record<string, string>).rbx).toBe('16');
    expect(Buffer.from((fromGet.xsave as { raw: Uint8Array }).raw)).toHaveLength(4096);
    const snakeCase = vcpuStateFromJson({ regs: { rbx: '5' }, tsc_khz: { khz: 1000 }, mp_state: { value: 'MP_STATE_HALTED' } });
    expect(snakeCase).toEqual({ regs: { rbx: '5' }, tscKhz: { khz: 1000 }, mpState: { value: 'MP_STATE_HALTED' } });
    expect(() => vcpuStateFromJson({ regs: { rbz: '1' } })).toThrow(/rbz is not a field of Regs/);
    expect(() => vcpuStateFromJson({ nested: {} })).toThrow(/nested is not a field of VcpuState/);
  });
});

// ---------------------------------------------------------------------------------------------
// Errors

describe('error printer', () => {
  function clientError(e: unknown): grpc.ServiceError {
    const s = toServiceError(e);
    return Object.assign(new Error(`${s.code} ${grpc.status[s.code]}: ${s.details}`), {
      code: s.code,
      details: s.details ?? '',
      metadata: s.metadata ?? new grpc.Metadata(),
    });
  }

  it('prints code, reason, message and one line per violation', () => {
    const err = clientError(
      new VcpudError('invalid_argument', 'x', {
        violations: [
          { rule: 'common.size.min', field: 'memory_bytes', message: 'must be at least 4096' },
          { rule: 'vm.vcpus.min', field: 'vcpu_count', message: 'must be at least 1' },
        ],
      }),
    );
    expect(decodeStatusDetails(err.metadata)).toMatchObject({
      errorInfo: { reason: 'INVALID_REQUEST', domain: 'vcpud.dev', metadata: { rule: 'common.size.min', field: 'memory_bytes' } },
    });
    expect(formatError(err).split('\n')).toEqual([
      'vcpuctl: INVALID_ARGUMENT (INVALID_REQUEST): x',
      '  - memory_bytes: must be at least 4096 [common.size.min]',
      '  - vcpu_count: must be at least 1 [vm.vcpus.min]',
    ]);
    expect(errorJson(err)).toEqual({
      error: {
        code: grpc.status.INVALID_ARGUMENT,
        status: 'INVALID_ARGUMENT',
        message: 'x',
        reason: 'INVALID_REQUEST',
        domain: 'vcpud.dev',
        metadata: { rule: 'common.size.min', field: 'memory_bytes' },
        violations: [
          { field: 'memory_bytes', description: 'must be at least 4096', reason: 'common.size.min' },
          { field: 'vcpu_count', description: 'must be at least 1', reason: 'vm.vcpus.min' },
        ],
      },
    });
  });

  it('works without a details trailer', () => {
    const err = { code: grpc.status.UNAVAILABLE, details: 'No connection established', metadata: new grpc.Metadata() };
    expect(formatError(err)).toBe('vcpuctl: UNAVAILABLE: No connection established');
    expect(formatError(clientError(new VcpudError('not_found', 'no VM vm-9', { reason: 'VM_NOT_FOUND', field: 'vm_id' })))).toBe(
      'vcpuctl: NOT_FOUND (VM_NOT_FOUND): no VM vm-9',
    );
  });
});

// ---------------------------------------------------------------------------------------------
// run() against an in-process fake vcpud

describe('run() over a unix socket against a fake vcpud', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpuctl-'));
  const sock = path.join(dir, 'vcpud.sock');
  const server = new grpc.Server();
  const calls: { method: string; req: Record<string, unknown> }[] = [];
  let stateNow = sampleState().state!;
  const memory = Buffer.alloc(0x4000);

  const vm = (): Vm__Output => ({
    id: 'vm-1',
    name: 'fake',
    memoryBytes: String(memory.length),
    vcpus: [{ id: 0, runState: 'VCPU_RUN_STATE_RUNNING', stopReason: '', stopDetails: {}, exits: '3', exitCounts: {}, stopDescription: '' }],
    createTime: { seconds: '1700000000', nanos: 0 },
    nestedExposed: false,
    irqchip: true,
  });

  type Handler = (req: Record<string, unknown>) => object;
  const unary =
    (method: string, h: Handler): grpc.handleUnaryCall<Record<string, unknown>, object> =>
    (call, cb) => {
      calls.push({ method, req: call.request });
      if (call.request.vmId !== undefined && call.request.vmId !== 'vm-1') {
        const s = toServiceError(new VcpudError('not_found', `no VM ${call.request.vmId as string}`, { reason: 'VM_NOT_FOUND', field: 'vm_id' }));
        return cb(s as grpc.ServiceError);
      }
      try {
        cb(null, h(call.request));
      } catch (e) {
        cb(toServiceError(e) as grpc.ServiceError);
      }
    };

  beforeAll(async () => {
    const v1 = loadVcpudProto().vcpud.v1;
    server.addService(v1.VcpuStateService.service, {
      GetCapabilities: unary('GetCapabilities', () => sampleCaps()),
      GetState: unary('GetState', () => ({ state: stateNow, implicitlyPaused: false })),
      SetState: unary('SetState', (req) => {
        const st = req.state as Record<string, unknown>;
        if ((st.regs as Record<string, string> | null)?.rflags === '0')
          throw new VcpudError('invalid_argument', 'invalid state', {
            violations: [{ rule: 'regs.rflags.reserved1', field: 'state.regs.rflags', message: 'bit 1 must be set' }],
          });
        return {
          applied: Object.keys(st)
            .filter((k) => st[k] !== null)
            .map((k) => `STATE_SECTION_${k.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase()}`),
        };
      }),
      GetNestedState: unary('GetNestedState', () => ({
        nestedState: { raw: Buffer.from('nested!'), size: 7, format: 'NESTED_FORMAT_SVM', formatValue: 1, flags: 0x100, flagNames: ['GIF_SET'] },
      })),
      SetNestedState: unary('SetNestedState', () => ({})),
    });
    server.addService(v1.VmService.service, {
      CreateVm: unary('CreateVm', () => ({ vm: vm() })),
      GetVm: unary('GetVm', () => ({ vm: vm() })),
      ListVms: unary('ListVms', (req) => (req.pageToken ? { vms: [{ ...vm(), id: 'vm-2' }], nextPageToken: '' } : { vms: [vm()], nextPageToken: 'p2' })),
      DeleteVm: unary('DeleteVm', () => ({})),
      WriteMemory: unary('WriteMemory', (req) => {
        (req.data as Buffer).copy(memory, Number(req.guestPhysicalAddress));
        return {};
      }),
      LoadProgram: unary('LoadProgram', () => ({})),
      RunVm: unary('RunVm', () => ({ vm: vm() })),
      PauseVm: unary('PauseVm', () => ({ vm: vm() })),
      ResumeVm: unary('ResumeVm', () => ({ vm: vm() })),
      RunVcpu: unary('RunVcpu', () => ({ vcpu: vm().vcpus[0] })),
      PauseVcpu: unary('PauseVcpu', () => ({ vcpu: { ...vm().vcpus[0], runState: 'VCPU_RUN_STATE_PAUSED' } })),
      ResumeVcpu: unary('ResumeVcpu', () => ({ vcpu: vm().vcpus[0] })),
      ReadMemory: (call: grpc.ServerWritableStream<Record<string, unknown>, object>) => {
        calls.push({ method: 'ReadMemory', req: call.request });
        const start = Number(call.request.guestPhysicalAddress);
        const end = start + Number(call.request.length);
        for (let a = start; a < end; a += 16) call.write({ guestPhysicalAddress: String(a), data: memory.subarray(a, Math.min(a + 16, end)) });
        call.end();
      },
      StreamConsole: (call: grpc.ServerWritableStream<Record<string, unknown>, object>) => {
        calls.push({ method: 'StreamConsole', req: call.request });
        call.write({ stateChange: { vcpuId: 0, runState: 'VCPU_RUN_STATE_RUNNING', reason: '' } });
        call.write({ output: Buffer.from('hello\n') });
        call.write({ debug: { vcpuId: 0, value: '42', done: true } });
        call.write({ stateChange: { vcpuId: 0, runState: 'VCPU_RUN_STATE_STOPPED', reason: 'done' } });
        if (!call.request.fromStart) call.end();
      },
    });
    await new Promise<void>((resolve, reject) => server.bindAsync(`unix:${sock}`, grpc.ServerCredentials.createInsecure(), (e) => (e ? reject(e) : resolve())));
  });
  afterAll(async () => {
    await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
    fs.rmSync(dir, { recursive: true, force: true });
  });
  beforeEach(() => {
    calls.length = 0;
    stateNow = sampleState().state!;
  });

  const ctl = (...argv: string[]) => vcpuctl(['--server', `unix:${sock}`, ...argv], { cwd: dir });

  it('caps, human and --json', async () => {
    const human = await ctl('caps');
    expect(human).toMatchObject({ code: 0, stderr: '' });
    expect(human.stdout).toContain('nested: unsupported: kvm_intel.nested is off');
    const json = await ctl('caps', '--json');
    expect(JSON.parse(json.stdout)).toMatchObject({ kvmApiVersion: 12, vendor: 'VENDOR_INTEL' });
  });

  it('uses $VCPUD_ADDR when --server is absent', async () => {
    const r = await vcpuctl(['caps', '--json'], { env: { VCPUD_ADDR: `unix:${sock}` } });
    expect(r.code).toBe(0);
  });

  it('--server takes a plain socket path (no unix:)', async () => {
    expect(await vcpuctl(['--server', sock, 'caps', '--json'])).toMatchObject({ code: 0, stderr: '' });
    expect(await vcpuctl(['--server', `./${path.basename(sock)}`, 'caps', '--json'], { cwd: path.dirname(sock) })).toMatchObject({ code: 0, stderr: '' });
  });

  it('vm create / list (every page) / get / delete', async () => {
    const created = await ctl('vm', 'create', '--memory', '64Mi', '--vcpus', '2', '--name', 'n', '--expose-nested', '--no-irqchip');
    expect(created.code).toBe(0);
    expect(created.stdout).toMatch(/^id\s+vm-1$/m);
    expect(calls[0]).toEqual({
      method: 'CreateVm',
      req: expect.objectContaining({ memoryBytes: String(64 << 20), vcpuCount: 2, name: 'n', cpuidPolicy: { exposeNested: true }, noIrqchip: true }),
    });
    const list = await ctl('vm', 'list', '--json');
    expect(JSON.parse(list.stdout).vms.map((v: { id: string }) => v.id)).toEqual(['vm-1', 'vm-2']);
    expect((await ctl('vm', 'list')).stdout).toMatch(/^vm-2\s+fake\s+16 KiB\s+1\s+0:running/m);
    expect((await ctl('vm', 'get', 'vm-1')).stdout).toContain('irqchip  yes');
    expect(await ctl('vm', 'delete', 'vm-1')).toMatchObject({ code: 0, stdout: 'deleted vm-1\n' });
  });

  it('server errors print the rich status and exit 1', async () => {
    const r = await ctl('vm', 'get', 'vm-9');
    expect(r).toMatchObject({ code: 1, stdout: '', stderr: 'vcpuctl: NOT_FOUND (VM_NOT_FOUND): no VM vm-9\n' });
    const j = await ctl('--json', 'vm', 'get', 'vm-9');
    expect(JSON.parse(j.stdout)).toMatchObject({ error: { status: 'NOT_FOUND', reason: 'VM_NOT_FOUND', metadata: { field: 'vm_id' } } });
  });

  it('load, run, pause, resume', async () => {
    fs.writeFileSync(path.join(dir, 'prog.bin'), Buffer.from([0xf4]));
    expect(await ctl('load', 'vm-1', 'prog.bin', '--entry', '0x1000')).toMatchObject({ code: 0, stdout: 'loaded 1 bytes into vm-1 at 0x1000, entry 0x1000\n' });
    expect(calls[0].req).toMatchObject({ loadAddress: '4096', entry: '4096' });
    expect((await ctl('run', 'vm-1')).stdout).toMatch(/^0\s+running\s+-\s+3$/m);
    expect((await ctl('pause', 'vm-1', '--vcpu', '0')).stdout).toMatch(/^0\s+paused/m);
    expect(calls.map((c) => c.method)).toEqual(['LoadProgram', 'RunVm', 'PauseVcpu']);
  });

  it('state get with sections, --out, and state set --in / --json-in / --set', async () => {
    const got = await ctl(
      'state',
      'get',
      'vm-1',
      '--vcpu',
      '0',
      '--section',
      'regs',
      '--section',
      'msrs',
      '--msr',
      '0xc0000080',
      '--no-implicit-pause',
      '--out',
      'snap.bin',
    );
    expect(got.code).toBe(0);
    expect(calls[0].req).toMatchObject({
      vmId: 'vm-1',
      vcpuId: 0,
      sections: ['STATE_SECTION_REGS', 'STATE_SECTION_MSRS'],
      msrIndices: [0xc0000080],
      noImplicitPause: true,
    });
    expect(got.stdout).toBe(''); // with --out the file is the output (the README walkthrough shows nothing else)
    expect(got.stderr).toMatch(/^wrote \d+ bytes \(VcpuState: regs, sregs, /);
    calls.length = 0;

    const setIn = await ctl('state', 'set', 'vm-1', '--in', 'snap.bin');
    expect(setIn).toMatchObject({
      code: 0,
      stdout: expect.stringMatching(/^applied: regs, sregs, xsave, xcrs, msrs, vcpu_events, debugregs, mp_state, cpuid2, tsc_khz\n$/),
    });
    expect((calls[0].req.state as Record<string, Record<string, string>>).regs.rax).toBe('18446744073709551615');
    calls.length = 0;

    expect(await ctl('state', 'set', 'vm-1', '--in', 'snap.bin', '--section', 'regs,msrs')).toMatchObject({ code: 0, stdout: 'applied: regs, msrs\n' });
    calls.length = 0;

    fs.writeFileSync(path.join(dir, 'state.json'), (await ctl('state', 'get', 'vm-1', '--json')).stdout);
    calls.length = 0;
    expect(await ctl('state', 'set', 'vm-1', '--json-in', 'state.json', '--json')).toMatchObject({ code: 0 });
    expect(calls.map((c) => c.method)).toEqual(['SetState']);
    calls.length = 0;

    const edit = await ctl('state', 'set', 'vm-1', '--vcpu', '0', '--set', 'regs.rbx=0x20', '--set', 'msrs.0xc0000080=0xd01');
    expect(edit).toMatchObject({ code: 0, stdout: 'applied: regs, msrs\n' });
    expect(calls.map((c) => c.method)).toEqual(['GetState', 'SetState']);
    expect(calls[0].req).toMatchObject({ sections: ['STATE_SECTION_REGS', 'STATE_SECTION_MSRS'], msrIndices: [0xc0000080] });
    const sent = calls[1].req.state as Record<string, unknown>;
    expect(sent.regs).toMatchObject({ rbx: '32', rip: String(0x1005) });
    expect(sent.msrs).toMatchObject({ entries: [{ index: 0xc0000080, data: String(0xd01) }] });
    expect(sent.sregs).toBeNull();

    const bad = await ctl('state', 'set', 'vm-1', '--set', 'regs.rflags=0');
    expect(bad.code).toBe(1);
    expect(bad.stderr).toBe('vcpuctl: INVALID_ARGUMENT (INVALID_REQUEST): invalid state\n  - state.regs.rflags: bit 1 must be set [regs.rflags.reserved1]\n');
  });

  it('nested get --out, show, set --in', async () => {
    const got = await ctl('nested', 'get', 'vm-1', '--out', 'nested.bin');
    expect(got.code).toBe(0);
    expect(fs.readFileSync(path.join(dir, 'nested.bin')).toString()).toBe('nested!');
    expect((await ctl('nested', 'show', 'vm-1')).stdout).toContain('flags   0x100 (GIF_SET)');
    expect(await ctl('nested', 'set', 'vm-1', '--vcpu', '0', '--in', 'nested.bin')).toMatchObject({ code: 0, stdout: 'nested state set (7 bytes)\n' });
    expect(Buffer.from(calls[calls.length - 1].req.raw as Buffer).toString()).toBe('nested!');
  });

  it('mem write then mem read (hexdump, --out, --json)', async () => {
    fs.writeFileSync(path.join(dir, 'data.bin'), Buffer.from('vcpuctl was here'));
    expect(await ctl('mem', 'write', 'vm-1', '--gpa', '0x1000', '--in', 'data.bin')).toMatchObject({ code: 0, stdout: 'wrote 16 bytes at 0x1000\n' });
    const dump = await ctl('mem', 'read', 'vm-1', '--gpa', '0x1000', '--length', '32');
    expect(dump.stdout.split('\n')[0]).toBe('00001000  76 63 70 75 63 74 6c 20  77 61 73 20 68 65 72 65  |vcpuctl was here|');
    await ctl('mem', 'read', 'vm-1', '--gpa', '0x1000', '--length', '16', '--out', 'back.bin');
    expect(fs.readFileSync(path.join(dir, 'back.bin')).toString()).toBe('vcpuctl was here');
    const json = JSON.parse((await ctl('mem', 'read', 'vm-1', '--gpa', '4096', '--length', '0x10', '--json')).stdout);
    expect(Buffer.from(json.data, 'base64').toString()).toBe('vcpuctl was here');
  });

  it('--json prints Timestamps as RFC 3339 strings and Durations as "N.NNNs" (proto3 JSON)', async () => {
    const r = await ctl('--json', 'vm', 'get', 'vm-1');
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout).vm.createTime).toBe('2023-11-14T22:13:20Z');
    expect(timestampJson({ seconds: '1700000000', nanos: 5_000_000 })).toBe('2023-11-14T22:13:20.005Z');
    expect(durationJson({ seconds: '1', nanos: 500_000_000 })).toBe('1.500s');
    expect(durationJson({ seconds: '0', nanos: 87_472_851 })).toBe('0.087472851s');
    expect(durationJson({ seconds: '-2', nanos: -250_000 })).toBe('-2.000250s');
    expect(toJson({ duration: { seconds: '3', nanos: 0 }, other: { seconds: '3', nanos: 0 } })).toBe(
      JSON.stringify({ duration: '3s', other: { seconds: '3', nanos: 0 } }, null, 2),
    );
  });

  it('input files: an empty program and a directory are usage errors (exit 2) in words', async () => {
    fs.writeFileSync(path.join(dir, 'empty.bin'), '');
    expect(await ctl('load', 'vm-1', 'empty.bin')).toMatchObject({
      code: 2,
      stderr: expect.stringContaining('FILE empty.bin is empty: there is no program to load'),
    });
    for (const argv of [
      ['state', 'set', 'vm-1', '--in', '.'],
      ['snapshot', 'restore', '--in', '.'],
      ['load', 'vm-1', '.'],
    ]) {
      const r = await ctl(...argv);
      expect(r).toMatchObject({ code: 2, stderr: expect.stringContaining(' .: is a directory, not a file') });
      expect(r.stderr).not.toMatch(/EISDIR/);
    }
    expect(calls).toEqual([]);
  });

  it("state set --help's --set examples are consistent: every example parses, an MSR by name is the one by index", async () => {
    const help = (await ctl('state', 'set', '--help')).stdout;
    const examples = [...help.matchAll(/\b([a-z_0-9]+(?:\.[A-Za-z_0-9]+|\[\d+\])+=\S+?)(?=[ ,.]*(?:\s|$|\())/g)].map((m) => m[1]);
    expect(examples).toEqual(expect.arrayContaining(['mp_state.value=halted', 'msrs.0x174=0x8', 'msrs.SYSENTER_CS=0x8']));
    for (const e of examples) expect(() => parseSetEdit(e)).not.toThrow();
    expect(parseSetEdit('msrs.SYSENTER_CS=0x8').path).toEqual(parseSetEdit('msrs.0x174=0x8').path);
    // EFER is an sregs field: the help says so instead of offering msrs.EFER
    expect(help).not.toMatch(/msrs\.(EFER|0xc0000080)=/);
    expect(help).toMatch(/EFER.*sregs\.efer/s);
  });

  it('console: output on stdout, events on stderr; --json lines', async () => {
    const r = await ctl('console', 'vm-1');
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('hello\n');
    expect(r.stderr).toBe('[vcpu 0: running]\n');
    expect(calls[0].req).toMatchObject({ fromStart: true });

    const f = await ctl('console', 'vm-1', '--follow', '--until-done', '--json');
    expect(f.code).toBe(0);
    const lines = f.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    expect(lines).toEqual([
      { stateChange: { vcpuId: 0, runState: 'VCPU_RUN_STATE_RUNNING', reason: '', description: '' } },
      { output: Buffer.from('hello\n').toString('base64'), text: 'hello\n' },
      { debug: { vcpuId: 0, value: '42', done: true } },
      { stateChange: { vcpuId: 0, runState: 'VCPU_RUN_STATE_STOPPED', reason: 'done', description: '' } },
    ]);
    const h = await ctl('console', 'vm-1', '--follow', '--until-done');
    expect(h).toMatchObject({ code: 0, stdout: 'hello\n', stderr: '[vcpu 0: running]\n[vcpu 0: done 0x2a (42)]\n[vcpu 0: stopped (done)]\n' });
  });
});
