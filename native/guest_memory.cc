#include "guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "crc32c.h"
#include "errors.h"
#include "ioctl_call.h"
#include "memory_guard.h"
#include "missing_page_fill.h"

namespace vcpud {

namespace {

constexpr size_t kPage = kPageSize;

struct Run {
  size_t offset;  // into the guest memory
  size_t length;
};

// Runs of consecutive selected pages, from `offset` on.
std::vector<Run> RunsOf(uint64_t offset, uint64_t pages, const uint8_t* bitmap) {
  std::vector<Run> runs;
  for (uint64_t i = 0; i < pages; i++) {
    if (!(bitmap[i / 8] & (1u << (i % 8)))) continue;
    size_t at = offset + i * kPage;
    if (!runs.empty() && runs.back().offset + runs.back().length == at)
      runs.back().length += kPage;
    else
      runs.push_back({at, kPage});
  }
  return runs;
}


// On failure *failedAt is where the write stopped: with EFAULT the source page that cannot be read
// (the kernel reports a lost page of a mapped file that way instead of a SIGBUS).
int WriteAll(int fd, const uint8_t* p, size_t len, uint64_t pos, const uint8_t** failedAt) {
  while (len) {
    ssize_t n = pwrite(fd, p, len, static_cast<off_t>(pos));
    if (n < 0) {
      if (errno == EINTR) continue;
      *failedAt = p;
      return errno;
    }
    if (n == 0) return EIO;
    p += n;
    pos += n;
    len -= n;
  }
  return 0;
}

int ReadAll(int fd, uint8_t* p, size_t len, uint64_t pos) {
  while (len) {
    ssize_t n = pread(fd, p, len, static_cast<off_t>(pos));
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return ENODATA;  // the file ends before the range does
    p += n;
    pos += n;
    len -= n;
  }
  return 0;
}

constexpr size_t kCopyBlock = 64 * 1024;

// A byte range of a JS Buffer (a piece of a page-list copy's outside end).
struct Piece {
  uint8_t* data;
  size_t length;
};

// Copies between the runs (guest memory) and the pieces (Buffers), in order, both sides holding the
// same number of bytes; returns the CRC-32C of the bytes copied, read where they landed. Into guest
// memory through `fill` when it is active (fresh pages: no zeroing, no fault each).
uint32_t CopyRuns(uint8_t* base, const std::vector<Run>& runs, const std::vector<Piece>& pieces, bool intoGuest, MissingPageFill* fill) {
  uint32_t crc = 0;
  size_t pi = 0, po = 0;
  uint8_t straddling[kPage];  // a page whose bytes lie in two pieces, joined for UFFDIO_COPY
  for (const Run& r : runs) {
    bool filled = intoGuest && fill->Active();
    // Pages about to be written are faulted in by one call rather than one fault each (about half
    // the cost of writing fresh memory). A hint: on a kernel without it the copy faults them in.
    if (intoGuest && !filled) madvise(base + r.offset, r.length, kMadvPopulateWrite);
    for (size_t ro = 0; ro < r.length;) {
      const Piece& piece = pieces[pi];
      // In blocks: a filled copy is checksummed by reading it back while it is still in cache.
      size_t n = std::min({r.length - ro, piece.length - po, kCopyBlock});
      uint8_t* guest = base + r.offset + ro;
      uint8_t* buf = piece.data + po;
      if (filled) {
        // Whole pages only: the block is cut at the piece's last whole page, or is the one page
        // that straddles the piece's end.
        if (n >= kPage) {
          n -= n % kPage;
          fill->Copy(guest, buf, n);
        } else {
          // Joined from this piece's tail and the next pieces' heads; they are consumed here.
          for (size_t got = 0; got < kPage;) {
            size_t take = std::min(kPage - got, pieces[pi].length - po);
            memcpy(straddling + got, pieces[pi].data + po, take);
            got += take;
            po += take;
            if (po == pieces[pi].length) pi++, po = 0;
          }
          fill->Copy(guest, straddling, kPage);
          crc = Crc32c(crc, guest, kPage);
          ro += kPage;
          continue;
        }
        crc = Crc32c(crc, guest, n);
      } else {
        // Checksummed as copied: the CRC describes the bytes that landed.
        crc = intoGuest ? Crc32cCopy(crc, guest, buf, n) : Crc32cCopy(crc, buf, guest, n);
      }
      ro += n;
      po += n;
      if (po == pieces[pi].length) {
        pi++;
        po = 0;
      }
    }
  }
  return crc;
}

// One page-list operation on the libuv pool; resolves to the CRC-32C of the pages it saw.
class PageTask : public Napi::AsyncWorker {
 public:
  // kCopyOut: pages -> pieces; kCopyIn: pieces -> pages.
  enum class Kind { kCrc, kWrite, kCopyOut, kCopyIn };

