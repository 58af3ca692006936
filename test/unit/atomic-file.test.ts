/**
 * The one atomic file writer (src/vm/atomic-file.ts), as the restart handover uses it (writeFileAtomic):
 * the file appears whole or not at all, replaces what was there, leaves no temporary file behind, and
 * is not steered by a name planted where a temporary file might go. The snapshot sink's use of the same
 * writer (hidden temporary name, link(2) without replace) is in snapshot-store.test.ts. No KVM needed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AtomicFile, isTempName, writeFileAtomic } from '../../src/vm/atomic-file';

let dir: string;
beforeEach(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-atomic-'))));
afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Entries of `dir` once the background unlink of a replaced file's hidden link has run. */
async function settledEntries(): Promise<string[]> {
  for (let i = 0; i < 50 && fs.readdirSync(dir).some(isTempName); i++) await new Promise((r) => setTimeout(r, 10));
  return fs.readdirSync(dir).sort();
}

describe('writeFileAtomic (the handover files)', () => {
  it('writes a new file (mode 0600) and replaces an existing one, leaving no temporary file', async () => {
    await writeFileAtomic(dir, 'handover.manifest', Buffer.from('first'));
    expect(fs.readFileSync(path.join(dir, 'handover.manifest'), 'utf8')).toBe('first');
    expect(fs.statSync(path.join(dir, 'handover.manifest')).mode & 0o777).toBe(0o600);
    await writeFileAtomic(dir, 'handover.manifest', Buffer.from('second, longer'));
    expect(fs.readFileSync(path.join(dir, 'handover.manifest'), 'utf8')).toBe('second, longer');
    expect(await settledEntries()).toEqual(['handover.manifest']);
  });

  it('a symbolic link planted at a temporary-looking name (the old fixed NAME.tmp) is neither followed nor in the way', async () => {
    const outside = path.join(dir, 'outside');
    fs.writeFileSync(outside, 'untouched');
    fs.symlinkSync(outside, path.join(dir, 'vm-1.state.tmp'));
    await writeFileAtomic(dir, 'vm-1.state', Buffer.from('state bytes'));
    expect(fs.readFileSync(path.join(dir, 'vm-1.state'), 'utf8')).toBe('state bytes');
    expect(fs.readFileSync(outside, 'utf8')).toBe('untouched');
  });
});

describe('AtomicFile', () => {
  it('until commit the final name shows the previous file; abort removes the temporary file', async () => {
    fs.writeFileSync(path.join(dir, 'f'), 'previous');
    const dirFd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    try {
      const file = await AtomicFile.create({ dirFd, name: 'f', displayPath: path.join(dir, 'f'), replace: true });
      file.writeAt(Buffer.from('half'), 0);
      expect(fs.readFileSync(path.join(dir, 'f'), 'utf8')).toBe('previous');
      expect(fs.readdirSync(dir).filter(isTempName)).toEqual([file.tempName]);
      await file.abort();
      await file.abort(); // idempotent
      expect(fs.readdirSync(dir)).toEqual(['f']);
      expect(fs.readFileSync(path.join(dir, 'f'), 'utf8')).toBe('previous');
    } finally {
      fs.closeSync(dirFd);
    }
  });
});
