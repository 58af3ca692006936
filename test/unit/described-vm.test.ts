/**
 * MigrateVm's final report carries the VM as the destination described it in its COMMITTED message,
 * which comes off the wire: a description the response cannot serialize must not be passed on (it
 * would fail the report of a migration that succeeded); describedVm refuses it and the service asks
 * the destination with GetVm instead.
 */
import { vcpudServiceDefinitions } from '../../src/server/service-definitions';
import { describedVm } from '../../src/server/services/migration-service';

const serialize = (done: object) => vcpudServiceDefinitions().SnapshotService.MigrateVm.responseSerialize({ done });

describe('describedVm: the destination VM from the wire', () => {
  const good = {
    id: 'vm-7',
    name: 'web',
    memoryBytes: '1073741824',
    vcpus: [{ id: 0, status: 'VCPU_STATUS_RUNNING' }],
    createTime: { seconds: '1764900000', nanos: 5 },
    nestedExposed: false,
    irqchip: true,
  };

  test('a description of the Vm message passes through unchanged and serializes', () => {
    expect(describedVm(good)).toBe(good);
    expect(serialize({ destinationVm: good }).length).toBeGreaterThan(20);
  });

  test.each([
    ['not an object', 'vm-7'],
    ['null', null],
    ['no id', { name: 'web' }],
    ['a numeric id', { id: 7 }],
    ['vcpus not a list', { ...good, vcpus: 'two' }],
    ['a vCPU not an object', { ...good, vcpus: [3] }],
    ['create_time not an object', { ...good, createTime: 'yesterday' }],
  ])('%s is refused', (_what, vm) => {
    expect(describedVm(vm)).toBeUndefined();
  });

  test('what it refuses is what the response serializer throws on', () => {
    expect(() => serialize({ destinationVm: { ...good, vcpus: 'two' } })).toThrow();
  });
});