  PageTask(Napi::Env env, GuestMemory* mem, Napi::Object self, Kind kind, const char* op, std::vector<Run> runs)
      : Napi::AsyncWorker(env), mem_(mem), self_(Napi::Persistent(self)), kind_(kind), op_(op),
        runs_(std::move(runs)), deferred_(Napi::Promise::Deferred::New(env)) {
    mem_->BeginBusy();
  }

  void SetFile(int fd, uint64_t pos) {
    fd_ = fd;
    pos_ = pos;
  }
  // Each run is written at its own offset in the file instead of packed from pos.
  void SetFileInPlace(int fd) {
    fd_ = fd;
    inPlace_ = true;
  }
  // The Buffers stay referenced (alive) until the task is done.
  void SetPieces(const std::vector<Napi::Buffer<uint8_t>>& buffers) {
    for (const auto& b : buffers) {
      if (b.Length()) pieces_.push_back({b.Data(), b.Length()});
      refs_.push_back(Napi::Persistent(b.As<Napi::Object>()));
    }
  }
  // The caller vouches that nothing else touches the pages while the copy runs (memory being
  // restored, not yet any VM's): fresh pages may then be filled by UFFDIO_COPY.
  void SetExclusive() { exclusive_ = true; }
  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    uint8_t* base = mem_->Base();
    uintptr_t fault = 0;
    if (kind_ == Kind::kCopyOut || kind_ == Kind::kCopyIn) {
      // Registered (and unregistered when `fill` goes) outside the guard, which unwinds nothing.
      if (exclusive_ && mem_->Anonymous() && !runs_.empty())
        fill_.Begin(base + runs_.front().offset, runs_.back().offset + runs_.back().length - runs_.front().offset);
      if (!GuardedRun([](void* t) { static_cast<PageTask*>(t)->CopyGuarded(); }, this, &fault)) {
        fill_.End();
        return Faulted(base, fault);
      }
      fill_.End();
      if (kind_ == Kind::kCopyIn)
        for (const Run& r : runs_) mem_->MarkWritten(r.offset, r.length);
      return;
    }
    uint64_t pos = pos_;
    for (const Run& r : runs_) {
      const uint8_t* p = base + r.offset;
      if (inPlace_) pos = r.offset;
      if (!GuardedCrc32c(&crc_, p, r.length, &fault)) return Faulted(base, fault);
      if (kind_ == Kind::kCrc) continue;
      const uint8_t* failedAt = p;
      if ((err_ = WriteAll(fd_, p, r.length, pos, &failedAt)) == EFAULT)
        return Faulted(base, reinterpret_cast<uintptr_t>(failedAt));  // lost after the checksum read it
      if (err_) return;
      // Start writeback now so the final fsync has little left (a hint: errors are ignored).
      sync_file_range(fd_, static_cast<off_t>(pos), static_cast<off_t>(r.length), SYNC_FILE_RANGE_WRITE);
      pos += r.length;
    }
  }

  void CopyGuarded() { crc_ = CopyRuns(mem_->Base(), runs_, pieces_, kind_ == Kind::kCopyIn, &fill_); }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (faulted_) deferred_.Reject(MakeMemoryFaultError(env, op_, faultOffset_).Value());
    else if (err_) deferred_.Reject(MakeSysError(env, op_, err_).Value());
    else deferred_.Resolve(Napi::Number::New(env, crc_));
  }

 private:
  GuestMemory* mem_;
  Napi::ObjectReference self_;  // keeps the GuestMemory alive while the task runs
  Kind kind_;
  const char* op_;
  std::vector<Run> runs_;
  int fd_ = -1;
  uint64_t pos_ = 0;
  bool inPlace_ = false;
  bool exclusive_ = false;
  MissingPageFill fill_;
  std::vector<Piece> pieces_;
  std::vector<Napi::ObjectReference> refs_;
  uint32_t crc_ = 0;
  int err_ = 0;
  bool faulted_ = false;
  uint64_t faultOffset_ = 0;
  Napi::Promise::Deferred deferred_;

