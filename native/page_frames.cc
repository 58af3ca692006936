// GuestMemory.packPages and GuestMemory.applyFrames (frames in buffers), sendFrames and
// receiveFrames (frames on a socket): the page-frame format of page_frames.h, on the libuv pool.
// Guest memory is touched only in the tasks' Run(), with nothing live there that needs unwinding
// (no allocation, lock or destructor: the page table's and iovecs' storage is reserved up front;
// the socket calls hold nothing either), so every Run() is under the SIGBUS guard of
// memory_guard.h (RunGuarded). Failure strings are built only after a check failed, never across
// an access to guest memory.
#include "page_frames.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>

#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "crc32c.h"
#include "errors.h"
#include "guest_memory.h"
#include "ioctl_call.h"
#include "memory_guard.h"

namespace vcpud {

namespace {

template <typename T>
T Load(const uint8_t* p) {
  T v;
  memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
void Store(uint8_t* p, T v) {
  memcpy(p, &v, sizeof v);
}

// The next set bit at or after `from`, or `end`.
uint64_t NextSetBit(const uint8_t* bitmap, uint64_t from, uint64_t end) {
  uint64_t i = from;
  while (i < end) {
    if (i % 64 == 0 && i + 64 <= end) {
      uint64_t w = Load<uint64_t>(bitmap + i / 8);
      if (!w) {
        i += 64;
        continue;
      }
      return i + __builtin_ctzll(w);
    }
    if (bitmap[i / 8] & (1u << (i % 8))) return i;
    i++;
  }
  return end;
}

// Fills in the header of the frame at f, whose page table and page CRCs follow it (page_frames.h):
// the table's CRC, then the header's.
void StoreHeader(uint8_t* f, uint16_t flags, uint64_t seq, uint32_t count, uint32_t data) {
  Store<uint32_t>(f + 0, kFrameMagic);
  Store<uint16_t>(f + 4, kFrameVersion);
  Store<uint16_t>(f + 6, flags);
  Store<uint64_t>(f + 8, seq);
  Store<uint32_t>(f + 16, count);
  Store<uint32_t>(f + 20, data);
  Store<uint32_t>(f + 24, Crc32c(Crc32c(0, f, 24), f + kFrameHeaderBytes, 8 * size_t{count} + 4 * size_t{data}));
  Store<uint32_t>(f + 28, Crc32c(0, f, 28));
}

// Bytes of a frame's page table and page CRCs.
size_t TableBytes(uint32_t count, uint32_t data) { return 8 * size_t{count} + 4 * size_t{data}; }

// The data pages of a page table (`count` u64 entries) as iovecs into guest memory at `base`, in
// table order, consecutive pages merged; returns how many (out holds at least `count`).
int DataPageIovecs(uint8_t* base, const uint8_t* table, uint32_t count, iovec* out) {
  int n = 0;
  for (uint32_t i = 0; i < count; i++) {
    uint64_t e = Load<uint64_t>(table + 8 * i);
    if (e & kFrameZeroPage) continue;
    uint8_t* page = base + e * kPageSize;
    if (n && static_cast<uint8_t*>(out[n - 1].iov_base) + out[n - 1].iov_len == page)
      out[n - 1].iov_len += kPageSize;
    else
      out[n++] = {page, kPageSize};
  }
  return n;
}

// Moves `n` bytes into the iovecs from iov[*i] on (a readv or vmsplice that moved them): each
// iovec advanced, *i past the ones filled.
void ConsumeIovecs(iovec* iov, int* i, size_t n) {
  while (n) {
    size_t take = std::min(n, iov[*i].iov_len);
    iov[*i].iov_base = static_cast<uint8_t*>(iov[*i].iov_base) + take;
    iov[*i].iov_len -= take;
    n -= take;
    if (!iov[*i].iov_len) ++*i;
  }
}

// Why a socket operation of a frame stream stopped: the call and its errno, or the peer's end.
struct IoError {
  const char* op = nullptr;
  int err = 0;
  bool eof = false;
};

// Waits until the non-blocking fd is ready for `events`, in 50 ms slices so that `cancel` (a byte
// the JS thread sets) is seen: 0, or ETIMEDOUT after stallMs without readiness, ECANCELED, or
// poll's errno.
int WaitReady(int fd, short events, int stallMs, const uint8_t* cancel) {
  constexpr int kSliceMs = 50;
  for (int waited = 0;;) {
    if (__atomic_load_n(cancel, __ATOMIC_RELAXED)) return ECANCELED;
    pollfd p{fd, events, 0};
    int r = poll(&p, 1, kSliceMs);
    if (r > 0) return 0;  // POLLERR / POLLHUP too: the next read or write reports them
    if (r < 0 && errno != EINTR) return errno;
    if (r == 0 && (waited += kSliceMs) >= stallMs) return ETIMEDOUT;
  }
}

// Writes all of [p, p + n) to the non-blocking socket fd (no SIGPIPE: a closed peer is EPIPE).
bool WriteAll(int fd, const uint8_t* p, size_t n, int stallMs, const uint8_t* cancel, IoError* e) {
  while (n) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (int r = WaitReady(fd, POLLOUT, stallMs, cancel)) {
        *e = {"poll", r, false};
        return false;
      }
      continue;
    }
    *e = {"send", errno, false};
    return false;
  }
  return true;
}

// Reads a frame stream exactly (never past what is asked): first the bytes JS had already
// received (`prefix`), then the non-blocking socket fd, straight into the caller's iovecs.
class StreamReader {
 public:
  StreamReader(int fd, const uint8_t* prefix, size_t prefixLen, int stallMs, const uint8_t* cancel)
      : fd_(fd), prefix_(prefix), prefixLen_(prefixLen), stallMs_(stallMs), cancel_(cancel) {}

