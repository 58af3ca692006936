#include "file_crc.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "errors.h"
#include "guest_memory.h"
#include "ioctl_call.h"
#include "memory_guard.h"

namespace vcpud {
namespace {

constexpr uint64_t kMaxThreads = 8;

class FileCrcTask : public Napi::AsyncWorker {
 public:
  FileCrcTask(Napi::Env env, int fd, std::vector<uint64_t> ranges, unsigned threads)
      : Napi::AsyncWorker(env), fd_(fd), ranges_(std::move(ranges)), threads_(threads), crcs_(ranges_.size() / 2),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  ~FileCrcTask() override { close(fd_); }

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    size_t n = ranges_.size() / 2;
    if (!n) return;
    // One mapping of the span all ranges lie in (the ranges of one layer are close together).
    uint64_t lo = UINT64_MAX, hi = 0, total = 0;
    for (size_t i = 0; i < n; i++) {
      lo = std::min(lo, ranges_[2 * i]);
      hi = std::max(hi, ranges_[2 * i] + ranges_[2 * i + 1]);
      total += ranges_[2 * i + 1];
    }
    lo -= lo % kPageSize;  // mmap's offset is page-aligned
    size_t span = hi - lo;
    void* p = mmap(nullptr, span, PROT_READ, MAP_SHARED, fd_, static_cast<off_t>(lo));
    if (p == MAP_FAILED) {
      err_ = errno;
      return;
    }
    base_ = static_cast<const uint8_t*>(p);
    lo_ = lo;
    // Ranges [first, end) per thread, about the same bytes each; this thread takes the first share.
    std::vector<size_t> cuts{0};
    uint64_t seen = 0;
    for (size_t i = 0; i < n && cuts.size() < threads_; i++) {
      seen += ranges_[2 * i + 1];
      if (seen * threads_ >= total * cuts.size()) cuts.push_back(i + 1);
    }
    cuts.push_back(n);
    faults_.assign(cuts.size() - 1, Fault{});
    std::vector<std::thread> helpers;
    for (size_t t = 1; t + 1 < cuts.size(); t++) {
      try {
        helpers.emplace_back(&FileCrcTask::Share, this, t, cuts[t], cuts[t + 1]);
      } catch (const std::system_error&) {
        Share(t, cuts[t], cuts[t + 1]);  // no thread to be had: this one does that share too
      }
    }
    Share(0, cuts[0], cuts[1]);
    for (std::thread& h : helpers) h.join();
    munmap(p, span);
  }

  void OnOK() override {
    Napi::Env env = Env();
    for (const Fault& f : faults_)  // the first range (in order) that faulted
      if (f.faulted) return deferred_.Reject(MakeMemoryFaultError(env, "crc32cFileRanges", f.offset).Value());
    if (err_) return deferred_.Reject(MakeSysError(env, "mmap", err_).Value());
    Napi::Uint32Array out = Napi::Uint32Array::New(env, crcs_.size());
    std::copy(crcs_.begin(), crcs_.end(), out.Data());
    deferred_.Resolve(out);
  }

 private:
  struct Fault {
    bool faulted = false;
    uint64_t offset = 0;  // in the file
  };

  // Checksums ranges [first, end) into crcs_, stopping at a fault (recorded as share `t`'s).
  void Share(size_t t, size_t first, size_t end) {
    for (size_t i = first; i < end; i++) {
      uintptr_t fault = 0;
      uint32_t crc = 0;
      if (!GuardedCrc32c(&crc, base_ + (ranges_[2 * i] - lo_), ranges_[2 * i + 1], &fault)) {
        faults_[t] = {true, lo_ + (fault - reinterpret_cast<uintptr_t>(base_))};
        return;
      }
      crcs_[i] = crc;
    }
  }

  int fd_;
  std::vector<uint64_t> ranges_;
  unsigned threads_;
  std::vector<uint32_t> crcs_;
  const uint8_t* base_ = nullptr;
  uint64_t lo_ = 0;
  std::vector<Fault> faults_;
  int err_ = 0;
  Napi::Promise::Deferred deferred_;
};

Napi::Value Crc32cFileRanges(const Napi::CallbackInfo& info) {
  const char* op = "crc32cFileRanges";
  Napi::Env env = info.Env();
  int fd = FdArg(info, 0, op);
  if (info.Length() < 2 || !info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw Napi::TypeError::New(env, std::string(op) + ": ranges must be a Float64Array");
  Napi::Float64Array a = info[1].As<Napi::Float64Array>();
  if (a.ElementLength() % 2) throw Napi::RangeError::New(env, std::string(op) + ": ranges must hold (offset, length) pairs");
  std::vector<uint64_t> ranges(a.ElementLength());
  for (size_t i = 0; i < ranges.size(); i++) {
    double v = a[i];
    if (!(v >= 0 && v <= 9007199254740991.0) || v != static_cast<double>(static_cast<uint64_t>(v)))
      throw Napi::RangeError::New(env, std::string(op) + ": range value " + std::to_string(i) + " is not a non-negative integer");
    ranges[i] = static_cast<uint64_t>(v);
  }
  uint64_t threads = info.Length() > 2 && !info[2].IsUndefined() ? U64Arg(info, 2, op, "threads") : 1;
  if (threads < 1 || threads > kMaxThreads)
    throw Napi::RangeError::New(env, std::string(op) + ": threads must be 1 to " + std::to_string(kMaxThreads));
  int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0) throw MakeSysError(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
  auto* t = new FileCrcTask(env, dup, std::move(ranges), static_cast<unsigned>(threads));
  Napi::Promise p = t->Promise();
  t->Queue();
  return p;
}

}  // namespace

void RegisterFileCrc(Napi::Env env, Napi::Object exports) {
  exports.Set("crc32cFileRanges", Napi::Function::New(env, Crc32cFileRanges, "crc32cFileRanges"));
}

}  // namespace vcpud
