/**
 * Server reflection as a client we did not write sees it: a real vcpud, a reflection client loaded
 * from the reflection protos (not from vcpud's code), and @bufbuild/protobuf's file registry, a strict
 * descriptor pool (every `dependency` must resolve, every type reference must exist). A call is then
 * made with messages built ONLY from the reflected descriptors, as grpcurl does.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { create, createFileRegistry, fromBinary, toBinary, toJson, type DescMessage, type FileRegistry } from '@bufbuild/protobuf';
import { FileDescriptorProtoSchema, FileDescriptorSetSchema, type FileDescriptorProto } from '@bufbuild/protobuf/wkt';
import { describeKvm } from '../support/kvm';
import { startVcpud, type VcpudProcess } from '../support/vcpud-process';

/** A Python with grpcio and protobuf (Debian: python3-grpcio, python3-protobuf), for the optional Python client. */
const python = ['/usr/bin/python3', 'python3'].find((p) => spawnSync(p, ['-c', 'import grpc, google.protobuf'], { stdio: 'ignore' }).status === 0);
const pythonTest = python ? test : test.skip;
if (!python)
  console.warn('\n*** SKIPPING the Python reflection client: no python3 with grpc and protobuf (apt-get install python3-grpcio python3-protobuf) ***\n');

const reflectionProtos = path.join(path.dirname(require.resolve('@grpc/reflection/package.json')), 'build', 'proto');

interface Reflector {
  ask(request: object): Promise<Record<string, unknown>>;
  close(): void;
}

/** One ServerReflectionInfo stream of `version`; answers come in request order. */
function reflector(target: string, version: 'v1' | 'v1alpha'): Reflector {
  const def = protoLoader.loadSync(`grpc/reflection/${version}/reflection.proto`, { includeDirs: [reflectionProtos], keepCase: true, oneofs: true });
  const Ctor = grpc.makeClientConstructor(def[`grpc.reflection.${version}.ServerReflection`] as grpc.ServiceDefinition, 'ServerReflection');
  const client = new Ctor(target, grpc.credentials.createInsecure()) as grpc.Client & Record<string, Function>;
  const stream = client.ServerReflectionInfo() as grpc.ClientDuplexStream<object, Record<string, unknown>>;
  const waiting: ((m: Record<string, unknown>) => void)[] = [];
  stream.on('data', (m) => waiting.shift()?.(m));
  stream.on('error', () => {});
  return {
    ask: (request) => new Promise((resolve) => (waiting.push(resolve), stream.write(request))),
    close: () => (stream.end(), client.close()),
  };
}

function filesOf(answer: Record<string, unknown>): FileDescriptorProto[] {
  const r = answer.file_descriptor_response as { file_descriptor_proto: Buffer[] } | undefined;
  if (!r) throw new Error(`expected files, got ${JSON.stringify(answer.error_response)}`);
  return r.file_descriptor_proto.map((b) => fromBinary(FileDescriptorProtoSchema, b));
}

/**
 * A strict pool of `first` whose imports may only come from `available` (what one answer carried): the
 * registry throws on an import it does not hold yet ("Cannot find X, imported by Y") or an unknown type.
 * Files go in imports-first order (createFileRegistry's own resolver mis-orders shared imports).
 */
function strictRegistry(first: FileDescriptorProto, available: FileDescriptorProto[]): FileRegistry {
  const byName = new Map(available.map((f) => [f.name, f]));
  const ordered: FileDescriptorProto[] = [];
  const visit = (f: FileDescriptorProto | undefined) => {
    if (!f || ordered.includes(f)) return;
    for (const dep of f.dependency) visit(byName.get(dep));
    ordered.push(f);
  };
  visit(first);
  return createFileRegistry(create(FileDescriptorSetSchema, { file: ordered }));
}