  // Fills iov[0..cnt) in order; the iovecs are consumed (advanced) as they fill.
  bool ReadIov(iovec* iov, int cnt, IoError* e) {
    int i = 0;
    while (i < cnt) {
      if (iov[i].iov_len == 0) {
        i++;
        continue;
      }
      if (prefixUsed_ < prefixLen_) {
        size_t take = std::min(iov[i].iov_len, prefixLen_ - prefixUsed_);
        memcpy(iov[i].iov_base, prefix_ + prefixUsed_, take);
        ConsumeIovecs(iov, &i, take);
        prefixUsed_ += take;
        continue;
      }
      ssize_t r = readv(fd_, iov + i, std::min(cnt - i, IOV_MAX));
      if (r > 0) {
        fromFd_ += static_cast<size_t>(r);
        ConsumeIovecs(iov, &i, static_cast<size_t>(r));
        continue;
      }
      if (r == 0) {
        *e = {"read", 0, true};
        return false;
      }
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (int w = WaitReady(fd_, POLLIN, stallMs_, cancel_)) {
          *e = {"poll", w, false};
          return false;
        }
        continue;
      }
      *e = {"readv", errno, false};
      return false;
    }
    return true;
  }

  bool Read(void* p, size_t n, IoError* e) {
    iovec v{p, n};
    return ReadIov(&v, 1, e);
  }

  size_t PrefixUsed() const { return prefixUsed_; }
  size_t FromFd() const { return fromFd_; }
  size_t Consumed() const { return prefixUsed_ + fromFd_; }

 private:
  int fd_;
  const uint8_t* prefix_;
  size_t prefixLen_;
  int stallMs_;
  const uint8_t* cancel_;
  size_t prefixUsed_ = 0, fromFd_ = 0;
};

// Base class: keeps the GuestMemory and the buffers alive and the mapping busy while it runs.
class FrameTask : public Napi::AsyncWorker {
 public:
  FrameTask(Napi::Env env, GuestMemory* mem, Napi::Object self)
      : Napi::AsyncWorker(env), mem_(mem), self_(Napi::Persistent(self)), deferred_(Napi::Promise::Deferred::New(env)) {
    mem_->BeginBusy();
  }
  void Keep(Napi::Buffer<uint8_t> b) { refs_.push_back(Napi::Persistent(b.As<Napi::Object>())); }
  Napi::Promise Start() {
    Napi::Promise p = deferred_.Promise();
    Queue();
    return p;
  }

 protected:
  // Guest memory may map a snapshot file that was truncated since (memory_guard.h): the task's
  // Run() touches it only under the guard, holding nothing that needs unwinding (the frame table's
  // capacity is reserved up front), and a fault becomes the task's MEMORY_FAULT rejection.
  template <typename Task>
  static void RunGuarded(Task* task) {
    uintptr_t fault = 0;
    if (!GuardedRun([](void* t) { static_cast<Task*>(t)->Run(); }, task, &fault)) {
      task->faulted_ = true;
      task->faultOffset_ = fault - reinterpret_cast<uintptr_t>(task->mem_->Base());
    }
  }

  // A guest-memory fault or a socket error, as the promise's rejection: true when it rejected.
  bool RejectOnFailure(Napi::Env env, const char* op) {
    if (faulted_) {
      deferred_.Reject(MakeMemoryFaultError(env, op, faultOffset_).Value());
      return true;
    }
    if (io_.eof) {
      Napi::Error e = Napi::Error::New(env, std::string(op) + ": the peer closed the connection");
      e.Set("code", Napi::String::New(env, "EOF"));
      deferred_.Reject(e.Value());
      return true;
    }
    if (io_.op) {
      deferred_.Reject(MakeSysError(env, io_.op, io_.err).Value());
      return true;
    }
    return false;
  }

  bool faulted_ = false;
  uint64_t faultOffset_ = 0;
  IoError io_;
  GuestMemory* mem_;
  Napi::ObjectReference self_;
  std::vector<Napi::ObjectReference> refs_;
  Napi::Promise::Deferred deferred_;
};

class PackTask : public FrameTask {
 public:
  // Packs the selected pages of [from, to) (to: the memory's end when past it).
  PackTask(Napi::Env env, GuestMemory* mem, Napi::Object self, const uint8_t* bitmap, uint64_t from, uint64_t to,
           uint8_t* out, size_t outLen, uint64_t seq, uint32_t framePages)
      : FrameTask(env, mem, self), bitmap_(bitmap), page_(from), limit_(std::min<uint64_t>(to, mem->Size() / kPageSize)),
        out_(out), outLen_(outLen), seq_(seq), framePages_(framePages) {
    table_.reserve(framePages_);
  }

  void Execute() override { RunGuarded<PackTask>(this); }

