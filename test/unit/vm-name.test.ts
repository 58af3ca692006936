/** The VM name rule, and vcpuctl escaping what does not print as itself. */
import type { VcpudError } from '../../src/errors';
import { checkVmName, MAX_VM_NAME_BYTES } from '../../src/vm/vm-name';
import { formatVmList, keyValues, printable } from '../../src/cli/vcpuctl/format';

const refusal = (name: string, field = 'name') => {
  try {
    checkVmName(name, field);
  } catch (e) {
    return e as VcpudError;
  }
  return undefined;
};

describe('checkVmName', () => {
  it('accepts the empty name, DNS/Kubernetes names, Unicode letters and spaces, up to 253 bytes of UTF-8', () => {
    for (const ok of ['', 'web-1', 'nightly.web_1', 'Ünïcödé 名前 🚀', 'a'.repeat(MAX_VM_NAME_BYTES), `${'é'.repeat(126)}a`])
      expect(refusal(ok)).toBeUndefined();
  });

  it('refuses more than 253 bytes (counted in UTF-8, not characters), naming the field and the rule but not echoing the name', () => {
    for (const name of ['a'.repeat(MAX_VM_NAME_BYTES + 1), 'é'.repeat(127), 'x'.repeat(20 << 20)]) {
      const e = refusal(name, 'options.vm_name');
      expect(e?.kind).toBe('invalid_argument');
      expect(e?.details.violations).toEqual([expect.objectContaining({ rule: 'vm_name.length', field: 'options.vm_name' })]);
      expect(e?.message).toMatch(new RegExp(`^options.vm_name is ${Buffer.byteLength(name)} bytes of UTF-8; a VM name has at most 253$`));
    }
  });

  it.each([
    ['ESC (a terminal escape)', 'vm\x1b[2J', 'U+001B'],
    ['a newline', 'a\nb', 'U+000A'],
    ['DEL', 'a\x7f', 'U+007F'],
    ['a C1 control', 'a\u0085', 'U+0085'],
    ['RIGHT-TO-LEFT OVERRIDE', 'invoice\u202Egpj.exe', 'U+202E'],
    ['a bidi isolate', 'a\u2066b', 'U+2066'],
    ['ZERO WIDTH JOINER', 'a\u200Db', 'U+200D'],
    ['a BOM', '\uFEFFa', 'U+FEFF'],
    ['NO-BREAK SPACE', 'a\u00A0b', 'U+00A0'],
    ['LINE SEPARATOR', 'a\u2028b', 'U+2028'],
    ['a private-use character', 'a\uE000', 'U+E000'],
    ['a tab', 'a\tb', 'U+0009'],
  ])('refuses %s', (_what, name, cp) => {
    const e = refusal(name);
    expect(e?.details.violations?.[0]).toMatchObject({ rule: 'vm_name.characters', field: 'name' });
    expect(e?.message).toContain(cp);
  });
});

describe('vcpuctl prints strings from the server escaped', () => {
  it('control and bidi characters are escaped in tables and key/value lines; plain text is unchanged', () => {
    expect(printable('web-1 名前 🚀')).toBe('web-1 名前 🚀');
    expect(printable('a\x1b[2Jb\u202Ec\n\u{E0001}')).toBe('a\\x1b[2Jb\\u202ec\\x0a\\u{e0001}');
    const vm = { id: 'vm-1', name: 'evil\u202Etxt.exe\x1b]0;pwned\x07', memoryBytes: '2097152', vcpus: [], createTime: null };
    const out = formatVmList([vm as never]);
    expect(out).toContain('evil\\u202etxt.exe\\x1b]0;pwned\\x07');
    // biome-ignore lint/suspicious/noControlCharactersInRegex: the test asserts that no control character reaches the terminal
    expect(out).not.toMatch(/[\x00-\x08\x0b-\x1f\x7f\u202e]/);
    expect(keyValues([['name', 'a\rb']])).toEqual(['name  a\\x0db']);
  });
});
