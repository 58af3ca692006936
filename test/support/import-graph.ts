/**
 * The runtime import graph of TypeScript sources, read with the compiler's parser: an edge for every
 * import or re-export that survives compilation (type-only imports are erased, so they cannot form a
 * circle at load time).
 */
import fs from 'node:fs';
import path from 'node:path';
import ts from 'typescript';

/**
 * Relative value imports of `file`, resolved to .ts files (index.ts for folders); with `withTypes` the
 * type-only ones too (what a layering rule counts: a type import still ties one layer to another).
 */
export function valueImports(file: string, { withTypes = false }: { withTypes?: boolean } = {}): string[] {
  const source = ts.createSourceFile(file, fs.readFileSync(file, 'utf8'), ts.ScriptTarget.ES2022, false);
  const out: string[] = [];
  for (const node of source.statements) {
    let spec: ts.Expression | undefined;
    if (ts.isImportDeclaration(node)) {
      const clause = node.importClause;
      const erased =
        clause?.isTypeOnly ||
        (clause &&
          !clause.name &&
          clause.namedBindings &&
          ts.isNamedImports(clause.namedBindings) &&
          clause.namedBindings.elements.length > 0 &&
          clause.namedBindings.elements.every((e) => e.isTypeOnly));
      if (withTypes || !erased) spec = node.moduleSpecifier;
    } else if (ts.isExportDeclaration(node) && (withTypes || !node.isTypeOnly)) {
      spec = node.moduleSpecifier;
    }
    if (!spec || !ts.isStringLiteral(spec) || !spec.text.startsWith('.')) continue;
    const base = path.resolve(path.dirname(file), spec.text);
    const target = [`${base}.ts`, path.join(base, 'index.ts')].find((f) => fs.existsSync(f));
    if (target) out.push(target);
  }
  return out;
}

/** Every .ts file under `dir`. */
export function tsFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((d) => {
    const p = path.join(dir, d.name);
    return d.isDirectory() ? tsFiles(p) : d.name.endsWith('.ts') ? [p] : [];
  });
}

/** Every circle of value imports among the files under `dir`, each as a list of paths relative to `dir`. */
export function importCycles(dir: string): string[][] {
  const files = tsFiles(dir);
  const inside = new Set(files);
  const edges = new Map(files.map((f) => [f, valueImports(f).filter((t) => inside.has(t))]));
  const cycles: string[][] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (f: string) => {
    state.set(f, 'open');
    stack.push(f);
    for (const t of edges.get(f) ?? []) {
      if (state.get(t) === 'open') cycles.push([...stack.slice(stack.indexOf(t)), t].map((p) => path.relative(dir, p)));
      else if (!state.has(t)) visit(t);
    }
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of files) if (!state.has(f)) visit(f);
  return cycles;
}