describeKvm('server reflection from the real descriptors (real vcpud)', () => {
  let d: VcpudProcess;
  beforeAll(async () => {
    d = await startVcpud();
  });
  afterAll(async () => {
    await d?.stop();
  });

  for (const version of ['v1', 'v1alpha'] as const) {
    test(`${version}: every service, method type and file resolves in a strict pool, under its real name`, async () => {
      const r = reflector(d.serving.api, version);
      try {
        const listed = ((await r.ask({ list_services: '*' })).list_services_response as { service: { name: string }[] }).service.map((s) => s.name);
        expect(listed).toEqual(
          expect.arrayContaining(['vcpud.v1.VcpuStateService', 'vcpud.v1.VmService', 'vcpud.v1.SnapshotService', 'grpc.health.v1.Health']),
        );
        const seenFiles = new Map<string, FileDescriptorProto>();
        for (const service of listed) {
          const files = filesOf(await r.ask({ file_containing_symbol: service }));
          for (const f of files) seenFiles.set(f.name, f);
          const registry = strictRegistry(files[0], files);
          const desc = registry.getService(service);
          expect(desc?.typeName).toBe(service);
          for (const m of desc?.methods ?? []) {
            expect(registry.getMessage(m.input.typeName)).toBeDefined();
            expect(registry.getMessage(m.output.typeName)).toBeDefined();
          }
        }
        expect([...seenFiles.keys()]).toEqual(expect.arrayContaining(['vcpud/v1/state.proto', 'vcpud/v1/vm.proto', 'google/protobuf/timestamp.proto']));
        // No service names the error-detail files, but clients decoding status details fetch them by name.
        const errorFiles = ['google/rpc/status.proto', 'google/rpc/error_details.proto', 'vcpud/v1/errors.proto'];
        for (const name of [...seenFiles.keys(), ...errorFiles]) {
          const files = filesOf(await r.ask({ file_by_filename: name }));
          expect(files[0].name).toBe(name);
          expect(strictRegistry(files[0], files).getFile(name)).toBeDefined();
        }
        const missing = await r.ask({ file_by_filename: 'vcpud_v1.proto' });
        expect(missing.error_response).toMatchObject({ error_code: grpc.status.NOT_FOUND });
      } finally {
        r.close();
      }
    });
  }

  test('the descriptors are the protos: snake_case fields, FooEntry map entries, imports listed, comments kept', async () => {
    const r = reflector(d.serving.api, 'v1');
    try {
      const files = filesOf(await r.ask({ file_containing_symbol: 'vcpud.v1.Vcpu' }));
      const vm = files.find((f) => f.name === 'vcpud/v1/vm.proto');
      expect(vm?.dependency).toContain('google/protobuf/timestamp.proto');
      const vcpu = vm?.messageType.find((m) => m.name === 'Vcpu');
      const stopDetails = vcpu?.field.find((f) => f.name === 'stop_details');
      expect(stopDetails?.typeName).toBe('.vcpud.v1.Vcpu.StopDetailsEntry');
      expect(vcpu?.nestedType.find((n) => n.name === 'StopDetailsEntry')?.options?.mapEntry).toBe(true);
      const createVm = vm?.messageType.find((m) => m.name === 'CreateVmRequest');
      expect(createVm?.field.map((f) => f.name)).toEqual(expect.arrayContaining(['memory_bytes', 'vcpu_count']));
      const comments = vm?.sourceCodeInfo?.location.filter((l) => l.leadingComments) ?? [];
      expect(comments.length).toBeGreaterThan(10);
    } finally {
      r.close();
    }
  });

  for (const version of ['v1', 'v1alpha'] as const) {
    pythonTest(`${version}: a Python grpcio client with protobuf's strict C++ pool resolves everything and calls CreateVm/ListVms`, () => {
      const script = path.join(__dirname, '..', 'support', 'reflection_client.py');
      const r = spawnSync(python as string, [script, d.serving.api, version], { encoding: 'utf8', timeout: 60_000 });
      expect({ status: r.status, stderr: r.stderr }).toEqual({ status: 0, stderr: '' });
      const out = JSON.parse(r.stdout) as {
        services: string[];
        methods: number;
        files: string[];
        listed: string[];
        created: { create_time: string; memory_bytes: string };
      };
      expect(out.services).toEqual(expect.arrayContaining(['vcpud.v1.VmService', 'vcpud.v1.VcpuStateService', 'vcpud.v1.SnapshotService']));
      expect(out.methods).toBeGreaterThan(20);
      expect(out.files).toEqual(expect.arrayContaining(['vcpud/v1/state.proto', 'google/protobuf/duration.proto', 'google/rpc/error_details.proto']));
      expect(out.listed).toContain('from-python');
      expect(out.created).toMatchObject({ memory_bytes: String(2 << 20), create_time: expect.stringMatching(/^\d{4}-\d\d-\d\dT/) });
    });
  }

  test('a CreateVm and a ListVms built only from reflected descriptors', async () => {
    const r = reflector(d.serving.api, 'v1');
    let registry: FileRegistry;
    try {
      const files = filesOf(await r.ask({ file_containing_symbol: 'vcpud.v1.VmService' }));
      registry = strictRegistry(files[0], files);
    } finally {
      r.close();
    }
    const service = registry.getService('vcpud.v1.VmService')!;
    const client = new grpc.Client(d.serving.api, grpc.credentials.createInsecure());
    const unary = (method: string, init: Record<string, unknown>): Promise<Record<string, unknown>> => {
      const m = service.methods.find((x) => x.name === method)!;
      const [input, output]: DescMessage[] = [m.input, m.output];
      return new Promise((resolve, reject) =>
        client.makeUnaryRequest(
          `/${service.typeName}/${method}`,
          (req: Record<string, unknown>) => Buffer.from(toBinary(input, create(input, req))),
          (buf: Buffer) => toJson(output, fromBinary(output, buf), { registry }) as Record<string, unknown>,
          init,
          (err, res) => (err ? reject(err) : resolve(res!)),
        ),
      );
    };
    try {
      const created = (await unary('CreateVm', { name: 'reflected', memoryBytes: 2n * 1024n * 1024n, vcpuCount: 1 })) as {
        vm: { id: string; name: string; createTime: string };
      };
      expect(created.vm.name).toBe('reflected');
      expect(created.vm.createTime).toMatch(/^\d{4}-\d\d-\d\dT/); // google.protobuf.Timestamp resolved through the import
      const listed = (await unary('ListVms', {})) as { vms: { id: string; name: string }[] };
      expect(listed.vms).toEqual(expect.arrayContaining([expect.objectContaining({ id: created.vm.id, name: 'reflected' })]));
      await unary('DeleteVm', { vmId: created.vm.id });
    } finally {
      client.close();
    }
  });
});
