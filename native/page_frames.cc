// GuestMemory.packPages and GuestMemory.applyFrames: the page-frame format of page_frames.h, on
// the libuv pool. Guest memory is touched only in PackTask::Run and ApplyTask::Apply, with nothing
// live there that needs unwinding (no allocation, lock or destructor: the page table's storage is
// reserved up front), so both run under the SIGBUS guard of memory_guard.h (RunGuarded).
#include "page_frames.h"

#include <sys/mman.h>

#include <cstring>
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

// MADV_POPULATE_WRITE (Linux 5.14); older libc headers lack the name.
constexpr int kMadvPopulateWrite = 23;

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

  bool faulted_ = false;
  uint64_t faultOffset_ = 0;
  GuestMemory* mem_;
  Napi::ObjectReference self_;
  std::vector<Napi::ObjectReference> refs_;
  Napi::Promise::Deferred deferred_;
};

class PackTask : public FrameTask {
 public:
  PackTask(Napi::Env env, GuestMemory* mem, Napi::Object self, const uint8_t* bitmap, uint64_t from, uint8_t* out,
           size_t outLen, uint64_t seq, uint32_t framePages)
      : FrameTask(env, mem, self), bitmap_(bitmap), page_(from), out_(out), outLen_(outLen), seq_(seq),
        framePages_(framePages) {
    table_.reserve(framePages_);
  }

  void Execute() override { RunGuarded<PackTask>(this); }

