// Guest RAM: an anonymous mapping owned by a JS object, or (constructed with a descriptor) a
// MAP_SHARED mapping of a file the caller sized (tmpfs/hugetlbfs: memory that outlives the process
// when the file stays linked). Its host address never reaches JS; reads and writes are
// bounds-checked copies.
//
// Snapshots work on it in whole pages: ScanPages finds the non-zero ones, and the page-list
// operations (CRC-32C, write to a file, copy out to Buffers and in from them) run on the libuv pool
// over the pages a bitmap selects. MapFile replaces a range with a private (copy-on-write) mapping of
// a snapshot file, so a restore maps memory lazily instead of reading it. While a pool operation
// runs the mapping stays alive: release() then only marks it released and the unmap happens when
// the last one finishes.
//
// Every access vcpud makes to the memory is guarded (memory_guard.h): a mapped file truncated or
// rewritten under the VM fails that access with a MEMORY_FAULT error instead of a SIGBUS that ends
// the process. The files mapped are kept open (a duplicate descriptor) so backingFiles() can say
// whether one changed since it was mapped, which rewrites that do not fault need.
#pragma once
#include <napi.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <ctime>
#include <vector>

#include "written_pages.h"

namespace vcpud {

constexpr size_t kPageSize = 4096;

// MADV_POPULATE_WRITE (Linux 5.14); older libc headers lack the name.
constexpr int kMadvPopulateWrite = 23;

// True when the 4 KiB page holds only zero bytes.
bool PageIsZero(const uint8_t* page);

class GuestMemory : public Napi::ObjectWrap<GuestMemory> {
 public:
  static void Register(Napi::Env env, Napi::Object exports);
  static GuestMemory* FromArg(const Napi::CallbackInfo& info, size_t i, const char* op);

  explicit GuestMemory(const Napi::CallbackInfo& info);
  ~GuestMemory() override;

  uint8_t* Base() const { return base_; }
  // Private anonymous memory (no shared file behind it).
  bool Anonymous() const { return sharedFd_ < 0; }
  size_t Size() const { return size_; }

  // Throws unless [offset, +pages) is whole pages inside the mapping and the bitmap covers them.
  void CheckPages(Napi::Env env, const char* op, uint64_t offset, uint64_t pages, size_t bitmapLen) const;

  void BeginBusy() { busy_++; }
  void EndBusy();

  // Per page of [offset, +pages): 1 when it may hold data, 0 when it is known zero without reading
  // it (never touched, or a hole of the shared file); empty when that cannot be known.
  std::vector<uint8_t> MayHoldData(uint64_t offset, uint64_t pages) const;
  // True when `page` of a shared file was never allocated, so it is zero and reading it would
  // allocate it (tmpfs, hugetlbfs). False when unknown, and always for anonymous memory (reading an
  // untouched anonymous page maps the shared zero page, allocating nothing).
  bool NeverAllocated(uint64_t page) const;

  // Every write vcpud makes into guest memory reports its range here (see written_pages.h).
  void MarkWritten(uint64_t offset, uint64_t len) { written_.Mark(offset, len); }

  // Pages whose latest copy failed its CRC in a tearable page frame (page_frames.h): they must
  // arrive again, intact, before the memory is used. Marks are kept per pass: those of the current
  // one, and older ones (closeTornPass ages them), which the pass after the one that tore them must
  // have cleared. Changed by frame tasks on the pool while the memory is busy with them, read by JS
  // between them.
  void MarkTorn(uint64_t page);
  void ClearTorn(uint64_t page) {
    torn_.Clear(page);
    tornOld_.Clear(page);
  }

 private:
  Napi::Value Read(const Napi::CallbackInfo& info);   // (offset, buffer): fills buffer
  Napi::Value Write(const Napi::CallbackInfo& info);  // (offset, buffer)
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  // (offset, pages) -> Buffer: bit i (LSB first) set when page i holds a non-zero byte.
  Napi::Value ScanPages(const Napi::CallbackInfo& info);
  // (offset, pages, bitmap) -> Promise<number>: CRC-32C of the selected pages, in order.
  Napi::Value Crc32cPages(const Napi::CallbackInfo& info);
  // (offset, pages, bitmap, fd, fileOffset) -> Promise<number>: writes the selected pages packed,
  // from fileOffset on, in large sequential pwrites, starting writeback as it goes; resolves to
  // their CRC-32C.
  Napi::Value WritePagesToFd(const Napi::CallbackInfo& info);
  // (offset, pages, bitmap, out) -> Promise<number>: copies the selected pages packed into `out`, a
  // Buffer or an array of Buffers filled in order (exactly their size in all); resolves to their
  // CRC-32C.
  Napi::Value CopyPages(const Napi::CallbackInfo& info);
  // (offset, pages, bitmap, data, exclusive?) -> Promise<number>: the reverse: `data` (a Buffer or
  // an array of Buffers, exactly the pages' size in all) into the selected pages; resolves to the
  // CRC-32C of the bytes written, read back from guest memory. `exclusive`: nothing else touches
  // these pages meanwhile, so fresh anonymous ones are filled by UFFDIO_COPY (missing_page_fill.h).
  Napi::Value WritePages(const Napi::CallbackInfo& info);
  // (offset, length, fd, fileOffset): MAP_PRIVATE | MAP_FIXED of the file over [offset, +length).
  Napi::Value MapFile(const Napi::CallbackInfo& info);
  // (offset, length, fd, fileOffset): pread into [offset, +length).
  Napi::Value ReadFromFd(const Napi::CallbackInfo& info);
  // () -> Promise<number>: with a shared file, pwrites the ranges MapFile replaced (private
  // copy-on-write mappings the file does not see) into the file at their own offsets, so the file
  // holds all of guest memory; resolves to the bytes written (0 without such ranges).
  Napi::Value PersistMapped(const Napi::CallbackInfo& info);
  // The pages of [offset, +pages) the shared file holds data for (SEEK_DATA): the others are holes,
  // zero without reading them. Empty on failure (then every page is read).
  std::vector<uint8_t> SharedDataPages(uint64_t offset, uint64_t pages) const;
  // The same for a hugetlbfs file (no SEEK_DATA there): the pages this process's mapping has (mincore).
  std::vector<uint8_t> MappedPages(uint64_t offset, uint64_t pages) const;
  // (offset, pages) -> Buffer: bit i (LSB first) clear when page i is known zero without reading it
  // (MayHoldData); every bit set when that cannot be known. Reads no guest memory.
  Napi::Value CandidatePages(const Napi::CallbackInfo& info);
  Napi::Buffer<uint8_t> PageBitmapFor(const Napi::CallbackInfo& info, const char* op, uint64_t* off, uint64_t* pages) const;
  // () -> [{path, mappedEnd, sizeAtMap, mtimeNsAtMap, size, mtimeNs, links}]: each file mapped, as
  // fstat sees it now and as it was when first mapped (mtimes as bigint ns). path is /proc's.
  Napi::Value BackingFiles(const Napi::CallbackInfo& info);

