/**
 * The layers of src/: vcpuctl (src/cli) and the server share the API layer (src/api: generated types,
 * proto loading, error status details) and never each other, so the CLI does not pull in the server.
 * src/api stands alone below both. Type-only imports count: they tie one layer to another too.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { tsFiles, valueImports } from '../support/import-graph';

const SRC = path.join(__dirname, '../../src');

/** Every import from a file under `from` of a file under one of `forbidden`, as "importer -> imported" (relative to `root`). */
function crossings(root: string, from: string, forbidden: string[]): string[] {
  const inside = (file: string, dir: string) => !path.relative(path.join(root, dir), file).startsWith('..');
  return tsFiles(path.join(root, from)).flatMap((file) =>
    valueImports(file, { withTypes: true })
      .filter((target) => forbidden.some((dir) => inside(target, dir)))
      .map((target) => `${path.relative(root, file)} -> ${path.relative(root, target)}`),
  );
}

describe('layers', () => {
  it('src/cli imports nothing from src/server', () => {
    expect(crossings(SRC, 'cli', ['server'])).toEqual([]);
  });

  it('src/api imports nothing from src/server, src/cli or src/vm', () => {
    expect(crossings(SRC, 'api', ['server', 'cli', 'vm'])).toEqual([]);
  });

  it('the check sees type-only imports and re-exports', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'layers-'));
    try {
      for (const d of ['cli', 'server']) fs.mkdirSync(path.join(dir, d));
      fs.writeFileSync(path.join(dir, 'server', 's.ts'), 'export type S = number;\nexport const s = 1;\n');
      fs.writeFileSync(path.join(dir, 'cli', 'a.ts'), "import type { S } from '../server/s';\nexport const a: S = 1;\n");
      fs.writeFileSync(path.join(dir, 'cli', 'b.ts'), "export { s } from '../server/s';\n");
      fs.writeFileSync(path.join(dir, 'cli', 'c.ts'), "import { a } from './a';\nexport const c = a;\n");
      expect(crossings(dir, 'cli', ['server']).sort()).toEqual(['cli/a.ts -> server/s.ts', 'cli/b.ts -> server/s.ts']);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
