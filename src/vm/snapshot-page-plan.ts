/**
 * The stored pages of a chain's file layers, composed before any is mapped: each guest page is
 * taken once, from the newest layer that stores it, and pages that follow each other both in guest
 * memory and in one file become one mapping. Mapping every layer over its parent instead remapped
 * every page a child replaced (an mmap over an mmap: unmap, split, map) and left overlapping
 * private ranges behind.
 */
import type { NativeGuestMemory } from '../ffi/native';
import { PAGE_SIZE } from './snapshot-format';

/** Runs of at least this many pages are mapped from the file; shorter ones are read (fewer VMAs). */
export const LAZY_MIN_PAGES = 16;

export class PagePlan {
  /** Per guest page: 1 + the index in `fds` of the newest layer storing it; 0 = none (the page stays zero). */
  private readonly layer: Uint16Array;
  /**
   * Per guest page: its offset in that layer's file, in pages, minus its own page number; constant
   * along a run, so that both arrays are set with fill() and a change of either ends a mapping
   * (snapshot files stay far below the 8 TiB an Int32 of pages spans).
   */
  private readonly fileShift: Int32Array;
  private readonly fds: number[] = [];
  private settleDone!: () => void;
  /** Settles once the plan is applied or abandoned: the layers' files may be closed then. */
  readonly done = new Promise<void>((resolve) => {
    this.settleDone = resolve;
  });

  constructor(readonly pages: number) {
    this.layer = new Uint16Array(pages);
    this.fileShift = new Int32Array(pages);
  }

  /** A newer layer than every one added before (a child after its parent); returns its id for add(). */
  addLayer(fd: number): number {
    this.fds.push(fd);
    return this.fds.length;
  }

  /** Layer `id` stores pages [firstPage, +count) at fileOffset (page-aligned) on: they replace older layers'. */
  add(id: number, firstPage: number, count: number, fileOffset: number): void {
    this.layer.fill(id, firstPage, firstPage + count);
    this.fileShift.fill(fileOffset / PAGE_SIZE - firstPage, firstPage, firstPage + count);
  }

  /** Each page's newest copy as maximal runs: [first guest page, count, fd, file offset]. */
  *runs(): Generator<[number, number, number, number]> {
    const { layer, fileShift } = this;
    for (let p = 0; p < this.pages; ) {
      const id = layer[p];
      if (!id) {
        p++;
        continue;
      }
      let end = p + 1;
      while (end < this.pages && layer[end] === id && fileShift[end] === fileShift[p]) end++;
      yield [p, end - p, this.fds[id - 1], (fileShift[p] + p) * PAGE_SIZE];
      p = end;
    }
  }

  /** Puts every planned page into memory through `into`, then settles `done`. */
  apply(into: RunWriter): void {
    try {
      for (const [first, count, fd, fileOffset] of this.runs()) into.put(first * PAGE_SIZE, count * PAGE_SIZE, fd, fileOffset);
    } finally {
      this.settle();
    }
  }

  /** Nothing (more) will be applied: the layers' files may be closed. */
  settle(): void {
    this.settleDone();
  }
}

/** Puts file runs into guest memory: maps runs of LAZY_MIN_PAGES or more, reads shorter ones; counts both. */
export class RunWriter {
  mappedBytes = 0;
  copiedBytes = 0;
  private canMap = true;

  constructor(private readonly memory: NativeGuestMemory) {}

  put(at: number, bytes: number, fd: number, fileOffset: number): void {
    if (bytes >= LAZY_MIN_PAGES * PAGE_SIZE && this.canMap) {
      try {
        this.memory.mapFile(at, bytes, fd, fileOffset);
        this.mappedBytes += bytes;
        return;
      } catch {
        this.canMap = false; // a file system without mmap support: read this run and every later one
      }
    }
    this.memory.readFromFd(at, bytes, fd, fileOffset);
    this.copiedBytes += bytes;
  }
}