  struct BackingFile {
    int fd;  // a duplicate, kept open so fstat sees the inode the mapping uses
    dev_t dev;
    ino_t ino;
    off_t sizeAtMap;
    timespec mtimeAtMap;
    uint64_t mappedEnd;  // the file must be at least this long for every mapped page to exist
  };
  void TrackBacking(Napi::Env env, int fd, uint64_t mappedEnd);
  // (on): starts (clearing) or stops recording the pages vcpud writes.
  Napi::Value TrackWrites(const Napi::CallbackInfo& info);
  // (out): ORs the pages written since the last take into `out` (bit i = page i) and clears them.
  Napi::Value TakeWrittenPages(const Napi::CallbackInfo& info);
  // (offset, length, cancel?) -> Promise<number>: faults in [offset, +length) for writing on the pool
  // (defined in guest_memory_populate.cc); resolves to the bytes populated, rejects with the errno and
  // `offset` (where it stopped), ECANCELED once cancel[0] is set (seen between 64 MiB chunks).
  Napi::Value Populate(const Napi::CallbackInfo& info);
  // () -> {count, first?}: the pages marked torn (MarkTorn), of any pass, and the lowest of them.
  Napi::Value TornPages(const Napi::CallbackInfo& info);
  // () -> {count, first?}: the marks older than the current pass (still torn: the pass that just
  // ended did not carry them again), then ages the current pass's marks.
  Napi::Value CloseTornPass(const Napi::CallbackInfo& info);

  // A set of pages as a bitmap, allocated by its first Set (or Add).
  struct PageSet {
    std::vector<uint64_t> words;
    uint64_t count = 0;
    bool Has(uint64_t p) const { return count && (words[p / 64] >> (p % 64)) & 1; }
    void Set(uint64_t p, size_t pages);
    void Clear(uint64_t p) {
      if (!Has(p)) return;
      words[p / 64] &= ~(1ull << (p % 64));
      count--;
    }
    // Adds every page of `other` (a set over the same pages).
    void Add(const PageSet& other);
    // {count, first?} as a JS object.
    Napi::Object Describe(Napi::Env env) const;
  };
  // Page frames (page_frames.h; defined in page_frames.cc).
  // (bitmap, fromPage, out, {seq, framePages?}) -> Promise<{nextPage, bytes, pages, zeroPages, frames}>
  Napi::Value PackPages(const Napi::CallbackInfo& info);
  // (buf) -> Promise<{consumed, pages, zeroPages, frames, lastSeq}>
  Napi::Value ApplyFrames(const Napi::CallbackInfo& info);
  // (fd, bitmap, fromPage, staging, {seq, framePages?, toPage?, maxBytes?, end?, stallMs, cancel})
  //   -> Promise<{nextPage, bytes, pages, zeroPages, frames}>: packPages into `staging` and writes
  //   each fill to the socket fd, on the pool thread, until toPage or once maxBytes are written;
  //   having reached toPage, the end frame when `end`.
  Napi::Value SendFrames(const Napi::CallbackInfo& info);
  // (fd, prefix, {stallMs, cancel}) -> Promise<{prefixUsed, bytes, pages, zeroPages, frames, lastSeq}>:
  //   reads frames (first from `prefix`, then from the socket fd) straight into guest memory up to
  //   the end frame, each checked before its pages are read and its CRC after, on the pool thread.
  Napi::Value ReceiveFrames(const Napi::CallbackInfo& info);

  void CheckRange(Napi::Env env, const char* op, uint64_t offset, size_t len) const;
  void Unmap();

  static Napi::FunctionReference* ctor_;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
  int busy_ = 0;             // pool operations in flight (JS thread only)
  bool released_ = false;    // release() was called; the unmap waits for busy_ == 0
  bool fileBacked_ = false;  // some range maps a file: untouched pages are not zero
  int sharedFd_ = -1;        // a duplicate of the shared file's descriptor (file-backed memory)
  bool hugetlbfs_ = false;       // the shared file is on hugetlbfs
  bool hugetlbfsFresh_ = false;  // ... and had no pages when mapped: every page it has came through this mapping
  std::vector<std::pair<uint64_t, uint64_t>> privateRanges_;  // (offset, length) MapFile replaced
  std::vector<BackingFile> backing_;
  WrittenPages written_;
  PageSet torn_;     // torn in the current pass
  PageSet tornOld_;  // torn in an earlier pass, not carried again since
};

}  // namespace vcpud