  void Faulted(const uint8_t* base, uintptr_t addr) {
    faulted_ = true;
    faultOffset_ = addr - reinterpret_cast<uintptr_t>(base);
  }
};

}  // namespace

bool PageIsZero(const uint8_t* p) {
  uint64_t first;
  memcpy(&first, p, sizeof first);
  if (first) return false;  // the common case for guest data: decided by the first word
  const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < kPage / 8; i += 8) {
    if (q[i] | q[i + 1] | q[i + 2] | q[i + 3] | q[i + 4] | q[i + 5] | q[i + 6] | q[i + 7]) return false;
  }
  return true;
}

Napi::FunctionReference* GuestMemory::ctor_ = nullptr;

void GuestMemory::Register(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "GuestMemory",
                                 {InstanceMethod("read", &GuestMemory::Read),
                                  InstanceMethod("write", &GuestMemory::Write),
                                  InstanceMethod("release", &GuestMemory::Release),
                                  InstanceMethod("scanPages", &GuestMemory::ScanPages),
                                  InstanceMethod("candidatePages", &GuestMemory::CandidatePages),
                                  InstanceMethod("crc32cPages", &GuestMemory::Crc32cPages),
                                  InstanceMethod("writePagesToFd", &GuestMemory::WritePagesToFd),
                                  InstanceMethod("copyPages", &GuestMemory::CopyPages),
                                  InstanceMethod("writePages", &GuestMemory::WritePages),
                                  InstanceMethod("mapFile", &GuestMemory::MapFile),
                                  InstanceMethod("readFromFd", &GuestMemory::ReadFromFd),
                                  InstanceMethod("persistMapped", &GuestMemory::PersistMapped),
                                  InstanceMethod("backingFiles", &GuestMemory::BackingFiles),
                                  InstanceMethod("trackWrites", &GuestMemory::TrackWrites),
                                  InstanceMethod("takeWrittenPages", &GuestMemory::TakeWrittenPages),
                                  InstanceMethod("tornPages", &GuestMemory::TornPages),
                                  InstanceMethod("closeTornPass", &GuestMemory::CloseTornPass),
                                  InstanceMethod("packPages", &GuestMemory::PackPages),
                                  InstanceMethod("applyFrames", &GuestMemory::ApplyFrames),
                                  InstanceMethod("sendFrames", &GuestMemory::SendFrames),
                                  InstanceMethod("receiveFrames", &GuestMemory::ReceiveFrames),
                                  InstanceMethod("populate", &GuestMemory::Populate),
                                  InstanceAccessor("size", &GuestMemory::GetSize, nullptr)});
  ctor_ = new Napi::FunctionReference(Napi::Persistent(f));
  exports.Set("GuestMemory", f);
}

GuestMemory* GuestMemory::FromArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (!info[i].IsObject() || !info[i].As<Napi::Object>().InstanceOf(ctor_->Value()))
    throw Napi::TypeError::New(info.Env(), std::string(op) + ": expected a GuestMemory");
  GuestMemory* m = ObjectWrap<GuestMemory>::Unwrap(info[i].As<Napi::Object>());
  if (!m->base_ || m->released_) throw Napi::Error::New(info.Env(), std::string(op) + ": guest memory was released");
  return m;
}

GuestMemory::GuestMemory(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GuestMemory>(info) {
  uint64_t size = U64Arg(info, 0, "GuestMemory", "size");
  if (size == 0 || size % kPage != 0)
    throw Napi::RangeError::New(info.Env(), "GuestMemory: size must be a non-zero multiple of 4096");
  int fd = -1;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    fd = FdArg(info, 1, "GuestMemory");
    // A file shorter than the mapping would SIGBUS on the first touch past its end.
    struct stat st;
    if (fstat(fd, &st) != 0) throw MakeSysError(info.Env(), "fstat", errno);
    if (static_cast<uint64_t>(st.st_size) < size)
      throw Napi::RangeError::New(info.Env(), "GuestMemory: the file is " + std::to_string(st.st_size) + " bytes, the memory " + std::to_string(size));
    // hugetlbfs answers SEEK_DATA with "all data"; a file that has no pages yet gets each one through
    // this mapping, so its page tables (mincore) say which exist. A file mapped with pages in it (a
    // restart's handover) has pages this mapping has not touched: then which hold data is unknown.
    struct statfs fs;
    hugetlbfs_ = fstatfs(fd, &fs) == 0 && static_cast<unsigned long>(fs.f_type) == HUGETLBFS_MAGIC;
    hugetlbfsFresh_ = hugetlbfs_ && st.st_blocks == 0;
    sharedFd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (sharedFd_ < 0) throw MakeSysError(info.Env(), "fcntl(F_DUPFD_CLOEXEC)", errno);
  }
  // NORESERVE: untouched guest pages cost nothing, so memory limits count what the guest may use.
  int flags = (fd < 0 ? MAP_PRIVATE | MAP_ANONYMOUS : MAP_SHARED) | MAP_NORESERVE;
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) {
    int err = errno;
    if (sharedFd_ >= 0) close(sharedFd_);
    sharedFd_ = -1;
    throw MakeSysError(info.Env(), "mmap", err);
  }
  base_ = static_cast<uint8_t*>(p);
  size_ = size;
  // A hint (tmpfs mounted huge=advise): 2 MiB pages make the mapping's teardown at exit, and with it
  // a restart's downtime, independent of the guest's size (BENCHMARKS.md, handover).
  if (sharedFd_ >= 0) madvise(base_, size_, MADV_HUGEPAGE);
}