  void Run() { PackOnce(); }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (RejectOnFailure(env, Op())) return;
    Napi::Object r = Napi::Object::New(env);
    r.Set("nextPage", Napi::Number::New(env, static_cast<double>(page_)));
    r.Set("bytes", Napi::Number::New(env, static_cast<double>(BytesOut())));
    r.Set("pages", Napi::Number::New(env, static_cast<double>(pages_)));
    r.Set("zeroPages", Napi::Number::New(env, static_cast<double>(zeroPages_)));
    r.Set("frames", Napi::Number::New(env, static_cast<double>(frames_)));
    deferred_.Resolve(r);
  }

 protected:
  virtual const char* Op() const { return "GuestMemory.packPages"; }
  virtual size_t BytesOut() const { return pos_; }

  // Fills out_ from pos_ with whole frames until it is full (full_) or page_ reaches limit_.
  void PackOnce() {
    const uint8_t* base = mem_->Base();
    for (;;) {
      if (outLen_ - pos_ < kFrameHeaderBytes + 8) {  // not even a zero page fits
        full_ = true;
        break;
      }
      uint32_t data = SelectFrame(base, outLen_ - pos_ - kFrameHeaderBytes);
      if (table_.empty()) break;
      WriteFrame(base, data);
      if (page_ == limit_ || full_) break;
    }
  }

  // The next frame's page table (table_) from page_ on: at most framePages_ selected pages, as many
  // as fit in `room` bytes of table and payload (full_ when the next one did not); returns how many
  // carry data. page_ moves past them (to limit_ when none are left).
  uint32_t SelectFrame(const uint8_t* base, size_t room) {
    std::vector<uint64_t>& table = table_;  // capacity reserved: push_back never allocates here
    table.clear();
    size_t used = 0;
    uint32_t data = 0;
    while (table.size() < framePages_) {
      uint64_t p = NextSetBit(bitmap_, page_, limit_);
      if (p == limit_) {
        page_ = limit_;
        break;
      }
      bool zero = PageIsZero(base + p * kPageSize);
      size_t need = 8 + (zero ? 0 : 4 + kPageSize);
      if (used + need > room) {
        page_ = p;
        full_ = true;
        break;
      }
      table.push_back(zero ? p | kFrameZeroPage : p);
      used += need;
      data += !zero;
      page_ = p + 1;
    }
    return data;
  }

  void WriteFrame(const uint8_t* base, uint32_t data) {
    const std::vector<uint64_t>& table = table_;
    uint8_t* f = out_ + pos_;
    memcpy(f + kFrameHeaderBytes, table.data(), table.size() * 8);  // little-endian host (x86-64)
    uint8_t* crcs = f + kFrameHeaderBytes + table.size() * 8;
    uint8_t* payload = crcs + 4 * size_t{data};
    // Each CRC describes the copy (checksummed as it is stored), so the bytes that leave even if
    // the guest writes on.
    for (uint64_t e : table) {
      if (e & kFrameZeroPage) continue;
      Store<uint32_t>(crcs, Crc32cCopy(0, payload, base + e * kPageSize, kPageSize));
      crcs += 4;
      payload += kPageSize;
    }
    StoreHeader(f, 0, seq_ + frames_, static_cast<uint32_t>(table.size()), data);
    pos_ += static_cast<size_t>(payload - f);
    Count(data);
  }

  void Count(uint32_t data) {
    pages_ += table_.size();
    zeroPages_ += table_.size() - data;
    frames_++;
  }

  const uint8_t* bitmap_;
  uint64_t page_;
  uint64_t limit_;
  uint8_t* out_;
  size_t outLen_;
  uint64_t seq_;
  uint32_t framePages_;
  std::vector<uint64_t> table_;
  size_t pos_ = 0;
  bool full_ = false;
  uint64_t pages_ = 0, zeroPages_ = 0, frames_ = 0;
};

// packPages into a staging buffer, each fill written to the socket straight from it: no JS
// buffer, no event-loop turn per fill. The staging copy makes the CRC describe the bytes that leave
// while the guest keeps writing its pages; ZeroCopySendTask does without it.
class SendTask : public PackTask {
 public:
  SendTask(Napi::Env env, GuestMemory* mem, Napi::Object self, int fd, const uint8_t* bitmap, uint64_t from, uint64_t to,
           uint8_t* staging, size_t stagingLen, uint64_t seq, uint32_t framePages, uint64_t maxBytes, bool end,
           int stallMs, const uint8_t* cancel)
      : PackTask(env, mem, self, bitmap, from, to, staging, stagingLen, seq, framePages), fd_(fd), maxBytes_(maxBytes),
        end_(end), stallMs_(stallMs), cancel_(cancel) {}

  void Execute() override {
    RunGuarded<SendTask>(this);
    close(fd_);
  }

  void Run() {
    do {
      pos_ = 0;
      full_ = false;
      PackOnce();
      if (pos_ && !WriteAll(fd_, out_, pos_, stallMs_, cancel_, &io_)) return;
      sent_ += pos_;
    } while (full_ && sent_ < maxBytes_);
    if (!end_ || page_ < limit_) return;
    uint8_t f[kFrameHeaderBytes];
    StoreHeader(f, kFrameFlagEnd, seq_ + frames_, 0, 0);
    if (WriteAll(fd_, f, sizeof f, stallMs_, cancel_, &io_)) sent_ += sizeof f;
  }

 protected:
  const char* Op() const override { return "GuestMemory.sendFrames"; }
  size_t BytesOut() const override { return sent_; }

 private:
  int fd_;
  uint64_t maxBytes_;
  bool end_;
  int stallMs_;
  const uint8_t* cancel_;
  size_t sent_ = 0;
};

