/**
 * The descriptor set server reflection serves (scripts/build-descriptors.sh -> dist/src/descriptor-set.binpb):
 * the build output is current and reproducible, holds every proto under protos/ under its real name, and
 * every import of every file, so the index answers every file with all it needs.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { protoFiles } from '../../src/api/proto';
import { answerReflection, DescriptorIndex, descriptorSetPath, splitFileDescriptorSet } from '../../src/server/reflection';
import { FileDescriptorProto } from 'protobufjs/ext/descriptor';

const root = path.resolve(__dirname, '..', '..');

test('a fresh build gives the same bytes as dist/src/descriptor-set.binpb (current and reproducible)', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-descriptors-'));
  try {
    const out = path.join(tmp, 'set.binpb');
    const r = spawnSync('bash', [path.join(root, 'scripts', 'build-descriptors.sh'), out], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(Buffer.compare(fs.readFileSync(out), fs.readFileSync(descriptorSetPath()))).toBe(0);
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

test('every proto under protos/, health and reflection are in the set, with every import', () => {
  const files = splitFileDescriptorSet(fs.readFileSync(descriptorSetPath())).map(
    (b) => FileDescriptorProto.decode(b) as unknown as { name: string; dependency: string[] },
  );
  const names = files.map((f) => f.name);
  expect(names).toEqual(
    expect.arrayContaining([...protoFiles(), 'grpc/health/v1/health.proto', 'grpc/reflection/v1/reflection.proto', 'grpc/reflection/v1alpha/reflection.proto']),
  );
  expect(new Set(names).size).toBe(names.length);
  for (const f of files) for (const dep of f.dependency) expect({ file: f.name, dep, present: names.includes(dep) }).toMatchObject({ present: true });
  const index = new DescriptorIndex().add(splitFileDescriptorSet(fs.readFileSync(descriptorSetPath())));
  expect(index.fileOfSymbol('vcpud.v1.VcpuStateService.GetState')).toBe('vcpud/v1/state.proto');
  expect(index.fileOfSymbol('vcpud.v1.Vcpu.StopDetailsEntry')).toBe('vcpud/v1/vm.proto');
  expect(index.fileWithDependencies('vcpud/v1/snapshot.proto')?.length).toBeGreaterThan(3);
});

test('answers: services as given, a symbol or file by name with its imports, NOT_FOUND in error_response otherwise', () => {
  const index = new DescriptorIndex().add(splitFileDescriptorSet(fs.readFileSync(descriptorSetPath())));
  const ask = (req: object) => answerReflection(index, ['a.B'], { host: 'h', ...req }) as Record<string, any>;
  expect(ask({ message_request: 'list_services', list_services: '*' })).toMatchObject({
    valid_host: 'h',
    list_services_response: { service: [{ name: 'a.B' }] },
  });
  const names = (r: Record<string, any>) =>
    (r.file_descriptor_response.file_descriptor_proto as Uint8Array[]).map((b) => (FileDescriptorProto.decode(b) as unknown as { name: string }).name);
  expect(names(ask({ message_request: 'file_containing_symbol', file_containing_symbol: '.vcpud.v1.Vm.create_time' }))).toEqual([
    'vcpud/v1/vm.proto',
    'google/protobuf/timestamp.proto',
  ]);
  expect(names(ask({ message_request: 'file_containing_symbol', file_containing_symbol: 'vcpud.v1.VCPU_RUN_STATE_RUNNING' }))[0]).toBe('vcpud/v1/vm.proto');
  for (const req of [
    { message_request: 'file_containing_symbol', file_containing_symbol: 'vcpud.v1.Nope' },
    { message_request: 'file_by_filename', file_by_filename: 'vcpud_v1.proto' },
    { message_request: 'file_containing_extension', file_containing_extension: { containing_type: 'vcpud.v1.Vm', extension_number: 100 } },
    { message_request: 'all_extension_numbers_of_type', all_extension_numbers_of_type: 'vcpud.v1.Vm' },
  ])
    expect(ask(req).error_response).toMatchObject({ error_code: 5 }); // NOT_FOUND
});
