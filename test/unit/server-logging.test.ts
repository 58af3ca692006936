/** Structured logs: one JSON object per line, level filtering, child fields, errors made readable. */
import { createLogger, silentLogger } from '../../src/server/logging';
import { VcpudError } from '../../src/errors';

function capture(level?: 'debug' | 'info' | 'warn' | 'error') {
  const lines: string[] = [];
  const logger = createLogger({ level, sink: (l) => lines.push(l), now: () => new Date('2026-11-24T12:00:00.000Z') });
  return { logger, lines, records: () => lines.map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('one JSON object per line: time, level, msg first, then fields', () => {
  const { logger, lines } = capture();
  logger.info('listening', { api: 'unix:/run/vcpud.sock', port: 0 });
  expect(lines).toEqual(['{"time":"2026-11-24T12:00:00.000Z","level":"info","msg":"listening","api":"unix:/run/vcpud.sock","port":0}']);
});

test('level filtering (default info)', () => {
  const { logger, records } = capture();
  logger.debug('hidden');
  logger.info('a');
  logger.warn('b');
  logger.error('c');
  expect(records().map((r) => r.level)).toEqual(['info', 'warn', 'error']);
  expect(logger.enabled('debug')).toBe(false);
  const errorsOnly = capture('error');
  errorsOnly.logger.warn('no');
  errorsOnly.logger.error('yes');
  expect(errorsOnly.records().map((r) => r.msg)).toEqual(['yes']);
});

test('child loggers add fields; call fields win over child fields; reserved keys cannot be overwritten', () => {
  const { logger, records } = capture('debug');
  const req = logger.child({ request_id: 'r1', method: '/vcpud.v1.VmService/CreateVm' });
  req.child({ vm_id: 'vm-1' }).debug('created', { method: 'override', level: 'nope', msg: 'nope' });
  expect(records()[0]).toEqual({
    time: '2026-11-24T12:00:00.000Z',
    level: 'debug',
    msg: 'created',
    request_id: 'r1',
    method: 'override',
    vm_id: 'vm-1',
  });
  expect(req.level).toBe('debug');
});

test('errors, bigints and unserializable fields', () => {
  const { logger, records } = capture();
  logger.error('failed', { error: new VcpudError('not_found', 'no VM vm-9'), big: 2n ** 64n });
  expect(records()[0]).toMatchObject({ error: { name: 'VcpudError', message: 'no VM vm-9', kind: 'not_found' }, big: '18446744073709551616' });
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  logger.info('cycle', { cyclic });
  expect(records()[1]).toEqual({ time: '2026-11-24T12:00:00.000Z', level: 'info', msg: 'cycle', log_error: 'unserializable fields' });
});

test('silentLogger writes nothing', () => {
  const write = jest.spyOn(process.stderr, 'write');
  silentLogger().error('x');
  expect(write).not.toHaveBeenCalled();
  write.mockRestore();
});