GuestMemory::~GuestMemory() {
  busy_ = 0;
  Unmap();
}

// Unmapping a large populated mapping frees every page (1 GiB of 4 KiB pages: 250-380 ms here,
// BENCHMARKS.md), which would hold the JS thread (a migrated VM's source copy is deleted right
// before MigrateVm answers): a detached thread does it; nothing refers to the range any more.
static void UnmapOffThread(void* base, size_t size) {
  try {
    std::thread([base, size] { munmap(base, size); }).detach();
  } catch (const std::system_error&) {
    munmap(base, size);
  }
}

void GuestMemory::Unmap() {
  released_ = true;
  if (busy_ > 0) return;  // the last pool operation unmaps
  if (base_) UnmapOffThread(base_, size_);
  base_ = nullptr;
  for (const BackingFile& b : backing_) close(b.fd);
  backing_.clear();
  if (sharedFd_ >= 0) close(sharedFd_);
  sharedFd_ = -1;
}

void GuestMemory::EndBusy() {
  if (--busy_ == 0 && released_) Unmap();
}

void GuestMemory::CheckRange(Napi::Env env, const char* op, uint64_t offset, size_t len) const {
  if (!base_ || released_) throw Napi::Error::New(env, std::string(op) + ": guest memory was released");
  if (offset > size_ || len > size_ - offset)
    throw Napi::RangeError::New(env, std::string(op) + ": range [" + std::to_string(offset) + ", +" +
                                         std::to_string(len) + ") is outside the " +
                                         std::to_string(size_) + "-byte guest memory");
}

void GuestMemory::CheckPages(Napi::Env env, const char* op, uint64_t offset, uint64_t pages, size_t bitmapLen) const {
  if (offset % kPage) throw Napi::RangeError::New(env, std::string(op) + ": offset is not page-aligned");
  if (pages > size_ / kPage) throw Napi::RangeError::New(env, std::string(op) + ": too many pages");
  CheckRange(env, op, offset, pages * kPage);
  if (bitmapLen < (pages + 7) / 8)
    throw Napi::RangeError::New(env, std::string(op) + ": bitmap shorter than " + std::to_string(pages) + " bits");
}

Napi::Value GuestMemory::Read(const Napi::CallbackInfo& info) {
  uint64_t off = U64Arg(info, 0, "GuestMemory.read", "offset");
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, "GuestMemory.read");
  CheckRange(info.Env(), "GuestMemory.read", off, buf.Length());
  uintptr_t fault;
  if (!GuardedCopy(buf.Data(), base_ + off, buf.Length(), &fault))
    throw MakeMemoryFaultError(info.Env(), "GuestMemory.read", fault - reinterpret_cast<uintptr_t>(base_));
  return info.Env().Undefined();
}

Napi::Value GuestMemory::Write(const Napi::CallbackInfo& info) {
  uint64_t off = U64Arg(info, 0, "GuestMemory.write", "offset");
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, "GuestMemory.write");
  CheckRange(info.Env(), "GuestMemory.write", off, buf.Length());
  uintptr_t fault;  // a write faults too: the copy-on-write needs the file's page
  if (!GuardedCopy(base_ + off, buf.Data(), buf.Length(), &fault))
    throw MakeMemoryFaultError(info.Env(), "GuestMemory.write", fault - reinterpret_cast<uintptr_t>(base_));
  MarkWritten(off, buf.Length());
  return info.Env().Undefined();
}

