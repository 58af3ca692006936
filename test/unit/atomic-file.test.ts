/**
 * The one atomic file writer (src/vm/atomic-file.ts), as the restart handover uses it (writeFileAtomic):
 * the file appears whole or not at all, replaces what was there, leaves no temporary file behind, and
 * is not steered by a name planted where a temporary file might go. The snapshot sink's use of the same
 * writer (hidden temporary name, link(2) without replace) is in snapshot-store.test.ts. No KVM needed.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AtomicFile, isStaleTemp, isTempName, writeFileAtomic } from '../../src/vm/atomic-file';

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

describe('isStaleTemp (whose temporary file is it)', () => {
  // An instance token of decimal digits only (about 1 in 43 draws) also fits the older
  // `.NAME.PID.INSTANCE.vcpud-tmp` shape; read that way, the live writer's file looks like that of
  // pid 12345678, which does not exist, and a sweep removed it from under the writer.
  it('a live writer whose instance token is all digits keeps its file', () => {
    const live = `.z.snap.${process.ppid}.12345678.9abcdef0.vcpud-tmp`;
    expect(isTempName(live)).toBe(true);
    expect(isStaleTemp(live, Date.now())).toBe(false);
    expect(isStaleTemp('.z.snap.999999999.12345678.9abcdef0.vcpud-tmp', Date.now())).toBe(true);
  });

  it('names of both shapes, with dotted and digit-ending final names, are read by their last parts', () => {
    const now = Date.now();
    expect(isStaleTemp(`.a.12.snap.${process.ppid}.0123abcd.vcpud-tmp`, now)).toBe(false); // older shape, live pid
    expect(isStaleTemp('.a.12.snap.999999999.0123abcd.vcpud-tmp', now)).toBe(true);
    expect(isStaleTemp(`.v.1.2.${process.ppid}.00000001.00000002.vcpud-tmp`, now)).toBe(false);
    for (const name of ['.x.snap.vcpud-tmp', 'x.snap.123.0123abcd.vcpud-tmp', '.x.snap.123.0123ABCD.vcpud-tmp', '.x.snap.12a.0123abcd.vcpud-tmp'])
      expect(isTempName(name)).toBe(false);
  });
});
