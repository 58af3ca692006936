/**
 * The one way vcpud compiles generated code. The hot codecs (the ffi struct readers and writers, the
 * proto conversion, the wire encoders) are generated as straight-line source per table, because every
 * property access then is a named load V8 can cache; walking a table per field cost more than the ioctls.
 * Callers build the body; this module names the function (profiles show `encode_regs`, not `anonymous`),
 * binds the values the body refers to, and compiles it.
 */

const IDENTIFIER = /^[A-Za-z_$][A-Za-z0-9_$]*$/;

/**
 * A function `name(params) { body }` whose body may refer to the keys of `scope` (bound to their values).
 * Names are checked, so a table entry can never inject source through them.
 */
export function compileFunction<F>(name: string, params: readonly string[], body: string, scope: Readonly<Record<string, unknown>> = {}): F {
  const names = Object.keys(scope);
  const ids = [name, ...params, ...names];
  for (const id of ids) if (!IDENTIFIER.test(id)) throw new Error(`codegen: '${id}' is not an identifier`);
  // One name may not shadow another: the body would silently see the wrong value.
  if (new Set(ids).size !== ids.length) throw new Error(`codegen: ${name}: a name is used twice in ${ids.join(', ')}`);
  // eslint-disable-next-line @typescript-eslint/no-implied-eval -- the one place generated source is compiled
  const make = new Function(...names, `return function ${name}(${params.join(', ')}) {\n${body}\n};`) as (...values: unknown[]) => F;
  return make(...names.map((n) => scope[n]));
}

/** `build(key)` once per key object (a field table, a plan), then the same function for as long as the key lives. */
export function compiledPerKey<K extends object, F>(build: (key: K) => F): (key: K) => F {
  const cache = new WeakMap<K, F>();
  return (key) => {
    let f = cache.get(key);
    if (f === undefined) {
      f = build(key);
      cache.set(key, f);
    }
    return f;
  };
}
