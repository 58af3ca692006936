/**
 * src/server/bound-histogram: a bound observer's observations give exactly the exposition prom-client's
 * own observe() gives for the same values: values on, between, below and above the bounds, several label
 * values interleaved, a reset() in the middle, and a non-finite value refused the same way.
 */
import { randomInt } from 'node:crypto';
import { Counter, Histogram, Registry } from 'prom-client';
import { boundIncrement, boundObservers } from '../../src/server/bound-histogram';

const BUCKETS = [1e-6, 2.5e-6, 1e-5, 1e-3, 0.5, 1];

function pair() {
  const make = () => {
    const registry = new Registry();
    const h = new Histogram({ name: 'x_seconds', help: 'x', labelNames: ['ioctl'], buckets: BUCKETS, registers: [registry] });
    return { registry, h };
  };
  return { plain: make(), bound: make() };
}

const values = (): number[] => [
  ...BUCKETS,
  ...BUCKETS.map((b) => b * 1.0001),
  ...BUCKETS.map((b) => b * 0.9999),
  0,
  -1,
  2,
  1e9,
  ...Array.from({ length: 200 }, () => Math.random() * 1.2),
];

describe('bound histogram observers', () => {
  test('the same exposition as prom-client observe(), across label values and a reset', async () => {
    const { plain, bound } = pair();
    const observer = boundObservers(bound.h, 'ioctl');
    const names = ['KVM_GET_REGS', 'KVM_GET_SREGS', 'KVM_GET_MSRS'];
    const feed = () => {
      for (const v of values()) {
        const name = names[randomInt(names.length)];
        plain.h.observe({ ioctl: name }, v);
        observer(name)(v);
      }
    };
    feed();
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
    plain.h.reset();
    bound.h.reset();
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
    feed();
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
  });

  test('a non-finite value is refused as prom-client refuses it, and counts nothing', async () => {
    const { plain, bound } = pair();
    const observe = boundObservers(bound.h, 'ioctl')('KVM_GET_REGS');
    plain.h.observe({ ioctl: 'KVM_GET_REGS' }, 1e-6);
    observe(1e-6);
    expect(() => plain.h.observe({ ioctl: 'KVM_GET_REGS' }, NaN)).toThrow(TypeError);
    expect(() => observe(NaN)).toThrow(TypeError);
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
  });

  test('bound counter increments give the exposition of prom-client inc(), across label sets and a reset', async () => {
    const make = () => {
      const registry = new Registry();
      return { registry, c: new Counter({ name: 'calls_total', help: 'x', labelNames: ['grpc_method', 'grpc_code'], registers: [registry] }) };
    };
    const plain = make();
    const bound = make();
    const sets = [
      { grpc_method: 'GetState', grpc_code: 'OK' },
      { grpc_method: 'GetState', grpc_code: 'NotFound' },
      { grpc_method: 'SetState', grpc_code: 'OK' },
    ];
    const incs = sets.map((l) => boundIncrement(bound.c, l));
    const feed = () => {
      for (let i = 0; i < 300; i++) {
        const k = randomInt(sets.length);
        plain.c.inc(sets[k]);
        incs[k]();
      }
    };
    feed();
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
    plain.c.reset();
    bound.c.reset();
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
    feed();
    expect(await bound.registry.metrics()).toBe(await plain.registry.metrics());
  });
});
