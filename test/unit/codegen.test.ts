/**
 * The one code-generation step behind every compiled codec (src/codegen.ts) and the one case conversion
 * (src/case.ts): tested here once, not per codec.
 */
import { camelCase, snakeCase } from '../../src/case';
import { compiledPerKey, compileFunction } from '../../src/codegen';

describe('compileFunction (every generated codec goes through it)', () => {
  test('compiles a function under the given name, with its parameters and the scope values bound', () => {
    const scale = (x: number) => x * 10;
    const f = compileFunction<(a: number, b: number) => number>('encode_regs', ['a', 'b'], 'return S(a) + b + K;', { S: scale, K: 7 });
    expect(f.name).toBe('encode_regs');
    expect(f.length).toBe(2);
    expect(f(3, 4)).toBe(41);
  });

  test('the body sees the scope object itself, so later additions (mutually recursive tables) are visible', () => {
    const table: Array<(n: number) => number> = [];
    table.push(compileFunction('down', ['n'], 'return n <= 0 ? 0 : 1 + T[0](n - 1);', { T: table }));
    expect(table[0](5)).toBe(5);
  });

  test('refuses a name that is not an identifier, or one name used twice', () => {
    expect(() => compileFunction('x(){}; evil', [], '')).toThrow("codegen: 'x(){}; evil' is not an identifier");
    expect(() => compileFunction('f', ['a b'], '')).toThrow("'a b' is not an identifier");
    expect(() => compileFunction('f', ['v'], 'return v;', { v: 1 })).toThrow('codegen: f: a name is used twice in f, v, v');
  });

  test('a syntax error in the generated body surfaces at compile time', () => {
    expect(() => compileFunction('broken', [], 'return {;')).toThrow(SyntaxError);
  });
});

describe('compiledPerKey', () => {
  test('builds once per key object and returns the same function after', () => {
    const built: object[] = [];
    const get = compiledPerKey((key: { n: number }) => {
      built.push(key);
      return () => key.n;
    });
    const a = { n: 1 };
    const b = { n: 1 };
    const fa = get(a);
    expect(get(a)).toBe(fa);
    expect(get(b)).not.toBe(fa);
    expect(fa()).toBe(1);
    expect(built).toEqual([a, b]);
    expect(built[0]).toBe(a);
  });
});

describe('snakeCase / camelCase (the one copy of each)', () => {
  test.each([
    ['apicBase', 'apic_base'],
    ['vcpuEvents', 'vcpu_events'],
    ['exitInfo1', 'exit_info1'],
    ['rax', 'rax'],
  ])('%s <-> %s', (camel, snake) => {
    expect(snakeCase(camel)).toBe(snake);
    expect(camelCase(snake)).toBe(camel);
  });

  test('camelCase also takes kebab-case and a digit after the separator, as users and protos write them', () => {
    expect(camelCase('mp-state')).toBe('mpState');
    expect(camelCase('exit_info_1')).toBe('exitInfo1');
  });
});
