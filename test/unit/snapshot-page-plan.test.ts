/**
 * PagePlan: a chain's layers composed page by page (the newest layer storing a page wins) and put
 * into real guest memory in maximal runs, each page once. No KVM needed.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native, type NativeGuestMemory } from '../../src/ffi/native';
import { PAGE_SIZE } from '../../src/vm/snapshot-format';
import { PagePlan, RunWriter } from '../../src/vm/snapshot-page-plan';

const PAGES = 64;

describe('PagePlan', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vcpud-page-plan-'));
  const layers = ['base', 'child1', 'child2', 'child3'].map((name) => {
    const data = crypto.randomBytes(PAGES * PAGE_SIZE);
    fs.writeFileSync(path.join(dir, name), data);
    return { data, fd: fs.openSync(path.join(dir, name), 'r') };
  });
  const memories: NativeGuestMemory[] = [];
  afterAll(() => {
    for (const m of memories) m.release();
    for (const l of layers) fs.closeSync(l.fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('takes each page from the newest layer storing it, once, in maximal runs, and settles done', async () => {
    const plan = new PagePlan(PAGES);
    const [base, c1, c2, c3] = layers.map((l) => plan.addLayer(l.fd));
    // [layer, first guest page, count, file page]; the base stores pages 0..47 (48..63 stay zero)
    const adds: [number, number, number, number][] = [
      [base, 0, 48, 0],
      [c1, 8, 20, 30], // pages 8..27
      [c2, 40, 1, 5], // page 40 only in child 2
      [c3, 10, 4, 0], // 10..13 again, newer: replaces child 1's
      [c3, 14, 16, 4], // 14..29: continues the run above in guest memory and in the file
    ];
    for (const [id, first, count, filePage] of adds) plan.add(id, first, count, filePage * PAGE_SIZE);
    const want = Buffer.alloc(PAGES * PAGE_SIZE);
    for (const [id, first, count, filePage] of adds) layers[id - 1].data.copy(want, first * PAGE_SIZE, filePage * PAGE_SIZE, (filePage + count) * PAGE_SIZE);

    expect([...plan.runs()].map(([first, count, fd, off]) => [first, count, layers.findIndex((l) => l.fd === fd), off / PAGE_SIZE])).toEqual([
      [0, 8, 0, 0],
      [8, 2, 1, 30],
      [10, 20, 3, 0],
      [30, 10, 0, 30],
      [40, 1, 2, 5],
      [41, 7, 0, 41],
    ]);

    const memory = new native.GuestMemory(PAGES * PAGE_SIZE);
    memories.push(memory);
    const writer = new RunWriter(memory);
    let settled = false;
    plan.done.then(() => {
      settled = true;
    });
    plan.apply(writer);
    await plan.done;
    expect(settled).toBe(true);
    // Only the 20-page run of child 3 is long enough to map; each planned page counted once.
    expect({ mapped: writer.mappedBytes / PAGE_SIZE, copied: writer.copiedBytes / PAGE_SIZE }).toEqual({ mapped: 20, copied: 28 });
    const got = Buffer.alloc(PAGES * PAGE_SIZE);
    memory.read(0, got);
    for (let p = 0; p < PAGES; p++)
      expect({ p, same: got.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE).equals(want.subarray(p * PAGE_SIZE, (p + 1) * PAGE_SIZE)) }).toEqual({
        p,
        same: true,
      });
  });
});
