/**
 * The snapshot directory (src/vm/snapshot-store.ts) and the atomic file sink, with openat2 and with
 * the per-component O_NOFOLLOW walk: name confinement, FIFOs refused without blocking, paged listing,
 * stale temporary files anywhere under the directory, and the rename-exchange race (a child process
 * swapping a subdirectory and a symbolic link to an outside directory) finding nothing outside
 * touched. No KVM needed.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { VcpudError } from '../../src/errors';
import { hasOpenat2 } from '../../src/ffi/fs-at';
import { SnapshotStore } from '../../src/vm/snapshot-store';
import { tempNameFor } from '../../src/vm/atomic-file';
import { AtomicFileSink } from '../../src/vm/snapshot-writer';
import { escapeArena, swapLoop, VICTIM } from '../support/rename-exchange';

/** Rule id (or reason) an async call fails with; 'accepted' when it succeeds. */
async function rule(p: Promise<unknown>): Promise<string> {
  try {
    const r = await p;
    if (r && typeof (r as { close?: unknown }).close === 'function') await (r as { close(): Promise<void> }).close();
    else if (r && typeof (r as { fd?: unknown }).fd === 'number') fs.closeSync((r as { fd: number }).fd);
  } catch (e) {
    return (e as VcpudError).details?.violations?.[0]?.rule ?? (e as VcpudError).details?.reason ?? String(e);
  }
  return 'accepted';
}

async function writeSnapshotFile(store: SnapshotStore, name: string, bytes: string): Promise<void> {
  const target = await store.openForWrite(name, { replace: true });
  try {
    const sink = await AtomicFileSink.create(target);
    await sink.write(Buffer.from(bytes));
    await sink.finish();
  } finally {
    await target.close();
  }
}

const JUNK = `not a snapshot at all, clearly; long enough to read a header from: ${'x'.repeat(100)}`;

