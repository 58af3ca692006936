/**
 * The public API cannot break by accident: `buf breaking` (FILE rules, buf.yaml) against
 * protos/v1-baseline.binpb, the v1 protos as they stood at fa57202 (built with
 * `buf build <checkout of fa57202> --exclude-source-info -o protos/v1-baseline.binpb`). Adding fields,
 * messages and RPCs passes; renumbering, renaming or removing fails. The baseline is committed, so the
 * check needs no git history. It only moves forward on purpose, in a commit that says why.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const root = path.resolve(__dirname, '..', '..');
const bufBin = path.join(root, 'node_modules', '.bin', 'buf');
const baseline = path.join(root, 'protos', 'v1-baseline.binpb');
const haveBuf = fs.existsSync(bufBin);
const bufTest = haveBuf ? test : test.skip;
if (!haveBuf) console.warn(`\n*** SKIPPING buf breaking: the buf binary is missing (${bufBin}); install @bufbuild/buf ***\n`);

const breaking = (cwd: string) => spawnSync(bufBin, ['breaking', '--against', baseline], { cwd, encoding: 'utf8', timeout: 120_000 });

/** A copy of the buf workspace (buf.yaml and protos/) with `edit` applied to vcpud/v1/vm.proto. */
function editedCopy(edit: (vmProto: string) => string): string {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-breaking-'));
  fs.copyFileSync(path.join(root, 'buf.yaml'), path.join(tmp, 'buf.yaml'));
  fs.cpSync(path.join(root, 'protos'), path.join(tmp, 'protos'), { recursive: true });
  const vm = path.join(tmp, 'protos', 'vcpud', 'v1', 'vm.proto');
  const before = fs.readFileSync(vm, 'utf8');
  const after = edit(before);
  expect(after).not.toBe(before); // the edit applied
  fs.writeFileSync(vm, after);
  return tmp;
}

bufTest('the protos are compatible with the v1 baseline', () => {
  const r = breaking(root);
  expect(r.error).toBeUndefined();
  expect(r.stdout + r.stderr).toBe('');
  expect(r.status).toBe(0);
});

bufTest('the check is live: a renumbered field fails it, an added field passes', () => {
  const renumbered = editedCopy((s) => s.replace(/(message CreateVmRequest \{[^}]*?string name = )1;/, '$199;'));
  const added = editedCopy((s) => s.replace(/(message CreateVmRequest \{)/, '$1\n  // Added in a test.\n  string added_in_a_test = 99;'));
  try {
    const broken = breaking(renumbered);
    expect(broken.status).not.toBe(0);
    expect(broken.stdout + broken.stderr).toMatch(/CreateVmRequest/);
    const extended = breaking(added);
    expect(extended.stdout + extended.stderr).toBe('');
    expect(extended.status).toBe(0);
  } finally {
    fs.rmSync(renumbered, { recursive: true, force: true });
    fs.rmSync(added, { recursive: true, force: true });
  }
});
