/**
 * src/ffi is a chain Kvm -> Vm -> Vcpu with the capability helpers in a leaf (caps.ts): no module
 * imports a value from a module that imports it back. A circle works under CommonJS only while every
 * use happens at call time; the first module-level use would see a half-initialised module.
 */
import fs from 'node:fs';
import path from 'node:path';
import { importCycles, valueImports } from '../support/import-graph';

const SRC = path.join(__dirname, '../../src');

describe('import graph', () => {
  it('src/ffi has no circle of value imports', () => {
    expect(importCycles(path.join(SRC, 'ffi'))).toEqual([]);
  });

  it('the checker sees a circle, and ignores type-only imports', () => {
    const dir = fs.mkdtempSync(path.join(require('node:os').tmpdir(), 'import-graph-'));
    try {
      fs.writeFileSync(path.join(dir, 'a.ts'), "import { b } from './b';\nexport const a = () => b;\n");
      fs.writeFileSync(path.join(dir, 'b.ts'), "import { a } from './a';\nexport const b = () => a;\n");
      fs.writeFileSync(path.join(dir, 'c.ts'), "import type { d } from './d';\nimport { type D } from './d';\nexport const c = 1;\n");
      fs.writeFileSync(path.join(dir, 'd.ts'), "import { c } from './c';\nexport type D = number;\nexport const d = c;\n");
      expect(importCycles(dir)).toEqual([['a.ts', 'b.ts', 'a.ts']]);
      expect(valueImports(path.join(dir, 'c.ts'))).toEqual([]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('kvm.ts, vm.ts and vcpu.ts form a chain', () => {
    const ffi = path.join(SRC, 'ffi');
    const deps = (f: string) => valueImports(path.join(ffi, f)).map((p) => path.relative(ffi, p));
    expect(deps('kvm.ts')).toContain('vm.ts');
    expect(deps('vm.ts')).toContain('vcpu.ts');
    expect(deps('vm.ts')).not.toContain('kvm.ts');
    expect(deps('vcpu.ts')).not.toContain('vm.ts');
    expect(deps('vcpu.ts')).not.toContain('kvm.ts');
    expect(deps('caps.ts').filter((d) => ['kvm.ts', 'vm.ts', 'vcpu.ts'].includes(d))).toEqual([]);
  });
});
