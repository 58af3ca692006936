/**
 * warmStateCodecs compiles every section codec ahead of use, so that a migration's first switch-over
 * (a state capture on the source, its decode and restore on the destination) compiles no code while
 * the guest is paused. Compilation is counted at its one entry point: codegen.ts's `new Function`.
 */
import { CPUID2, MSRS, SECTIONS, type Codec } from '../../src/ffi/sections';
import { warmStateCodecs } from '../../src/ffi/sections/warm-up';

/** How many functions `fn` compiles (codegen.ts compiles through the global Function constructor). */
function compilesDuring(fn: () => void): number {
  const real = globalThis.Function;
  let count = 0;
  globalThis.Function = new Proxy(real, {
    construct(target, args) {
      count++;
      return Reflect.construct(target, args);
    },
  });
  try {
    fn();
  } finally {
    globalThis.Function = real;
  }
  return count;
}

/** Every section decoded from and encoded back to its kernel bytes, the lists with two entries each. */
function roundTripEverySection(): void {
  for (const codec of Object.values(SECTIONS) as Codec<unknown>[]) {
    if (codec.name === MSRS.name || codec.name === CPUID2.name) continue;
    codec.encode(codec.decode(Buffer.alloc(codec.size)));
  }
  for (const list of [MSRS, CPUID2] as Codec<unknown>[]) {
    const bytes = Buffer.alloc((list as typeof MSRS).sizeFor(2));
    bytes.writeUInt32LE(2, 0); // the entry count
    list.encode(list.decode(bytes));
  }
}

it('compiles every section codec once: a state capture and restore after it compile nothing', () => {
  expect(compilesDuring(warmStateCodecs)).toBeGreaterThan(0);
  expect(compilesDuring(roundTripEverySection)).toBe(0);
  expect(compilesDuring(warmStateCodecs)).toBe(0);
});

it('without it, the first use of the codecs compiles them (what a first switch-over paid)', () => {
  jest.isolateModules(() => {
    const fresh = require('../../src/ffi/sections') as typeof import('../../src/ffi/sections');
    const regs = fresh.SECTIONS.regs as Codec<unknown>;
    expect(compilesDuring(() => regs.encode(regs.decode(Buffer.alloc(regs.size))))).toBeGreaterThan(0);
  });
});