// sendFrames with zeroCopy: each frame's header and table are written into a pipe (copied), its
// data pages vmspliced into it by reference, and the pipe spliced into the socket, so the kernel
// hands the guest's own pages to the receiver (a Unix or TCP socket takes spliced pages without
// copying them, Linux 6.5+; older kernels copy in the splice). No staging copy and no copy into
// socket buffers, whose new pages made the copying source 2-5x slower in some runs (in 8 migrations
// of 1 GiB its CPU was 0.43-2.29 s, the splicing source's 0.37-0.50: BENCHMARKS.md). Each page's
// CRC is computed on the guest's page before it is spliced; while the guest runs the page may
// change before the receiver copies it, so such frames are marked tearable (page_frames.h) when
// the caller says the guest runs.
class ZeroCopySendTask : public PackTask {
 public:
  ZeroCopySendTask(Napi::Env env, GuestMemory* mem, Napi::Object self, int fd, const uint8_t* bitmap, uint64_t from,
                   uint64_t to, uint8_t* staging, size_t stagingLen, uint64_t seq, uint32_t framePages, uint64_t maxBytes,
                   bool end, bool tearable, int stallMs, const uint8_t* cancel)
      : PackTask(env, mem, self, bitmap, from, to, staging, stagingLen, seq, framePages), fd_(fd), maxBytes_(maxBytes),
        end_(end), tearable_(tearable), stallMs_(stallMs), cancel_(cancel), iov_(framePages) {}

  void Execute() override {
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) == 0) {
      pipeR_ = p[0];
      pipeW_ = p[1];
      fcntl(pipeW_, F_SETPIPE_SZ, kPipeBytes);  // a hint: the default 64 KiB pipe only means more calls
      RunGuarded<ZeroCopySendTask>(this);
      close(pipeR_);  // pages still in it (a failed call) are let go
      close(pipeW_);
    } else {
      io_ = {"pipe2", errno, false};
    }
    close(fd_);
  }

  void Run() {
    const uint8_t* base = mem_->Base();
    while (page_ < limit_ && sent_ < maxBytes_) {
      uint32_t data = SelectFrame(base, SIZE_MAX);
      if (table_.empty()) break;
      if (!PushFrame(base, data)) return;
    }
    if (end_ && page_ >= limit_) {
      StoreHeader(out_, kFrameFlagEnd, seq_ + frames_, 0, 0);
      if (!PushCopy(out_, kFrameHeaderBytes)) return;
    }
    Drain(false);
  }

 protected:
  const char* Op() const override { return "GuestMemory.sendFrames"; }
  size_t BytesOut() const override { return sent_; }

 private:
  static constexpr int kPipeBytes = 1 << 20;

  bool PushFrame(const uint8_t* base, uint32_t data) {
    const uint32_t count = static_cast<uint32_t>(table_.size());
    memcpy(out_ + kFrameHeaderBytes, table_.data(), 8 * size_t{count});
    uint8_t* crcs = out_ + kFrameHeaderBytes + 8 * size_t{count};
    for (uint64_t e : table_) {
      if (e & kFrameZeroPage) continue;
      Store<uint32_t>(crcs, Crc32c(0, base + e * kPageSize, kPageSize));
      crcs += 4;
    }
    int n = DataPageIovecs(const_cast<uint8_t*>(base), out_ + kFrameHeaderBytes, count, iov_.data());
    StoreHeader(out_, tearable_ ? kFrameFlagTearable : 0, seq_ + frames_, count, data);
    if (!PushCopy(out_, kFrameHeaderBytes + TableBytes(count, data)) || !PushPages(iov_.data(), n)) return false;
    Count(data);
    return true;
  }

  // Writes [p, +len) into the pipe (copied: the staging buffer is reused for the next frame).
  bool PushCopy(const uint8_t* p, size_t len) {
    while (len) {
      ssize_t w = write(pipeW_, p, len);
      if (w > 0) {
        p += w;
        len -= static_cast<size_t>(w);
        Pushed(static_cast<size_t>(w));
      } else if (!Retry(w, "write")) {
        return false;
      }
    }
    return true;
  }

  // vmsplices the iovecs' pages into the pipe by reference.
  bool PushPages(iovec* iov, int cnt) {
    for (int i = 0; i < cnt;) {
      ssize_t w = vmsplice(pipeW_, iov + i, std::min(cnt - i, IOV_MAX), SPLICE_F_NONBLOCK);
      if (w > 0) {
        Pushed(static_cast<size_t>(w));
        ConsumeIovecs(iov, &i, static_cast<size_t>(w));
      } else if (!Retry(w, "vmsplice")) {
        return false;
      }
    }
    return true;
  }

  void Pushed(size_t n) {
    inPipe_ += n;
    sent_ += n;
  }

  // After a push that moved nothing: EINTR retries, a full pipe (EAGAIN) is drained into the
  // socket first; anything else is the call's error.
  bool Retry(ssize_t w, const char* op) {
    if (w < 0 && errno == EINTR) return true;
    if (w < 0 && errno == EAGAIN) return Drain(true);
    io_ = {op, w < 0 ? errno : EIO, false};
    return false;
  }

  // Splices everything in the pipe into the socket, waiting (stallMs, cancel) while it is full.
  bool Drain(bool more) {
    while (inPipe_) {
      ssize_t w = splice(pipeR_, nullptr, fd_, nullptr, inPipe_, SPLICE_F_MOVE | SPLICE_F_NONBLOCK | (more ? SPLICE_F_MORE : 0));
      if (w > 0) {
        inPipe_ -= static_cast<size_t>(w);
      } else if (w < 0 && errno == EINTR) {
        continue;
      } else if (w < 0 && errno == EAGAIN) {
        if (int r = WaitReady(fd_, POLLOUT, stallMs_, cancel_)) {
          io_ = {"poll", r, false};
          return false;
        }
      } else {
        io_ = {"splice", w < 0 ? errno : EIO, false};
        return false;
      }
    }
    return true;
  }

  int fd_;
  uint64_t maxBytes_;
  bool end_, tearable_;
  int stallMs_;
  const uint8_t* cancel_;
  std::vector<iovec> iov_;
  int pipeR_ = -1, pipeW_ = -1;
  size_t inPipe_ = 0, sent_ = 0;
};

