/**
 * The public API protos: they load with the options the server uses, declare the expected services, methods and
 * streaming kinds, pass `buf lint` / `buf format`, and match the checked-in generated types.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

const root = path.resolve(__dirname, '..', '..');
const protoDir = path.join(root, 'protos');
const generatedDir = path.join(root, 'src', 'api', 'generated');

/** The options the server passes to protoLoader.loadSync; scripts/gen-proto-types.sh generates types for them. */
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [protoDir],
};

function listFiles(dir: string, suffix: string): string[] {
  return fs
    .readdirSync(dir, { withFileTypes: true })
    .flatMap((e) => {
      const full = path.join(dir, e.name);
      return e.isDirectory() ? listFiles(full, suffix) : e.name.endsWith(suffix) ? [full] : [];
    })
    .sort();
}

const protoFiles = listFiles(protoDir, '.proto').map((f) => path.relative(protoDir, f));
const definition = protoLoader.loadSync(protoFiles, LOADER_OPTIONS);

type Kind = 'unary' | 'server_stream' | 'client_stream' | 'bidi';
/** protobufjs's camelCase, as proto-loader applies it with keepCase false. */
const camel = (snake: string) => snake.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());

const kindOf = (m: protoLoader.MethodDefinition<object, object>): Kind =>
  m.requestStream ? (m.responseStream ? 'bidi' : 'client_stream') : m.responseStream ? 'server_stream' : 'unary';

function service(name: string): protoLoader.ServiceDefinition {
  const def = definition[name];
  expect(def).toBeDefined();
  expect('format' in def).toBe(false); // message and enum definitions carry `format`; services do not
  return def as protoLoader.ServiceDefinition;
}

function methods(name: string): Record<string, Kind> {
  const svc = service(name);
  return Object.fromEntries(Object.entries(svc).map(([method, def]) => [method, kindOf(def)]));
}

interface FieldDescriptor {
  name: string;
  number: number;
  label: string;
  type: string;
  typeName?: string;
}
interface DescriptorProto {
  field: FieldDescriptor[];
  nestedType: (DescriptorProto & { name: string })[];
}
/** Fields of a message by full name; nested messages (A.B) are looked up in their parent's descriptor. */
function fields(typeName: string): Record<string, FieldDescriptor> {
  let def = definition[typeName] as protoLoader.MessageTypeDefinition<object, object> | undefined;
  let type: DescriptorProto | undefined;
  if (def) {
    expect(def.format).toBe('Protocol Buffer 3 DescriptorProto');
    type = def.type as DescriptorProto;
  } else {
    const parent = typeName.slice(0, typeName.lastIndexOf('.'));
    def = definition[parent] as protoLoader.MessageTypeDefinition<object, object>;
    const name = typeName.slice(parent.length + 1);
    type = (def?.type as DescriptorProto | undefined)?.nestedType.find((n) => n.name === name);
  }
  expect(type).toBeDefined();
  return Object.fromEntries((type as DescriptorProto).field.map((f) => [f.name, f]));
}
function enumValues(typeName: string): string[] {
  const def = definition[typeName] as protoLoader.EnumTypeDefinition;
  expect(def?.format).toBe('Protocol Buffer 3 EnumDescriptorProto');
  return (def.type as { value: { name: string }[] }).value.map((v) => v.name);
}