Napi::Value GuestMemory::GetSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(base_ && !released_ ? size_ : 0));
}

Napi::Value GuestMemory::Release(const Napi::CallbackInfo& info) {
  Unmap();
  return info.Env().Undefined();
}

// Pages that may hold data (1) and pages known zero without reading them (0), or empty when unknown.
// Anonymous pages never touched (neither present nor swapped in /proc/self/pagemap) are zero; reading
// them would map the zero page into every hole of a large guest. A shared file's pages need not be in
// this process's page tables (mapped by the process before a restart): the file's own holes say
// which are zero, and reading one would allocate it (tmpfs and hugetlbfs fill a hole on a read fault).
std::vector<uint8_t> GuestMemory::MayHoldData(uint64_t off, uint64_t pages) const {
  if (fileBacked_) return {};
  if (sharedFd_ >= 0) {
    if (!hugetlbfs_) return SharedDataPages(off, pages);
    return hugetlbfsFresh_ ? MappedPages(off, pages) : std::vector<uint8_t>{};
  }
  int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
  if (pm < 0) return {};
  // In slices of 64 Ki entries (512 KiB): a 64 GiB guest's pagemap is 128 MiB.
  constexpr uint64_t kSlice = 64 * 1024, kPresent = 1ull << 63, kSwapped = 1ull << 62;
  std::vector<uint64_t> entries(std::min(pages, kSlice));
  std::vector<uint8_t> candidates(pages);
  const uint64_t vpn = reinterpret_cast<uintptr_t>(base_ + off) / kPage;
  for (uint64_t done = 0; done < pages;) {
    const uint64_t n = std::min(pages - done, kSlice);
    if (ReadAll(pm, reinterpret_cast<uint8_t*>(entries.data()), n * 8, (vpn + done) * 8) != 0) {
      candidates.clear();
      break;
    }
    for (uint64_t i = 0; i < n; i++) candidates[done + i] = (entries[i] & (kPresent | kSwapped)) != 0;
    done += n;
  }
  close(pm);
  return candidates;
}

// The pages of a hugetlbfs file this mapping has (mincore; hugetlb pages never swap): all the file has
// while hugetlbfsFresh_.
std::vector<uint8_t> GuestMemory::MappedPages(uint64_t off, uint64_t pages) const {
  std::vector<uint8_t> v(pages);
  if (mincore(base_ + off, pages * kPage, v.data()) != 0) return {};
  for (auto& b : v) b &= 1;
  return v;
}

bool GuestMemory::NeverAllocated(uint64_t page) const {
  if (fileBacked_ || sharedFd_ < 0) return false;
  if (hugetlbfs_) {
    uint8_t v = 1;
    return hugetlbfsFresh_ && mincore(base_ + page * kPage, kPage, &v) == 0 && !(v & 1);
  }
  const off_t at = static_cast<off_t>(page * kPage);
  off_t data = lseek(sharedFd_, at, SEEK_DATA);
  return (data < 0 && errno == ENXIO) || data >= at + static_cast<off_t>(kPage);
}

// The (offset, pages) of a call that answers with a bitmap of those pages, checked, and that bitmap, cleared.
Napi::Buffer<uint8_t> GuestMemory::PageBitmapFor(const Napi::CallbackInfo& info, const char* op, uint64_t* off, uint64_t* pages) const {
  *off = U64Arg(info, 0, op, "offset");
  *pages = U64Arg(info, 1, op, "pages");
  CheckPages(info.Env(), op, *off, *pages, (*pages + 7) / 8);
  Napi::Buffer<uint8_t> bitmap = Napi::Buffer<uint8_t>::New(info.Env(), (*pages + 7) / 8);
  memset(bitmap.Data(), 0, bitmap.Length());
  return bitmap;
}