class ApplyTask : public FrameTask {
 public:
  ApplyTask(Napi::Env env, GuestMemory* mem, Napi::Object self, const uint8_t* buf, size_t len)
      : FrameTask(env, mem, self), buf_(buf), len_(len), bad_(kMaxFramePages) {}

  void Execute() override { RunGuarded<ApplyTask>(this); }

  void Run() {
    while (len_ - pos_ >= kFrameHeaderBytes) {
      size_t frameLen = 0;
      if (!Verify(buf_ + pos_, len_ - pos_, &frameLen)) return;
      if (frameLen == 0) return;  // incomplete trailing frame: wait for more bytes
      const uint8_t* f = buf_ + pos_;
      uint32_t count = Load<uint32_t>(f + 16);
      const uint8_t* payload = f + kFrameHeaderBytes + TableBytes(count, Load<uint32_t>(f + 20));
      if (!CheckPages(f, payload)) return;
      PopulateDataRuns(mem_->Base(), f + kFrameHeaderBytes, count);
      ApplyTable(f, payload);
      pos_ += frameLen;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (RejectOnFailure(env, Op())) return;
    Napi::Object r = Counts(env);
    r.Set("consumed", Napi::Number::New(env, static_cast<double>(pos_)));
    deferred_.Resolve(r);
  }

 protected:
  virtual const char* Op() const { return "GuestMemory.applyFrames"; }

  // The frame checks' failure as an EFRAME rejection, then FrameTask's.
  bool RejectOnFailure(Napi::Env env, const char* op) {
    if (check_.empty()) return FrameTask::RejectOnFailure(env, op);
    Napi::Error e = Napi::Error::New(env, std::string(op) + ": frame at byte " + std::to_string(pos_) + " (seq " +
                                              std::to_string(badSeq_) + (seqTrusted_ ? "" : ", unverified") + "): " +
                                              check_ + ": " + detail_);
    e.Set("code", Napi::String::New(env, "EFRAME"));
    e.Set("check", Napi::String::New(env, check_));
    e.Set("seq", Napi::BigInt::New(env, badSeq_));
    e.Set("offset", Napi::Number::New(env, static_cast<double>(pos_)));
    e.Set("consumed", Napi::Number::New(env, static_cast<double>(pos_)));
    deferred_.Reject(e.Value());
    return true;
  }

  Napi::Object Counts(Napi::Env env) const {
    Napi::Object r = Napi::Object::New(env);
    r.Set("pages", Napi::Number::New(env, static_cast<double>(pages_)));
    r.Set("zeroPages", Napi::Number::New(env, static_cast<double>(zeroPages_)));
    r.Set("frames", Napi::Number::New(env, static_cast<double>(frames_)));
    r.Set("tornPages", Napi::Number::New(env, static_cast<double>(tornPages_)));
    if (frames_) r.Set("lastSeq", Napi::BigInt::New(env, lastSeq_));
    return r;
  }

  bool Fail(const char* check, std::string detail) {
    check_ = check;
    detail_ = std::move(detail);
    return false;
  }

  // Magic, version, header CRC, flags, page counts. An end frame (kFrameFlagEnd, no pages) sets
  // *end where the caller reads a stream (end != nullptr); elsewhere its flag is unknown.
  bool VerifyHeader(const uint8_t* f, bool* end) {
    badSeq_ = Load<uint64_t>(f + 8);
    seqTrusted_ = false;
    uint32_t magic = Load<uint32_t>(f);
    if (magic != kFrameMagic) return Fail("magic", "0x" + Hex(magic) + ", expected 0x" + Hex(kFrameMagic));
    uint16_t version = Load<uint16_t>(f + 4);
    if (version != kFrameVersion)
      return Fail("version", std::to_string(version) + ", this build reads " + std::to_string(kFrameVersion));
    uint32_t headerCrc = Crc32c(0, f, 28);
    if (headerCrc != Load<uint32_t>(f + 28))
      return Fail("header_crc", "computed 0x" + Hex(headerCrc) + ", the frame says 0x" + Hex(Load<uint32_t>(f + 28)));
    seqTrusted_ = true;
    uint16_t flags = Load<uint16_t>(f + 6);
    uint32_t count = Load<uint32_t>(f + 16), data = Load<uint32_t>(f + 20);
    if (end && flags == kFrameFlagEnd) {
      if (count || data) return Fail("page_count", "an end frame with " + std::to_string(count) + " pages");
      *end = true;
      return true;
    }
    if (flags & ~kFrameFlagTearable) return Fail("flags", "unknown bits 0x" + Hex(flags & ~kFrameFlagTearable));
    if (count == 0 || count > kMaxFramePages || data > count)
      return Fail("page_count", std::to_string(count) + " pages (" + std::to_string(data) + " with data), allowed 1.." +
                                    std::to_string(kMaxFramePages));
    return true;
  }

  // The CRC of the table and page CRCs, every page number against the memory's size, and the zero
  // flags against dataPages, of the frame at f (its table after the header).
  bool VerifyTable(const uint8_t* f, uint32_t count, uint32_t data) {
    const uint8_t* table = f + kFrameHeaderBytes;
    uint32_t crc = Crc32c(Crc32c(0, f, 24), table, TableBytes(count, data));
    if (crc != Load<uint32_t>(f + 24))
      return Fail("table_crc", "computed 0x" + Hex(crc) + ", the frame says 0x" + Hex(Load<uint32_t>(f + 24)));
    const uint64_t pages = mem_->Size() / kPageSize;
    uint32_t withData = 0;
    for (uint32_t i = 0; i < count; i++) {
      uint64_t e = Load<uint64_t>(table + 8 * i);
      uint64_t p = e & ~kFrameZeroPage;
      if (p >= pages)
        return Fail("page_number", "entry " + std::to_string(i) + " names page " + std::to_string(p) +
                                       ", the memory has " + std::to_string(pages));
      withData += !(e & kFrameZeroPage);
    }
    if (withData != data)
      return Fail("page_count", std::to_string(withData) + " table entries carry data, the header says " + std::to_string(data));
    return true;
  }

  // True with *frameLen = 0 when the frame is not all there yet; false (check_ set) when corrupt.
  bool Verify(const uint8_t* f, size_t avail, size_t* frameLen) {
    *frameLen = 0;
    if (!VerifyHeader(f, nullptr)) return false;
    uint32_t count = Load<uint32_t>(f + 16), data = Load<uint32_t>(f + 20);
    size_t need = kFrameHeaderBytes + TableBytes(count, data) + kPageSize * size_t{data};
    if (avail < need) return true;
    if (!VerifyTable(f, count, data)) return false;
    *frameLen = need;
    return true;
  }

  // Each data page of the verified frame at f against its CRC, the pages at `payload` in table
  // order (nullptr: in guest memory already). A mismatch fails the frame, or in a tearable frame
  // (page_frames.h) is noted in bad_ for ApplyTable.
  bool CheckPages(const uint8_t* f, const uint8_t* payload) {
    uint32_t count = Load<uint32_t>(f + 16);
    const uint8_t* table = f + kFrameHeaderBytes;
    const uint8_t* crcs = table + 8 * size_t{count};
    const bool tearable = Load<uint16_t>(f + 6) & kFrameFlagTearable;
    for (uint32_t i = 0, d = 0; i < count; i++) {
      uint64_t e = Load<uint64_t>(table + 8 * i);
      if (e & kFrameZeroPage) continue;
      const uint8_t* src = payload ? payload + kPageSize * size_t{d} : mem_->Base() + e * kPageSize;
      uint32_t crc = Crc32c(0, src, kPageSize), want = Load<uint32_t>(crcs + 4 * size_t{d});
      bad_[d++] = crc != want;
      if (crc != want && !tearable)
        return Fail("crc", "page " + std::to_string(e) + " (table entry " + std::to_string(i) + "): computed 0x" + Hex(crc) +
                               ", the frame says 0x" + Hex(want));
    }
    return true;
  }

  // Applies the verified frame whose header is `f` (its table follows it): the data pages from
  // `payload` (nullptr: already in place), the zero pages zeroed; every page marked written; a data
  // page CheckPages found bad marked torn, every other page's mark cleared.
  void ApplyTable(const uint8_t* f, const uint8_t* payload) {
    uint8_t* base = mem_->Base();
    uint32_t count = Load<uint32_t>(f + 16);
    const uint8_t* table = f + kFrameHeaderBytes;
    for (uint32_t i = 0, data = 0; i < count; i++) {
      uint64_t e = Load<uint64_t>(table + 8 * i);
      uint8_t* page = base + (e & ~kFrameZeroPage) * kPageSize;
      if (e & kFrameZeroPage) {
        zeroPages_++;
        mem_->ClearTorn(e & ~kFrameZeroPage);
        // An untouched page stays unallocated: a shared file's hole is not even read (that allocates it).
        if (mem_->NeverAllocated(e & ~kFrameZeroPage) || PageIsZero(page)) continue;
        memset(page, 0, kPageSize);
      } else {
        if (payload) {
          memcpy(page, payload, kPageSize);
          payload += kPageSize;
        }
        if (bad_[data++]) {
          mem_->MarkTorn(e);
          tornPages_++;
        } else {
          mem_->ClearTorn(e);
        }
      }
      mem_->MarkWritten((e & ~kFrameZeroPage) * kPageSize, kPageSize);
    }
    pages_ += count;
    frames_++;
    lastSeq_ = Load<uint64_t>(f + 8);
  }

  // Faults in the runs of consecutive data pages of a verified page table by one madvise each
  // rather than one fault per page (applying into fresh memory ran at half the speed of applying
  // into populated memory, BENCHMARKS.md). A hint: without it (kernel < 5.14) the copy faults them.
  static void PopulateDataRuns(uint8_t* base, const uint8_t* table, uint32_t count) {
    uint64_t start = 0, len = 0;
    for (uint32_t i = 0; i <= count; i++) {
      uint64_t e = i < count ? Load<uint64_t>(table + 8 * i) : kFrameZeroPage;
      if (!(e & kFrameZeroPage) && len && e == start + len) {
        len++;
        continue;
      }
      if (len) madvise(base + start * kPageSize, len * kPageSize, kMadvPopulateWrite);
      len = (e & kFrameZeroPage) ? 0 : 1;
      start = e;
    }
  }

  static std::string Hex(uint64_t v) {
    char s[20];
    snprintf(s, sizeof s, "%llx", static_cast<unsigned long long>(v));
    return s;
  }

  const uint8_t* buf_;
  size_t len_;
  size_t pos_ = 0;
  uint64_t pages_ = 0, zeroPages_ = 0, frames_ = 0, lastSeq_ = 0, tornPages_ = 0;
  std::string check_, detail_;
  uint64_t badSeq_ = 0;
  bool seqTrusted_ = false;
  std::vector<uint8_t> bad_;  // per data page of the frame being applied: failed its CRC (CheckPages)
};

// applyFrames on a stream: frames read from the socket (after the bytes JS already holds, buf_)
// straight into guest memory, up to the end frame. Each frame's header and page table are checked
// before any of its pages is read (every page number inside the memory); each page's CRC after,
// where the page landed. A mismatch fails the call (or, in a tearable frame, marks that page
// torn), and the caller the migration: the destination VM has not run and never runs on that
// memory.
class ReceiveTask : public ApplyTask {
 public:
  ReceiveTask(Napi::Env env, GuestMemory* mem, Napi::Object self, int fd, const uint8_t* prefix, size_t prefixLen,
              int stallMs, const uint8_t* cancel)
      : ApplyTask(env, mem, self, prefix, prefixLen), fd_(fd), in_(fd, prefix, prefixLen, stallMs, cancel),
        frame_(kFrameHeaderBytes + kMaxFrameTableBytes), iov_(kMaxFramePages) {}

