/**
 * native GuestMemory over a mapped file that is truncated under it (no KVM needed): every access
 * vcpud makes - read, write, scanPages and the page-list operations on the libuv pool - fails with
 * MEMORY_FAULT naming an offset inside the lost range instead of a SIGBUS that ends the process;
 * backingFiles() reports the truncation; a SIGBUS outside a guarded access still takes the default
 * action (the handler chains).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native, type NativeGuestMemory } from '../../src/ffi/native';
import { packageRoot } from '../../src/package';
import { thrownBy } from '../support/thrown';

const PAGE = 4096;
const MAPPED_AT = 16; // pages into the guest memory
const FILE_PAGES = 64;
const KEPT_PAGES = 32; // the file is truncated to this
const LOST = { from: (MAPPED_AT + KEPT_PAGES) * PAGE, to: (MAPPED_AT + FILE_PAGES) * PAGE };

function expectFault(e: unknown, op?: string) {
  expect(e).toMatchObject({ code: 'MEMORY_FAULT', ...(op ? { syscall: op } : {}) });
  const offset = (e as { offset: number }).offset;
  expect(offset).toBeGreaterThanOrEqual(LOST.from);
  expect(offset).toBeLessThan(LOST.to);
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a MEMORY_FAULT, the operation succeeded');
    },
    (e) => e,
  );
}

const thrown = (fn: () => unknown) => thrownBy(fn, 'expected a MEMORY_FAULT, the call succeeded');

describe('guest memory over a truncated mapped file', () => {
  let dir: string;
  let file: string;
  let fd: number;
  let mem: NativeGuestMemory;
  const allPages = Buffer.alloc(128 / 8, 0xff);

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-guard-'));
    file = path.join(dir, 'backing');
    fs.writeFileSync(file, Buffer.alloc(FILE_PAGES * PAGE, 0xab));
    fd = fs.openSync(file, 'r');
    mem = new native.GuestMemory(128 * PAGE);
    mem.mapFile(MAPPED_AT * PAGE, FILE_PAGES * PAGE, fd, 0);
    const before = Buffer.alloc(FILE_PAGES * PAGE);
    mem.read(MAPPED_AT * PAGE, before); // every page present before the truncation
    expect(before.every((b) => b === 0xab)).toBe(true);
    fs.truncateSync(file, KEPT_PAGES * PAGE);
  });
  afterEach(() => {
    mem.release();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('read and write of a lost page throw MEMORY_FAULT; pages the file still has work', () => {
    expectFault(
      thrown(() => mem.read(LOST.from, Buffer.alloc(PAGE))),
      'GuestMemory.read',
    );
    expectFault(
      thrown(() => mem.read(LOST.from - PAGE, Buffer.alloc(3 * PAGE))),
      'GuestMemory.read',
    );
    expectFault(
      thrown(() => mem.write(LOST.from + 5, Buffer.alloc(8, 1))),
      'GuestMemory.write',
    );
    const kept = Buffer.alloc(PAGE);
    mem.read(LOST.from - PAGE, kept);
    expect(kept.every((b) => b === 0xab)).toBe(true);
    mem.write(0, Buffer.from('anonymous memory is unaffected'));
  });

  it('scanPages throws MEMORY_FAULT', () => {
    expectFault(
      thrown(() => mem.scanPages(0, 128)),
      'GuestMemory.scanPages',
    );
  });

  it('crc32cPages, copyPages and writePagesToFd (libuv pool) reject with MEMORY_FAULT', async () => {
    expectFault(await rejection(mem.crc32cPages(0, 128, allPages)), 'GuestMemory.crc32cPages');
    const out = Buffer.alloc(128 * PAGE);
    expectFault(await rejection(mem.copyPages(0, 128, allPages, out)), 'GuestMemory.copyPages');
    const outFd = fs.openSync(path.join(dir, 'out'), 'w');
    try {
      expectFault(await rejection(mem.writePagesToFd(0, 128, allPages, outFd, 0)));
    } finally {
      fs.closeSync(outFd);
    }
  });

  it('writePages (a streamed restore writing into guest memory, libuv pool) rejects with MEMORY_FAULT', async () => {
    expectFault(await rejection(mem.writePages(0, 128, allPages, [Buffer.alloc(128 * PAGE, 1)])), 'GuestMemory.writePages');
  });

  it('packPages and applyFrames (live migration page frames, libuv pool) reject with MEMORY_FAULT', async () => {
    expectFault(await rejection(mem.packPages(allPages, 0, Buffer.alloc(132 * PAGE), { seq: 0 })), 'GuestMemory.packPages');
    // A frame of the lost pages, packed from anonymous memory, applied onto the truncated mapping.
    const src = new native.GuestMemory(128 * PAGE);
    try {
      src.write(LOST.from, Buffer.alloc(PAGE, 7));
      const only = Buffer.alloc(128 / 8);
      only[(LOST.from / PAGE) >> 3] |= 1 << ((LOST.from / PAGE) & 7);
      const out = Buffer.alloc(4 * PAGE);
      const packed = await src.packPages(only, 0, out, { seq: 0 });
      expect(packed.pages).toBe(1);
      expectFault(await rejection(mem.applyFrames(out.subarray(0, packed.bytes))), 'GuestMemory.applyFrames');
    } finally {
      src.release();
    }
  });

  it('backingFiles reports the file, its size now and the end the mapping needs', () => {
    const [b, ...more] = mem.backingFiles();
    expect(more).toEqual([]);
    expect(b).toMatchObject({ path: file, mappedEnd: FILE_PAGES * PAGE, sizeAtMap: FILE_PAGES * PAGE, size: KEPT_PAGES * PAGE, links: 1 });
    expect(typeof b.mtimeNs).toBe('bigint');
  });

  it('a bounded race of truncation against copies on the pool never ends the process', async () => {
    const rounds = 200;
    let faulted = 0;
    let copied = 0;
    const out = Buffer.alloc(128 * PAGE);
    for (let i = 0; i < rounds; i++) {
      fs.truncateSync(file, i % 2 ? KEPT_PAGES * PAGE : FILE_PAGES * PAGE);
      const copy = mem.copyPages(0, 128, allPages, out).then(
        () => copied++,
        (e) => {
          expectFault(e);
          faulted++;
        },
      );
      fs.truncateSync(file, i % 2 ? FILE_PAGES * PAGE : KEPT_PAGES * PAGE);
      await copy;
    }
    // Which copies fault depends on the race; each one either completed or failed as designed.
    expect(faulted + copied).toBe(rounds);
    console.log(`truncation race: ${faulted} of ${rounds} copies faulted, ${copied} completed`);
  });
});

describe('the SIGBUS handler chains', () => {
  it('a SIGBUS that is not a guarded access still ends the process with SIGBUS', () => {
    const addon = path.join(packageRoot(), 'build', 'Release', 'vcpud_native.node');
    // A read installs the handler; a SIGBUS sent with kill is not a fault of a guarded access.
    const script = `const n = require(${JSON.stringify(addon)}); const m = new n.GuestMemory(4096); m.read(0, Buffer.alloc(8)); process.kill(process.pid, 'SIGBUS'); setTimeout(() => {}, 2000);`;
    const r = spawnSync(process.execPath, ['-e', script], { timeout: 10_000 });
    expect(r.signal).toBe('SIGBUS');
  });
});