Napi::Value GuestMemory::ScanPages(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.scanPages";
  uint64_t off, pages;
  Napi::Buffer<uint8_t> bitmap = PageBitmapFor(info, op, &off, &pages);
  std::vector<uint8_t> candidates = MayHoldData(off, pages);
  struct Scan {
    const uint8_t* first;
    uint64_t pages;
    const uint8_t* candidates;  // nullptr: read every page
    uint8_t* bitmap;
  } scan{base_ + off, pages, candidates.empty() ? nullptr : candidates.data(), bitmap.Data()};
  uintptr_t fault;
  bool ok = GuardedRun([](void* arg) {
    auto* s = static_cast<Scan*>(arg);
    for (uint64_t i = 0; i < s->pages; i++) {
      if (s->candidates && !s->candidates[i]) continue;
      if (!PageIsZero(s->first + i * kPage)) s->bitmap[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
    }
  }, &scan, &fault);
  if (!ok) throw MakeMemoryFaultError(info.Env(), op, fault - reinterpret_cast<uintptr_t>(base_));
  return bitmap;
}

Napi::Value GuestMemory::CandidatePages(const Napi::CallbackInfo& info) {
  uint64_t off, pages;
  Napi::Buffer<uint8_t> bitmap = PageBitmapFor(info, "GuestMemory.candidatePages", &off, &pages);
  std::vector<uint8_t> candidates = MayHoldData(off, pages);
  if (candidates.empty()) {
    memset(bitmap.Data(), 0xff, bitmap.Length());
    return bitmap;
  }
  for (uint64_t i = 0; i < pages; i++)
    if (candidates[i]) bitmap.Data()[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
  return bitmap;
}

std::vector<uint8_t> GuestMemory::SharedDataPages(uint64_t offset, uint64_t pages) const {
  std::vector<uint8_t> data(pages, 0);
  const off_t end = static_cast<off_t>(offset + pages * kPage);
  for (off_t pos = static_cast<off_t>(offset); pos < end;) {
    off_t from = lseek(sharedFd_, pos, SEEK_DATA);
    if (from < 0) {
      if (errno == ENXIO) break;  // only a hole from pos to the end of the file
      return {};
    }
    if (from >= end) break;
    off_t to = lseek(sharedFd_, from, SEEK_HOLE);
    if (to < 0) return {};
    to = std::min(to, end);
    for (off_t p = from - from % static_cast<off_t>(kPage); p < to; p += kPage) data[(p - offset) / kPage] = 1;
    pos = to;
  }
  return data;
}

namespace {

// Arguments 0-2 of every page-list operation (offset, pages, bitmap), checked: the runs they select.
std::vector<Run> PageRunsArg(const Napi::CallbackInfo& info, const GuestMemory& mem, const char* op) {
  uint64_t off = U64Arg(info, 0, op, "offset");
  uint64_t pages = U64Arg(info, 1, op, "pages");
  Napi::Buffer<uint8_t> bitmap = BufferArg(info, 2, op);
  mem.CheckPages(info.Env(), op, off, pages, bitmap.Length());
  return RunsOf(off, pages, bitmap.Data());
}

Napi::Value Start(PageTask* t) {
  Napi::Promise p = t->Promise();
  t->Queue();
  return p;
}

}  // namespace

Napi::Value GuestMemory::Crc32cPages(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.crc32cPages";
  return Start(new PageTask(info.Env(), this, info.This().As<Napi::Object>(), PageTask::Kind::kCrc, op, PageRunsArg(info, *this, op)));
}

Napi::Value GuestMemory::WritePagesToFd(const Napi::CallbackInfo& info) {
  const char* args = "GuestMemory.writePagesToFd";
  std::vector<Run> runs = PageRunsArg(info, *this, args);
  int fd = FdArg(info, 3, args);
  uint64_t pos = U64Arg(info, 4, args, "fileOffset");
  // Errors of the writes themselves are named after the syscall.
  auto* t = new PageTask(info.Env(), this, info.This().As<Napi::Object>(), PageTask::Kind::kWrite, "pwrite", std::move(runs));
  t->SetFile(fd, pos);
  return Start(t);
}

namespace {

// Argument `i` of copyPages/writePages: a Buffer or an array of Buffers holding exactly the bytes of
// the selected pages, checked.
std::vector<Napi::Buffer<uint8_t>> PiecesArg(const Napi::CallbackInfo& info, size_t i, const char* op, const std::vector<Run>& runs) {
  std::vector<Napi::Buffer<uint8_t>> buffers;
  if (info[i].IsArray()) {
    Napi::Array a = info[i].As<Napi::Array>();
    for (uint32_t k = 0; k < a.Length(); k++) {
      Napi::Value v = a.Get(k);
      if (!v.IsBuffer()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": element " + std::to_string(k) + " of the buffer list is not a Buffer");
      buffers.push_back(v.As<Napi::Buffer<uint8_t>>());
    }
  } else {
    buffers.push_back(BufferArg(info, i, op));
  }
  size_t have = 0, want = 0;
  for (const auto& b : buffers) have += b.Length();
  for (const Run& r : runs) want += r.length;
  if (have != want)
    ThrowLength(info.Env(), op, "buffers hold " + std::to_string(have) + " bytes, the pages are " + std::to_string(want));
  return buffers;
}

Napi::Value StartCopy(const Napi::CallbackInfo& info, GuestMemory* mem, PageTask::Kind kind, const char* op) {
  std::vector<Run> runs = PageRunsArg(info, *mem, op);
  std::vector<Napi::Buffer<uint8_t>> pieces = PiecesArg(info, 3, op, runs);
  auto* t = new PageTask(info.Env(), mem, info.This().As<Napi::Object>(), kind, op, std::move(runs));
  t->SetPieces(pieces);
  if (kind == PageTask::Kind::kCopyIn && info.Length() > 4 && info[4].IsBoolean() && info[4].As<Napi::Boolean>().Value()) t->SetExclusive();
  return Start(t);
}

}  // namespace

Napi::Value GuestMemory::CopyPages(const Napi::CallbackInfo& info) {
  return StartCopy(info, this, PageTask::Kind::kCopyOut, "GuestMemory.copyPages");
}

Napi::Value GuestMemory::WritePages(const Napi::CallbackInfo& info) {
  return StartCopy(info, this, PageTask::Kind::kCopyIn, "GuestMemory.writePages");
}

Napi::Value GuestMemory::MapFile(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.mapFile";
  uint64_t off = U64Arg(info, 0, op, "offset");
  uint64_t len = U64Arg(info, 1, op, "length");
  int fd = FdArg(info, 2, op);
  uint64_t pos = U64Arg(info, 3, op, "fileOffset");
  CheckRange(info.Env(), op, off, len);
  if (off % kPage || len % kPage || pos % kPage || len == 0)
    throw Napi::RangeError::New(info.Env(), std::string(op) + ": offset, length and file offset must be page-aligned");
  void* want = base_ + off;
  void* p = mmap(want, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, static_cast<off_t>(pos));
  if (p == MAP_FAILED) throw MakeSysError(info.Env(), "mmap", errno);
  fileBacked_ = true;
  privateRanges_.push_back({off, len});
  TrackBacking(info.Env(), fd, pos + len);
  MarkWritten(off, len);
  return info.Env().Undefined();
}

void GuestMemory::TrackBacking(Napi::Env env, int fd, uint64_t mappedEnd) {
  struct stat st;
  if (fstat(fd, &st) != 0) throw MakeSysError(env, "fstat", errno);
  for (BackingFile& b : backing_) {
    if (b.dev != st.st_dev || b.ino != st.st_ino) continue;
    b.mappedEnd = std::max(b.mappedEnd, mappedEnd);
    return;
  }
  int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) throw MakeSysError(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
  backing_.push_back({dup, st.st_dev, st.st_ino, st.st_size, st.st_mtim, mappedEnd});
}

namespace {

Napi::BigInt Nanoseconds(Napi::Env env, const timespec& t) {
  return Napi::BigInt::New(env, static_cast<int64_t>(static_cast<int64_t>(t.tv_sec) * 1000000000 + t.tv_nsec));
}

}  // namespace

Napi::Value GuestMemory::BackingFiles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array out = Napi::Array::New(env, backing_.size());
  for (size_t i = 0; i < backing_.size(); i++) {
    const BackingFile& b = backing_[i];
    struct stat st;
    if (fstat(b.fd, &st) != 0) throw MakeSysError(env, "fstat", errno);
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", b.fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    Napi::Object o = Napi::Object::New(env);
    o.Set("path", Napi::String::New(env, n > 0 ? std::string(path, n) : std::string(link)));
    o.Set("mappedEnd", Napi::Number::New(env, static_cast<double>(b.mappedEnd)));
    o.Set("sizeAtMap", Napi::Number::New(env, static_cast<double>(b.sizeAtMap)));
    o.Set("mtimeNsAtMap", Nanoseconds(env, b.mtimeAtMap));
    o.Set("size", Napi::Number::New(env, static_cast<double>(st.st_size)));
    o.Set("mtimeNs", Nanoseconds(env, st.st_mtim));
    o.Set("links", Napi::Number::New(env, static_cast<double>(st.st_nlink)));
    out.Set(i, o);
  }
  return out;
}

Napi::Value GuestMemory::ReadFromFd(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.readFromFd";
  uint64_t off = U64Arg(info, 0, op, "offset");
  uint64_t len = U64Arg(info, 1, op, "length");
  int fd = FdArg(info, 2, op);
  uint64_t pos = U64Arg(info, 3, op, "fileOffset");
  CheckRange(info.Env(), op, off, len);
  int err = ReadAll(fd, base_ + off, len, pos);
  MarkWritten(off, len);  // also on error: some bytes may have landed
  if (err) throw MakeSysError(info.Env(), "pread", err);
  return info.Env().Undefined();
}

Napi::Value GuestMemory::PersistMapped(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.persistMapped";
  CheckRange(info.Env(), op, 0, 0);
  if (sharedFd_ < 0) throw Napi::Error::New(info.Env(), std::string(op) + ": the memory is not backed by a shared file");
  std::vector<Run> runs;
  for (const auto& [off, len] : privateRanges_) runs.push_back({off, len});
  auto* t = new PageTask(info.Env(), this, info.This().As<Napi::Object>(), PageTask::Kind::kWrite, "pwrite", runs);
  t->SetFileInPlace(sharedFd_);
  Napi::Promise p = t->Promise();
  t->Queue();
  uint64_t bytes = 0;
  for (const Run& r : runs) bytes += r.length;
  // Resolves to the CRC like every page task; the caller wants the byte count.
  return p.Get("then").As<Napi::Function>().Call(p, {Napi::Function::New(info.Env(), [bytes](const Napi::CallbackInfo& i) {
    return Napi::Number::New(i.Env(), static_cast<double>(bytes));
  })});
}

Napi::Value GuestMemory::TrackWrites(const Napi::CallbackInfo& info) {
  if (!info[0].IsBoolean()) throw Napi::TypeError::New(info.Env(), "GuestMemory.trackWrites: on must be a boolean");
  CheckRange(info.Env(), "GuestMemory.trackWrites", 0, 0);
  written_.Track(info[0].As<Napi::Boolean>().Value(), size_ / kPage);
  return info.Env().Undefined();
}

void GuestMemory::PageSet::Set(uint64_t p, size_t pages) {
  if (words.empty()) words.assign((pages + 63) / 64, 0);
  uint64_t bit = 1ull << (p % 64);
  if (words[p / 64] & bit) return;
  words[p / 64] |= bit;
  count++;
}

void GuestMemory::PageSet::Add(const PageSet& other) {
  if (!other.count) return;
  if (words.empty()) words.assign(other.words.size(), 0);
  count = 0;
  for (size_t w = 0; w < words.size(); w++) count += __builtin_popcountll(words[w] |= other.words[w]);
}

Napi::Object GuestMemory::PageSet::Describe(Napi::Env env) const {
  Napi::Object r = Napi::Object::New(env);
  r.Set("count", Napi::Number::New(env, static_cast<double>(count)));
  for (size_t w = 0; count && w < words.size(); w++) {
    if (!words[w]) continue;
    r.Set("first", Napi::Number::New(env, static_cast<double>(w * 64 + __builtin_ctzll(words[w]))));
    break;
  }
  return r;
}

void GuestMemory::MarkTorn(uint64_t page) {
  tornOld_.Clear(page);  // carried again (and torn again): the current pass's now
  torn_.Set(page, size_ / kPageSize);
}

Napi::Value GuestMemory::TornPages(const Napi::CallbackInfo& info) {
  PageSet all = tornOld_;
  all.Add(torn_);
  return all.Describe(info.Env());
}

Napi::Value GuestMemory::CloseTornPass(const Napi::CallbackInfo& info) {
  Napi::Object stale = tornOld_.Describe(info.Env());
  tornOld_.Add(torn_);
  torn_ = PageSet();
  return stale;
}

Napi::Value GuestMemory::TakeWrittenPages(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.takeWrittenPages";
  Napi::Buffer<uint8_t> out = BufferArg(info, 0, op);
  CheckRange(info.Env(), op, 0, 0);
  if (out.Length() < (size_ / kPage + 7) / 8)
    ThrowLength(info.Env(), op, "bitmap is " + std::to_string(out.Length()) + " bytes, " + std::to_string(size_ / kPage) + " pages need " + std::to_string((size_ / kPage + 7) / 8));
  written_.Take(out.Data(), out.Length());
  return info.Env().Undefined();
}

}  // namespace vcpud