  void Execute() override {
    RunGuarded<ReceiveTask>(this);
    close(fd_);
  }

  void Run() {
    uint8_t* base = mem_->Base();
    uint8_t* f = frame_.data();
    const uint8_t* table = f + kFrameHeaderBytes;
    for (;;) {
      pos_ = in_.Consumed();
      bool end = false;
      if (!in_.Read(f, kFrameHeaderBytes, &io_) || !VerifyHeader(f, &end)) return;
      if (end) return;
      uint32_t count = Load<uint32_t>(f + 16), data = Load<uint32_t>(f + 20);
      if (!in_.Read(f + kFrameHeaderBytes, TableBytes(count, data), &io_) || !VerifyTable(f, count, data)) return;
      PopulateDataRuns(base, table, count);
      int n = DataPageIovecs(base, table, count, iov_.data());
      if (!in_.ReadIov(iov_.data(), n, &io_) || !CheckPages(f, nullptr)) return;
      ApplyTable(f, nullptr);
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (RejectOnFailure(env, Op())) return;
    Napi::Object r = Counts(env);
    r.Set("prefixUsed", Napi::Number::New(env, static_cast<double>(in_.PrefixUsed())));
    r.Set("bytes", Napi::Number::New(env, static_cast<double>(in_.FromFd())));
    deferred_.Resolve(r);
  }

 protected:
  const char* Op() const override { return "GuestMemory.receiveFrames"; }

 private:
  int fd_;
  StreamReader in_;
  std::vector<uint8_t> frame_;  // a frame's header and page table
  std::vector<iovec> iov_;
};

// opts[key] as a u64; `dflt` when absent, a TypeError when required or not an integer.
uint64_t OptU64(Napi::Env env, Napi::Object opts, const char* key, const char* op, std::optional<uint64_t> dflt) {
  Napi::Value v = opts.Get(key);
  if (v.IsUndefined() && dflt) return *dflt;
  uint64_t u;
  if (ValueToU64(v, &u)) return u;
  throw Napi::TypeError::New(env, std::string(op) + ": opts." + key + " must be a non-negative integer");
}

}  // namespace

namespace {

// The arguments packPages and sendFrames share: (bitmap, fromPage, out, opts {seq, framePages?,
// toPage?, zeroCopy?}) from info[first]. `out` must hold a frame of one page, or with zeroCopy (the
// pages are not copied into it) a frame's header and table.
struct PackArgs {
  Napi::Buffer<uint8_t> bitmap, out;
  Napi::Object opts;
  uint64_t from, to, seq;
  uint32_t framePages;
  bool zeroCopy;
};

PackArgs ParsePackArgs(const Napi::CallbackInfo& info, size_t first, const char* op, uint64_t pages,
                       const std::function<void(size_t)>& checkBitmap) {
  PackArgs a;
  a.bitmap = BufferArg(info, first, op);
  a.from = U64Arg(info, first + 1, op, "fromPage");
  a.out = BufferArg(info, first + 2, op);
  if (!info[first + 3].IsObject())
    throw Napi::TypeError::New(info.Env(), std::string(op) + ": opts must be an object { seq, framePages?, ... }");
  a.opts = info[first + 3].As<Napi::Object>();
  a.seq = OptU64(info.Env(), a.opts, "seq", op, std::nullopt);
  uint64_t framePages = OptU64(info.Env(), a.opts, "framePages", op, kDefaultFramePages);
  a.to = OptU64(info.Env(), a.opts, "toPage", op, pages);
  checkBitmap(a.bitmap.Length());
  if (a.from > pages) throw Napi::RangeError::New(info.Env(), std::string(op) + ": fromPage " + std::to_string(a.from) + " is beyond the " + std::to_string(pages) + " pages");
  if (framePages == 0 || framePages > kMaxFramePages)
    throw Napi::RangeError::New(info.Env(), std::string(op) + ": framePages must be 1.." + std::to_string(kMaxFramePages));
  a.framePages = static_cast<uint32_t>(framePages);
  a.zeroCopy = a.opts.Get("zeroCopy").ToBoolean();
  const size_t zeroCopyNeed = kFrameHeaderBytes + TableBytes(a.framePages, a.framePages), copyNeed = kFrameHeaderBytes + TableBytes(1, 1) + kPageSize;
  if (a.zeroCopy && a.out.Length() < zeroCopyNeed)
    ThrowLength(info.Env(), op, "staging is " + std::to_string(a.out.Length()) + " bytes, a zero-copy frame's header, table and page CRCs need " +
                                    std::to_string(zeroCopyNeed));
  if (!a.zeroCopy && a.out.Length() < copyNeed)
    ThrowLength(info.Env(), op, "output buffer is " + std::to_string(a.out.Length()) + " bytes, a frame of one page needs " + std::to_string(copyNeed));
  return a;
}

// The stream calls' socket: a duplicate of the caller's fd, owned (and closed) by the task, so the
// caller closing its socket meanwhile cannot hand the number to another file.
int DupSocketFd(const Napi::CallbackInfo& info, const char* op) {
  uint64_t fd = U64Arg(info, 0, op, "fd");
  int d = fcntl(static_cast<int>(fd), F_DUPFD_CLOEXEC, 0);
  if (d < 0) throw MakeSysError(info.Env(), "fcntl(F_DUPFD_CLOEXEC)", errno);
  return d;
}

// opts.stallMs (required, 1..2^31) and opts.cancel (a Buffer whose first byte the JS thread sets
// to cancel the call).
std::pair<int, Napi::Buffer<uint8_t>> StreamOpts(Napi::Env env, Napi::Object opts, const char* op) {
  uint64_t stallMs = OptU64(env, opts, "stallMs", op, std::nullopt);
  if (stallMs == 0 || stallMs > INT32_MAX) throw Napi::RangeError::New(env, std::string(op) + ": opts.stallMs must be 1..2^31-1");
  Napi::Value c = opts.Get("cancel");
  if (!c.IsBuffer() || c.As<Napi::Buffer<uint8_t>>().Length() < 1)
    throw Napi::TypeError::New(env, std::string(op) + ": opts.cancel must be a Buffer of at least one byte");
  return {static_cast<int>(stallMs), c.As<Napi::Buffer<uint8_t>>()};
}

}  // namespace

Napi::Value GuestMemory::PackPages(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.packPages";
  uint64_t pages = size_ / kPageSize;
  PackArgs a = ParsePackArgs(info, 0, op, pages, [&](size_t len) { CheckPages(info.Env(), op, 0, pages, len); });
  if (a.zeroCopy) throw Napi::TypeError::New(info.Env(), std::string(op) + ": opts.zeroCopy is sendFrames' (packPages copies into `out`)");
  auto* t = new PackTask(info.Env(), this, info.This().As<Napi::Object>(), a.bitmap.Data(), a.from, a.to, a.out.Data(),
                         a.out.Length(), a.seq, a.framePages);
  t->Keep(a.bitmap);
  t->Keep(a.out);
  return t->Start();
}

Napi::Value GuestMemory::SendFrames(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.sendFrames";
  uint64_t pages = size_ / kPageSize;
  PackArgs a = ParsePackArgs(info, 1, op, pages, [&](size_t len) { CheckPages(info.Env(), op, 0, pages, len); });
  auto [stallMs, cancel] = StreamOpts(info.Env(), a.opts, op);
  bool end = a.opts.Get("end").ToBoolean();
  bool tearable = a.opts.Get("tearable").ToBoolean();
  uint64_t maxBytes = OptU64(info.Env(), a.opts, "maxBytes", op, UINT64_MAX);
  if (tearable && !a.zeroCopy) throw Napi::TypeError::New(info.Env(), std::string(op) + ": opts.tearable needs opts.zeroCopy (a copy cannot tear)");
  int fd = DupSocketFd(info, op);
  FrameTask* t;
  if (a.zeroCopy)
    t = new ZeroCopySendTask(info.Env(), this, info.This().As<Napi::Object>(), fd, a.bitmap.Data(), a.from, a.to, a.out.Data(),
                             a.out.Length(), a.seq, a.framePages, maxBytes, end, tearable, stallMs, cancel.Data());
  else
    t = new SendTask(info.Env(), this, info.This().As<Napi::Object>(), fd, a.bitmap.Data(), a.from, a.to, a.out.Data(),
                     a.out.Length(), a.seq, a.framePages, maxBytes, end, stallMs, cancel.Data());
  t->Keep(a.bitmap);
  t->Keep(a.out);
  t->Keep(cancel);
  return t->Start();
}

Napi::Value GuestMemory::ApplyFrames(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.applyFrames";
  Napi::Buffer<uint8_t> buf = BufferArg(info, 0, op);
  CheckPages(info.Env(), op, 0, 0, 0);  // not released
  auto* t = new ApplyTask(info.Env(), this, info.This().As<Napi::Object>(), buf.Data(), buf.Length());
  t->Keep(buf);
  return t->Start();
}

Napi::Value GuestMemory::ReceiveFrames(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.receiveFrames";
  Napi::Buffer<uint8_t> prefix = BufferArg(info, 1, op);
  if (!info[2].IsObject()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": opts must be an object { stallMs, cancel }");
  auto [stallMs, cancel] = StreamOpts(info.Env(), info[2].As<Napi::Object>(), op);
  CheckPages(info.Env(), op, 0, 0, 0);  // not released
  int fd = DupSocketFd(info, op);
  auto* t = new ReceiveTask(info.Env(), this, info.This().As<Napi::Object>(), fd, prefix.Data(), prefix.Length(), stallMs,
                            cancel.Data());
  t->Keep(prefix);
  t->Keep(cancel);
  return t->Start();
}

}  // namespace vcpud