  void Run() {
    const uint8_t* base = mem_->Base();
    const uint64_t end = mem_->Size() / kPageSize;
    std::vector<uint64_t>& table = table_;  // capacity reserved: push_back never allocates here
    for (;;) {
      if (outLen_ - pos_ < kFrameHeaderBytes + 8) break;  // not even a zero page fits
      size_t room = outLen_ - pos_ - kFrameHeaderBytes, used = 0;
      uint32_t data = 0;
      table.clear();
      while (table.size() < framePages_) {
        uint64_t p = NextSetBit(bitmap_, page_, end);
        if (p == end) {
          page_ = end;
          break;
        }
        bool zero = PageIsZero(base + p * kPageSize);
        size_t need = 8 + (zero ? 0 : kPageSize);
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
      if (table.empty()) break;
      WriteFrame(base, table, data);
      if (page_ == end || full_) break;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (faulted_) return deferred_.Reject(MakeMemoryFaultError(env, "GuestMemory.packPages", faultOffset_).Value());
    Napi::Object r = Napi::Object::New(env);
    r.Set("nextPage", Napi::Number::New(env, static_cast<double>(page_)));
    r.Set("bytes", Napi::Number::New(env, static_cast<double>(pos_)));
    r.Set("pages", Napi::Number::New(env, static_cast<double>(pages_)));
    r.Set("zeroPages", Napi::Number::New(env, static_cast<double>(zeroPages_)));
    r.Set("frames", Napi::Number::New(env, static_cast<double>(frames_)));
    deferred_.Resolve(r);
  }

 private:
  void WriteFrame(const uint8_t* base, const std::vector<uint64_t>& table, uint32_t data) {
    uint8_t* f = out_ + pos_;
    Store<uint32_t>(f + 0, kFrameMagic);
    Store<uint16_t>(f + 4, kFrameVersion);
    Store<uint16_t>(f + 6, 0);
    Store<uint64_t>(f + 8, seq_ + frames_);
    Store<uint32_t>(f + 16, static_cast<uint32_t>(table.size()));
    Store<uint32_t>(f + 20, data);
    uint8_t* t = f + kFrameHeaderBytes;
    memcpy(t, table.data(), table.size() * 8);  // little-endian host (x86-64)
    uint8_t* payload = t + table.size() * 8;
    uint32_t crc = Crc32c(Crc32c(0, f, 24), t, table.size() * 8);
    // The CRC runs over the copy, so it describes the bytes that leave even if the guest writes on;
    // page by page, while the copy is still in L1.
    for (uint64_t e : table) {
      if (e & kFrameZeroPage) continue;
      memcpy(payload, base + e * kPageSize, kPageSize);
      crc = Crc32c(crc, payload, kPageSize);
      payload += kPageSize;
    }
    Store<uint32_t>(f + 24, crc);
    Store<uint32_t>(f + 28, Crc32c(0, f, 28));
    pos_ += static_cast<size_t>(payload - f);
    pages_ += table.size();
    zeroPages_ += table.size() - data;
    frames_++;
  }

  const uint8_t* bitmap_;
  uint64_t page_;
  uint8_t* out_;
  size_t outLen_;
  uint64_t seq_;
  uint32_t framePages_;
  std::vector<uint64_t> table_;
  size_t pos_ = 0;
  bool full_ = false;
  uint64_t pages_ = 0, zeroPages_ = 0, frames_ = 0;
};

class ApplyTask : public FrameTask {
 public:
  ApplyTask(Napi::Env env, GuestMemory* mem, Napi::Object self, const uint8_t* buf, size_t len)
      : FrameTask(env, mem, self), buf_(buf), len_(len) {}

  void Execute() override { RunGuarded<ApplyTask>(this); }

  void Run() {
    while (len_ - pos_ >= kFrameHeaderBytes) {
      size_t frameLen = 0;
      if (!Verify(buf_ + pos_, len_ - pos_, &frameLen)) return;
      if (frameLen == 0) return;  // incomplete trailing frame: wait for more bytes
      Apply(buf_ + pos_);
      pos_ += frameLen;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (faulted_) return deferred_.Reject(MakeMemoryFaultError(env, "GuestMemory.applyFrames", faultOffset_).Value());
    if (!check_.empty()) {
      Napi::Error e = Napi::Error::New(env, "applyFrames: frame at byte " + std::to_string(pos_) + " (seq " +
                                                std::to_string(badSeq_) + (seqTrusted_ ? "" : ", unverified") +
                                                "): " + check_ + ": " + detail_);
      e.Set("code", Napi::String::New(env, "EFRAME"));
      e.Set("check", Napi::String::New(env, check_));
      e.Set("seq", Napi::BigInt::New(env, badSeq_));
      e.Set("offset", Napi::Number::New(env, static_cast<double>(pos_)));
      e.Set("consumed", Napi::Number::New(env, static_cast<double>(pos_)));
      deferred_.Reject(e.Value());
      return;
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("consumed", Napi::Number::New(env, static_cast<double>(pos_)));
    r.Set("pages", Napi::Number::New(env, static_cast<double>(pages_)));
    r.Set("zeroPages", Napi::Number::New(env, static_cast<double>(zeroPages_)));
    r.Set("frames", Napi::Number::New(env, static_cast<double>(frames_)));
    if (frames_) r.Set("lastSeq", Napi::BigInt::New(env, lastSeq_));
    deferred_.Resolve(r);
  }

 private:
  bool Fail(const char* check, std::string detail) {
    check_ = check;
    detail_ = std::move(detail);
    return false;
  }

  // True with *frameLen = 0 when the frame is not all there yet; false (check_ set) when corrupt.
  bool Verify(const uint8_t* f, size_t avail, size_t* frameLen) {
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
    if (flags) return Fail("flags", "unknown bits 0x" + Hex(flags));
    uint32_t count = Load<uint32_t>(f + 16), data = Load<uint32_t>(f + 20);
    if (count == 0 || count > kMaxFramePages || data > count)
      return Fail("page_count", std::to_string(count) + " pages (" + std::to_string(data) + " with data), allowed 1.." +
                                    std::to_string(kMaxFramePages));
    size_t need = kFrameHeaderBytes + 8 * size_t{count} + kPageSize * size_t{data};
    *frameLen = 0;
    if (avail < need) return true;
    uint32_t crc = Crc32c(Crc32c(0, f, 24), f + kFrameHeaderBytes, need - kFrameHeaderBytes);
    if (crc != Load<uint32_t>(f + 24))
      return Fail("crc", "computed 0x" + Hex(crc) + ", the frame says 0x" + Hex(Load<uint32_t>(f + 24)));
    const uint64_t pages = mem_->Size() / kPageSize;
    uint32_t withData = 0;
    for (uint32_t i = 0; i < count; i++) {
      uint64_t e = Load<uint64_t>(f + kFrameHeaderBytes + 8 * i);
      uint64_t p = e & ~kFrameZeroPage;
      if (p >= pages)
        return Fail("page_number", "entry " + std::to_string(i) + " names page " + std::to_string(p) +
                                       ", the memory has " + std::to_string(pages));
      withData += !(e & kFrameZeroPage);
    }
    if (withData != data)
      return Fail("page_count", std::to_string(withData) + " table entries carry data, the header says " + std::to_string(data));
    *frameLen = need;
    return true;
  }

  void Apply(const uint8_t* f) {
    uint8_t* base = mem_->Base();
    uint32_t count = Load<uint32_t>(f + 16);
    const uint8_t* payload = f + kFrameHeaderBytes + 8 * size_t{count};
    PopulateDataRuns(base, f + kFrameHeaderBytes, count);
    for (uint32_t i = 0; i < count; i++) {
      uint64_t e = Load<uint64_t>(f + kFrameHeaderBytes + 8 * i);
      uint8_t* page = base + (e & ~kFrameZeroPage) * kPageSize;
      if (e & kFrameZeroPage) {
        zeroPages_++;
        if (PageIsZero(page)) continue;  // an untouched page stays unallocated
        memset(page, 0, kPageSize);
      } else {
        memcpy(page, payload, kPageSize);
        payload += kPageSize;
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
  uint64_t pages_ = 0, zeroPages_ = 0, frames_ = 0, lastSeq_ = 0;
  std::string check_, detail_;
  uint64_t badSeq_ = 0;
  bool seqTrusted_ = false;
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

Napi::Value GuestMemory::PackPages(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.packPages";
  Napi::Buffer<uint8_t> bitmap = BufferArg(info, 0, op);
  uint64_t from = U64Arg(info, 1, op, "fromPage");
  Napi::Buffer<uint8_t> out = BufferArg(info, 2, op);
  if (!info[3].IsObject()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": opts must be an object { seq, framePages? }");
  Napi::Object opts = info[3].As<Napi::Object>();
  uint64_t seq = OptU64(info.Env(), opts, "seq", op, std::nullopt);
  uint64_t framePages = OptU64(info.Env(), opts, "framePages", op, kDefaultFramePages);
  uint64_t pages = size_ / kPageSize;
  CheckPages(info.Env(), op, 0, pages, bitmap.Length());
  if (from > pages) throw Napi::RangeError::New(info.Env(), std::string(op) + ": fromPage " + std::to_string(from) + " is beyond the " + std::to_string(pages) + " pages");
  if (framePages == 0 || framePages > kMaxFramePages)
    throw Napi::RangeError::New(info.Env(), std::string(op) + ": framePages must be 1.." + std::to_string(kMaxFramePages));
  if (out.Length() < kFrameHeaderBytes + 8 + kPageSize)
    ThrowLength(info.Env(), op, "output buffer is " + std::to_string(out.Length()) + " bytes, a frame of one page needs " + std::to_string(kFrameHeaderBytes + 8 + kPageSize));
  auto* t = new PackTask(info.Env(), this, info.This().As<Napi::Object>(), bitmap.Data(), from, out.Data(), out.Length(), seq,
                         static_cast<uint32_t>(framePages));
  t->Keep(bitmap);
  t->Keep(out);
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

}  // namespace vcpud
