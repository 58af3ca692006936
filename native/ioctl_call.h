// One prepared ioctl, runnable on the JS thread (sync twin) or on the libuv pool (async twin,
// a Promise). Every exported ioctl function is a Prepare function: it checks the JS arguments
// (fd, buffer lengths) and returns a Call; Sync<> and Async<> turn it into the two JS functions,
// so argument checks and result handling exist once per ioctl.
#pragma once
#include <napi.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstdint>

#include "errors.h"

namespace vcpud {

// How the ioctl's return value becomes the JS result.
enum class Returns {
  kZero,    // must be exactly 0; resolves to undefined
  kNumber,  // non-negative value (fd, size, count) resolves to a number
};

struct Call {
  const char* name = "";
  int fd = -1;
  unsigned long request = 0;
  void* arg = nullptr;  // pointer into a JS buffer, or the value itself for by-value ioctls
  Returns returns = Returns::kZero;
  // For E2BIG negotiation: reads the size the kernel wrote back into the struct (-1 if none).
  long (*required)(const void* arg) = nullptr;
  Napi::Value holder;  // the JS buffer, kept alive while an async call runs
  Napi::Value keep;    // a second buffer the struct points into (a dirty bitmap), kept alive too
  // Made again when a signal interrupted it before it did anything (KVM_CREATE_VM: registering its
  // MMU notifier gives up with EINTR whenever a signal is pending, e.g. a profiler's SIGPROF), at
  // most this many times; 0 for every other ioctl.
  int eintrRetries = 0;
  // Run on the argument after a call that succeeded, on the thread that made it (KVM_GET_CPUID2's count).
  void (*after)(void* arg) = nullptr;

  SysResult Run() const {
    SysResult r;
    for (int attempt = 0;; attempt++) {
      errno = 0;
      r.ret = ioctl(fd, request, arg);
      if (r.ret >= 0) {
        if (after) after(arg);
        return r;
      }
      r.err = errno;
      if (r.err != EINTR || attempt >= eintrRetries) return r;
    }
  }

  long RequiredSize() const { return required ? required(arg) : -1; }
};

// Converts a finished call into its JS value or throws its error.
inline Napi::Value Finish(Napi::Env env, const Call& c, const SysResult& r) {
  if (r.ret < 0) throw MakeSysError(env, c.name, r.err, r.err == E2BIG ? c.RequiredSize() : -1);
  if (c.returns == Returns::kZero) {
    if (r.ret != 0) throw MakePositiveReturnError(env, c.name, r.ret);
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(r.ret));
}

using PrepareFn = Call (*)(const Napi::CallbackInfo&);

template <PrepareFn Prepare>
Napi::Value Sync(const Napi::CallbackInfo& info) {
  Call c = Prepare(info);
  return Finish(info.Env(), c, c.Run());
}

class CallWorker : public Napi::AsyncWorker {
 public:
  CallWorker(Napi::Env env, Call call)
      : Napi::AsyncWorker(env), call_(call), deferred_(Napi::Promise::Deferred::New(env)) {
    if (call_.holder.IsObject()) holder_ = Napi::Persistent(call_.holder.As<Napi::Object>());
    if (call_.keep.IsObject()) keep_ = Napi::Persistent(call_.keep.As<Napi::Object>());
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { result_ = call_.Run(); }
  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(Finish(env, call_, result_));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }

 private:
  Call call_;
  SysResult result_;
  Napi::ObjectReference holder_;
  Napi::ObjectReference keep_;
  Napi::Promise::Deferred deferred_;
};

template <PrepareFn Prepare>
Napi::Value Async(const Napi::CallbackInfo& info) {
  Call c = Prepare(info);  // argument errors throw synchronously, before any work is queued
  auto* w = new CallWorker(info.Env(), c);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// Argument helpers shared by the Prepare functions.
int FdArg(const Napi::CallbackInfo& info, size_t i, const char* op);
Napi::Buffer<uint8_t> BufferArg(const Napi::CallbackInfo& info, size_t i, const char* op);
uint64_t U64Arg(const Napi::CallbackInfo& info, size_t i, const char* op, const char* what);
// A JS number (a non-negative safe integer) or BigInt as a u64; false for anything else.
bool ValueToU64(const Napi::Value& v, uint64_t* out);

}  // namespace vcpud
