/** What `fn` throws; fails the test (with `expected`) when it returns instead. */
export function thrownBy(fn: () => unknown, expected = 'expected the call to fail'): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  throw new Error(expected);
}