describe.each([
  ['openat2', true],
  ['per-component openat', false],
])('the snapshot directory (%s)', (_label, openat2) => {
  let root: string;
  let dir: string;
  let store: SnapshotStore;
  beforeAll(async () => {
    if (openat2 && !(await hasOpenat2())) throw new Error('this kernel has no openat2 (Linux 5.6+): the openat2 cases cannot run');
  });
  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-store-'));
    dir = path.join(root, 'snaps');
    store = new SnapshotStore(dir, { openat2 });
  });
  afterEach(() => fs.rmSync(root, { recursive: true, force: true }));

  test('names are relative paths inside it; subdirectories are created 0700', async () => {
    await writeSnapshotFile(store, 'nightly/web/1.snap', 'bytes');
    expect(fs.readFileSync(path.join(dir, 'nightly/web/1.snap'), 'utf8')).toBe('bytes');
    expect(fs.statSync(path.join(dir, 'nightly/web')).mode & 0o777).toBe(0o700);
  });

  test('absolute paths, "..", hidden, empty components, symbolic links and non-files are refused', async () => {
    fs.mkdirSync(path.join(root, 'outside'));
    fs.mkdirSync(path.join(dir, 'nightly'), { recursive: true });
    fs.symlinkSync(path.join(root, 'outside'), path.join(dir, 'out'));
    fs.symlinkSync('/etc/passwd', path.join(dir, 'passwd'));
    expect(await rule(store.openForWrite('/etc/x'))).toBe('snapshot.name.absolute');
    expect(await rule(store.openForWrite('../x'))).toBe('snapshot.name.traversal');
    expect(await rule(store.openForWrite('a/../../x'))).toBe('snapshot.name.traversal');
    expect(await rule(store.openForWrite('a//x'))).toBe('snapshot.name.component');
    expect(await rule(store.openForWrite('./x'))).toBe('snapshot.name.component');
    expect(await rule(store.openForWrite('.x.123.abcdef01.vcpud-tmp'))).toBe('snapshot.name.hidden');
    expect(await rule(store.openForWrite('out/x'))).toBe('snapshot.name.symlink');
    expect(await rule(store.openForRead('out/x'))).toBe('snapshot.name.symlink');
    expect(await rule(store.remove('out/x'))).toBe('snapshot.name.symlink');
    expect(await rule(store.openForRead('passwd'))).toBe('snapshot.name.symlink');
    expect(await rule(store.openForWrite('passwd'))).toBe('snapshot.name.symlink');
    expect(await rule(store.remove('passwd'))).toBe('snapshot.name.not_file');
    expect(await rule(store.openForWrite('a\0b'))).toBe('snapshot.name.nul');
    expect(await rule(store.openForWrite('nightly'))).toBe('snapshot.name.not_file');
    expect(await rule(store.openForRead('nightly'))).toBe('snapshot.name.not_file');
    expect(await rule(store.openForRead('missing/x'))).toBe('SNAPSHOT_NOT_FOUND');
    expect(await rule(store.openForRead('missing'))).toBe('SNAPSHOT_NOT_FOUND');
    expect(await rule(store.remove('missing'))).toBe('SNAPSHOT_NOT_FOUND');
    expect(fs.readdirSync(path.join(root, 'outside'))).toEqual([]);
    expect(fs.existsSync('/etc/passwd')).toBe(true);
  });

  test('a FIFO in place of a snapshot is refused at once (opened O_NONBLOCK, fstat says not regular)', async () => {
    fs.mkdirSync(dir);
    execFileSync('mkfifo', [path.join(dir, 'fifo.snap')]);
    const started = performance.now();
    await expect(store.openForRead('fifo.snap')).rejects.toMatchObject({ kind: 'invalid_argument', message: expect.stringMatching(/FIFO/) });
    const page = await store.list();
    expect(page.entries.map((e) => e.name)).toEqual([]); // not a snapshot file: not listed
    console.log(`FIFO refused in ${(performance.now() - started).toFixed(1)} ms`);
  });

  test('list: pages in byte order, a problem for unreadable headers; remove deletes', async () => {
    for (let i = 0; i < 25; i++) await writeSnapshotFile(store, i % 2 ? `sub/${String(i).padStart(2, '0')}.snap` : `${String(i).padStart(2, '0')}.snap`, JUNK);
    const seen: string[] = [];
    let token = '';
    let pages = 0;
    do {
      const page = await store.list(10, token);
      expect(page.entries.length).toBeLessThanOrEqual(10);
      for (const e of page.entries) expect(e.problem).toMatch(/not a vcpud snapshot/);
      seen.push(...page.entries.map((e) => e.name));
      token = page.nextPageToken;
      pages++;
    } while (token && pages < 10);
    expect(pages).toBe(3);
    expect(seen).toEqual([...seen].sort());
    expect(new Set(seen).size).toBe(25);
    await expect(store.list(10, 'bm90IGEgdG9rZW4')).rejects.toMatchObject({ kind: 'invalid_argument' });
    await expect(store.list(-1)).rejects.toMatchObject({ kind: 'invalid_argument' });
    await store.remove('sub/01.snap');
    expect(fs.existsSync(path.join(dir, 'sub/01.snap'))).toBe(false);
  });

  test('a tree deeper than any name can reach is cut off with a problem entry, not walked fd by fd', async () => {
    const levels = 520; // MAX_NAME_BYTES / 2 = 512 levels are reachable by a name
    const deep = path.join(dir, ...Array.from({ length: levels }, () => 'd'));
    fs.mkdirSync(deep, { recursive: true });
    fs.writeFileSync(path.join(deep, 'x.snap'), JUNK);
    const { entries } = await store.list();
    expect(entries).toHaveLength(1);
    expect(entries[0].name.split('/')).toHaveLength(512); // a file in it would have 513 components
    expect(entries[0].problem).toMatch(/deeper than 512 levels/);
  });

  test('the atomic sink writes under a hidden temporary name and renames on finish; abort leaves nothing', async () => {
    await writeSnapshotFile(store, 'atomic.snap', 'previous');
    const target = await store.openForWrite('atomic.snap', { replace: true });
    const sink = await AtomicFileSink.create(target);
    await sink.write(Buffer.from('new snapshot bytes'));
    expect(sink.tempName).toMatch(/^\.atomic\.snap\.\d+\.[0-9a-f]{8}\.[0-9a-f]{8}\.vcpud-tmp$/);
    expect(fs.readFileSync(path.join(dir, 'atomic.snap'), 'utf8')).toBe('previous');
    await sink.finish();
    expect(fs.readFileSync(path.join(dir, 'atomic.snap'), 'utf8')).toBe('new snapshot bytes');
    const aborted = await AtomicFileSink.create(target);
    await aborted.write(Buffer.from('half'));
    await aborted.abort();
    await target.close();
    await new Promise((r) => setTimeout(r, 50)); // the replaced snapshot's hidden link goes in the background
    expect(fs.readdirSync(dir)).toEqual(['atomic.snap']);
  });

  test('without replace: an existing name is refused up front, and of two writers past that check only the first to finish publishes', async () => {
    await writeSnapshotFile(store, 'taken.snap', 'previous');
    const exists = await store.openForWrite('taken.snap').then(
      () => undefined,
      (e: VcpudError) => e,
    );
    expect({ kind: exists?.kind, reason: exists?.details.reason, field: exists?.details.field }).toEqual({
      kind: 'already_exists',
      reason: 'SNAPSHOT_EXISTS',
      field: 'name',
    });
    const [first, second] = [await store.openForWrite('new.snap'), await store.openForWrite('new.snap')];
    const sinks = [await AtomicFileSink.create(first), await AtomicFileSink.create(second)];
    await sinks[0].write(Buffer.from('first'));
    await sinks[1].write(Buffer.from('second'));
    await sinks[0].finish();
    const lost = await sinks[1].finish().then(
      () => undefined,
      (e: VcpudError) => e,
    );
    expect(lost?.details.reason).toBe('SNAPSHOT_EXISTS');
    await Promise.all([first.close(), second.close()]);
    expect(fs.readFileSync(path.join(dir, 'new.snap'), 'utf8')).toBe('first');
    expect(fs.readdirSync(dir).sort()).toEqual(['new.snap', 'taken.snap']); // no temporary file left
  });

  test('a name vcpud writes prints as itself: control, format and other invisible characters are refused', async () => {
    for (const name of ['a\x1bb.snap', 'a\tb', 'a\u202eb', 'a\u200bb', 'dir\x7f/x.snap'])
      expect(await rule(store.openForWrite(name))).toBe('snapshot.name.characters');
    expect(await rule(store.openForWrite('ünïcode snap-1.snap'))).toBe('accepted');
  });

  test('temporary files of dead processes are removed anywhere under the directory, those of live ones kept', async () => {
    expect(await store.removeStaleTemps()).toEqual([]);
    expect(fs.existsSync(dir)).toBe(false); // the sweep at start does not create the directory
    fs.mkdirSync(path.join(dir, 'a/b'), { recursive: true });
    const dead = path.join(dir, 'a/b/.x.snap.999999999.0123abcd.vcpud-tmp'); // the name before instance tokens
    const deadNew = path.join(dir, 'a/.x2.snap.999999999.0123abcd.89abcdef.vcpud-tmp');
    const parent = path.join(dir, `a/b/.y.snap.${process.ppid}.0123abcd.89abcdef.vcpud-tmp`); // a live pid
    const ours = path.join(dir, tempNameFor('z.snap'));
    const crashed = path.join(dir, `a/.c.snap.${process.pid}.0123abcd.89abcdef.vcpud-tmp`); // our pid, another incarnation (PID 1 in a container)
    const writing = path.join(dir, `a/.w.snap.${process.pid}.fedcba98.89abcdef.vcpud-tmp`); // ... but written since we started: another pod's
    for (const f of [dead, deadNew, parent, ours, crashed, writing]) fs.writeFileSync(f, '');
    const before = new Date(performance.timeOrigin - 60_000);
    fs.utimesSync(crashed, before, before);
    expect((await store.removeStaleTemps()).sort()).toEqual([dead, deadNew, crashed].map((f) => path.basename(f)).sort());
    for (const f of [parent, ours, writing]) expect(fs.existsSync(f)).toBe(true);
  });

  test('rename-exchange race: a subdirectory swapped with a link to an outside directory never lets Delete or Create touch outside', async () => {
    const arena = escapeArena(dir, path.join(root, 'outside'), JUNK);
    const racer = swapLoop(arena.sub, arena.link, 3);
    const outcomes: Record<string, number> = {};
    const count = (k: string) => (outcomes[k] = (outcomes[k] ?? 0) + 1);
    for (let i = 0; i < 20_000 && racer.running(); i++) {
      const r = await rule(store.remove(`sub/${VICTIM}`));
      count(`delete ${r}`);
      if (r === 'accepted') arena.putBack();
      count(`create ${await rule(writeSnapshotFile(store, 'sub/new.snap', JUNK))}`);
    }
    const swaps = await racer.done;
    arena.close();
    console.log(`rename-exchange (${openat2 ? 'openat2' : 'per-component'}): ${swaps} swaps; outcomes ${JSON.stringify(outcomes)}`);
    expect(arena.outsideEntries()).toEqual([VICTIM]);
    expect(arena.outsideVictimIntact()).toBe(true);
    expect(outcomes['delete accepted']).toBeGreaterThan(0); // the race ran against real deletes
  }, 30_000);
});