describe('protos', () => {
  test('the expected proto files exist', () => {
    expect(protoFiles).toEqual([
      'google/rpc/error_details.proto',
      'google/rpc/status.proto',
      'vcpud/v1/capabilities.proto',
      'vcpud/v1/common.proto',
      'vcpud/v1/errors.proto',
      'vcpud/v1/migration.proto',
      'vcpud/v1/nested.proto',
      'vcpud/v1/snapshot.proto',
      'vcpud/v1/state.proto',
      'vcpud/v1/vm.proto',
    ]);
  });

  test('VcpuStateService has the expected methods, all unary', () => {
    expect(methods('vcpud.v1.VcpuStateService')).toEqual({
      GetCapabilities: 'unary',
      GetState: 'unary',
      SetState: 'unary',
      GetNestedState: 'unary',
      SetNestedState: 'unary',
    });
    expect(service('vcpud.v1.VcpuStateService').GetState.path).toBe('/vcpud.v1.VcpuStateService/GetState');
  });

  test('VmService has the expected methods and streaming kinds', () => {
    expect(methods('vcpud.v1.VmService')).toEqual({
      CreateVm: 'unary',
      GetVm: 'unary',
      ListVms: 'unary',
      DeleteVm: 'unary',
      WriteMemory: 'unary',
      ReadMemory: 'server_stream',
      LoadProgram: 'unary',
      RunVm: 'unary',
      PauseVm: 'unary',
      ResumeVm: 'unary',
      RunVcpu: 'unary',
      PauseVcpu: 'unary',
      ResumeVcpu: 'unary',
      StreamConsole: 'server_stream',
    });
  });

  test('SnapshotService has the expected methods and streaming kinds', () => {
    expect(methods('vcpud.v1.SnapshotService')).toEqual({
      CreateSnapshot: 'server_stream',
      RestoreSnapshot: 'unary',
      RestoreSnapshotStream: 'client_stream',
      ListSnapshots: 'unary',
      DeleteSnapshot: 'unary',
      MergeSnapshot: 'unary',
      MigrateVm: 'server_stream',
    });
  });

  test('MigrationService has the expected methods, all unary', () => {
    expect(methods('vcpud.v1.MigrationService')).toEqual({
      PrepareIncomingMigration: 'unary',
      GetIncomingMigration: 'unary',
      AbortIncomingMigration: 'unary',
    });
  });

  test('grpc-js accepts the package definition and builds both service clients', () => {
    const pkg = grpc.loadPackageDefinition(definition) as unknown as {
      vcpud: { v1: Record<string, grpc.ServiceClientConstructor> };
    };
    expect(pkg.vcpud.v1.VcpuStateService.service).toBeDefined();
    expect(pkg.vcpud.v1.VmService.service).toBeDefined();
  });

  test('every StateSection has its VcpuState field, named after the value suffix', () => {
    const sections = enumValues('vcpud.v1.StateSection').filter((v) => v !== 'STATE_SECTION_UNSPECIFIED');
    expect(sections).toHaveLength(13);
    // STATE_SECTION_VCPU_EVENTS -> vcpu_events in the proto, vcpuEvents as loaded (keepCase false).
    const expected = sections.map((v) => camel(v.replace(/^STATE_SECTION_/, '').toLowerCase())).sort();
    expect(Object.keys(fields('vcpud.v1.VcpuState')).sort()).toEqual(expected);
  });

  test('vendored google.rpc types keep the public field numbers', () => {
    const numbers = (t: string) => Object.fromEntries(Object.values(fields(t)).map((f) => [f.name, f.number]));
    expect(numbers('google.rpc.Status')).toEqual({ code: 1, message: 2, details: 3 });
    expect(fields('google.rpc.Status').details.typeName).toMatch(/(^|\.)protobuf\.Any$/);
    expect(numbers('google.rpc.ErrorInfo')).toEqual({ reason: 1, domain: 2, metadata: 3 });
    expect(numbers('google.rpc.BadRequest')).toEqual({ fieldViolations: 1 });
    expect(numbers('google.rpc.BadRequest.FieldViolation')).toMatchObject({ field: 1, description: 2, reason: 3 });
    expect(numbers('google.rpc.PreconditionFailure.Violation')).toEqual({ type: 1, subject: 2, description: 3 });
    expect(numbers('google.rpc.ResourceInfo')).toEqual({
      resourceType: 1,
      resourceName: 2,
      owner: 3,
      description: 4,
    });
  });

  test('decoding applies the server options: camelCase, string longs and enums, defaults, oneofs', () => {
    const type = (definition['vcpud.v1.StreamConsoleResponse'] as protoLoader.MessageTypeDefinition<object, object>).type;
    expect(type).toBeDefined();
    // Round trip through grpc-js's own (de)serializers for a message with a oneof, an enum and a uint64.
    const pkg = grpc.loadPackageDefinition(definition) as unknown as {
      vcpud: { v1: { VmService: grpc.ServiceClientConstructor } };
    };
    const stream = pkg.vcpud.v1.VmService.service.StreamConsole;
    const bytes = stream.responseSerialize({ stateChange: { vcpuId: 3, runState: 'VCPU_RUN_STATE_STOPPED' } });
    const decoded = stream.responseDeserialize(bytes) as Record<string, unknown>;
    expect(decoded.event).toBe('stateChange');
    expect(decoded.stateChange).toEqual({ vcpuId: 3, runState: 'VCPU_RUN_STATE_STOPPED', reason: '', description: '' });
    expect(decoded.debug).toBeUndefined(); // unset oneof members are absent, not null, even with defaults
    expect(decoded.output).toBeUndefined();

    const read = pkg.vcpud.v1.VmService.service.ReadMemory;
    const chunk = read.responseDeserialize(read.responseSerialize({ guestPhysicalAddress: '18446744073709551615', data: Buffer.from([1, 2]) })) as {
      guestPhysicalAddress: unknown;
      data: Buffer;
    };
    expect(chunk.guestPhysicalAddress).toBe('18446744073709551615');
    expect([...chunk.data]).toEqual([1, 2]);
  });
});

describe('buf', () => {
  const bufBin = path.join(root, 'node_modules', '.bin', 'buf');
  const haveBuf = fs.existsSync(bufBin);
  const bufTest = haveBuf ? test : test.skip;
  if (!haveBuf) console.warn(`SKIPPING buf checks: the buf binary is missing (${bufBin}); install @bufbuild/buf`);

  const buf = (...args: string[]) => spawnSync(bufBin, args, { cwd: root, encoding: 'utf8', timeout: 120_000 });

  bufTest('buf lint (STANDARD + COMMENTS, google/ ignored) exits 0', () => {
    const r = buf('lint');
    expect(r.error).toBeUndefined();
    expect(r.stdout + r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  bufTest('buf format leaves the protos unchanged', () => {
    const r = buf('format', '--diff', '--exit-code');
    expect(r.error).toBeUndefined();
    expect(r.stdout).toBe('');
    expect(r.status).toBe(0);
  });
});

describe('generated types', () => {
  test('src/api/generated is what scripts/gen-proto-types.sh produces from the current protos', () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-gen-'));
    try {
      const r = spawnSync('bash', [path.join(root, 'scripts', 'gen-proto-types.sh'), tmp], {
        cwd: root,
        encoding: 'utf8',
        timeout: 120_000,
      });
      expect(r.status).toBe(0);
      const rel = (dir: string) => listFiles(dir, '.ts').map((f) => path.relative(dir, f));
      const expected = rel(tmp);
      expect(rel(generatedDir)).toEqual(expected);
      const stale = expected.filter((f) => fs.readFileSync(path.join(tmp, f), 'utf8') !== fs.readFileSync(path.join(generatedDir, f), 'utf8'));
      expect(stale).toEqual([]); // run scripts/gen-proto-types.sh
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});
