// GuestMemory.populate: faults in (commits) a range of guest memory ahead of its use, on the libuv
// pool, with MADV_POPULATE_WRITE (Linux 5.14) in chunks so a cancel is seen between them. A range
// the host cannot commit rejects with the errno (ENOMEM: no memory, or a memory cgroup's limit with
// nothing it may reclaim or kill; EFAULT: a page whose access would SIGBUS, e.g. a full tmpfs or
// hugetlbfs; EINVAL: a kernel without MADV_POPULATE_WRITE) and the offset reached.
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <string>

#include "errors.h"
#include "guest_memory.h"
#include "ioctl_call.h"

namespace vcpud {

namespace {

// 64 MiB: 20-170 ms of faulting here (0.3-2.6 s per GiB), the latency of a cancel.
constexpr size_t kPopulateChunk = 64u << 20;

class PopulateTask : public Napi::AsyncWorker {
 public:
  PopulateTask(Napi::Env env, GuestMemory* mem, Napi::Object self, uint64_t offset, uint64_t length, Napi::Buffer<uint8_t> cancel)
      : Napi::AsyncWorker(env), mem_(mem), self_(Napi::Persistent(self)), offset_(offset), length_(length),
        cancel_(cancel.IsEmpty() ? nullptr : cancel.Data()), deferred_(Napi::Promise::Deferred::New(env)) {
    if (cancel_) cancelRef_ = Napi::Persistent(cancel.As<Napi::Object>());
    mem_->BeginBusy();
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

  void Execute() override {
    uint8_t* base = mem_->Base();
    while (done_ < length_) {
      if (cancel_ && __atomic_load_n(cancel_, __ATOMIC_RELAXED)) {
        err_ = ECANCELED;
        return;
      }
      size_t n = std::min<uint64_t>(kPopulateChunk, length_ - done_);
      if (madvise(base + offset_ + done_, n, kMadvPopulateWrite) != 0) {
        if (errno == EINTR) continue;  // interrupted before it finished: the pages done stay done
        err_ = errno;
        return;
      }
      done_ += n;
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    mem_->EndBusy();
    if (!err_) return deferred_.Resolve(Napi::Number::New(env, static_cast<double>(done_)));
    Napi::Error e = MakeSysError(env, "madvise(MADV_POPULATE_WRITE)", err_);
    e.Set("offset", Napi::Number::New(env, static_cast<double>(offset_ + done_)));
    deferred_.Reject(e.Value());
  }

 private:
  GuestMemory* mem_;
  Napi::ObjectReference self_;  // keeps the GuestMemory alive while the task runs
  uint64_t offset_, length_;
  const uint8_t* cancel_;
  Napi::ObjectReference cancelRef_;
  uint64_t done_ = 0;  // bytes populated, from offset_ on
  int err_ = 0;
  Napi::Promise::Deferred deferred_;
};

}  // namespace

Napi::Value GuestMemory::Populate(const Napi::CallbackInfo& info) {
  const char* op = "GuestMemory.populate";
  uint64_t off = U64Arg(info, 0, op, "offset");
  uint64_t len = U64Arg(info, 1, op, "length");
  CheckRange(info.Env(), op, off, len);
  if (off % kPageSize || len % kPageSize) throw Napi::RangeError::New(info.Env(), std::string(op) + ": offset and length must be page-aligned");
  Napi::Buffer<uint8_t> cancel;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    cancel = BufferArg(info, 2, op);
    if (cancel.Length() < 1) throw Napi::TypeError::New(info.Env(), std::string(op) + ": cancel must be a Buffer of at least one byte");
  }
  auto* t = new PopulateTask(info.Env(), this, info.This().As<Napi::Object>(), off, len, cancel);
  Napi::Promise p = t->Promise();
  t->Queue();
  return p;
}

}  // namespace vcpud
