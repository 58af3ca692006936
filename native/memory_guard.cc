#include "memory_guard.h"

#include <setjmp.h>
#include <signal.h>

#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "crc32c.h"

namespace vcpud {

namespace {

struct Guard {
  sigjmp_buf env;
  uintptr_t fault;
};

// initial-exec: the handler reads it with one %fs-relative load. The default model of a dlopen'ed
// addon goes through __tls_get_addr, which may allocate on a thread's first access: not
// async-signal-safe. A pointer fits glibc's static TLS surplus reserved for such modules.
thread_local Guard* tlGuard __attribute__((tls_model("initial-exec"))) = nullptr;

struct sigaction previous;

void OnSigbus(int sig, siginfo_t* info, void* ctx) {
  Guard* g = tlGuard;
  // si_code > 0: raised by the kernel for an access of this thread, not sent with kill/tgkill.
  if (g && info->si_code > 0) {
    g->fault = reinterpret_cast<uintptr_t>(info->si_addr);
    siglongjmp(g->env, 1);
  }
  if (previous.sa_flags & SA_SIGINFO) return previous.sa_sigaction(sig, info, ctx);
  if (previous.sa_handler == SIG_IGN && info->si_code <= 0) return;
  if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) return previous.sa_handler(sig);
  // The default action: a kernel fault happens again when we return, a sent signal is raised again.
  struct sigaction dfl = {};
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGBUS, &dfl, nullptr);
  if (info->si_code <= 0) raise(SIGBUS);
}

void InstallOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa = {};
    sa.sa_sigaction = OnSigbus;
    sigemptyset(&sa.sa_mask);
    // NODEFER: SIGBUS stays unblocked in the handler, so leaving it with siglongjmp needs no
    // signal mask restore (sigsetjmp(env, 0): no system call per guarded region).
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGBUS, &sa, &previous);
  });
}

struct CopyArgs {
  void* dst;
  const void* src;
  size_t n;
};

struct CrcArgs {
  uint32_t* crc;
  const void* src;
  size_t n;
};

}  // namespace

bool GuardedRun(void (*fn)(void*), void* arg, uintptr_t* faultAddr) {
  InstallOnce();
  Guard g;
  Guard* outer = tlGuard;
  if (sigsetjmp(g.env, 0) == 0) {
    tlGuard = &g;
    fn(arg);
    tlGuard = outer;
    return true;
  }
  tlGuard = outer;
  if (faultAddr) *faultAddr = g.fault;
  return false;
}

bool GuardedCopy(void* dst, const void* src, size_t n, uintptr_t* faultAddr) {
  CopyArgs a{dst, src, n};
  return GuardedRun([](void* p) {
    auto* c = static_cast<CopyArgs*>(p);
    memcpy(c->dst, c->src, c->n);
  }, &a, faultAddr);
}

bool GuardedCrc32c(uint32_t* crc, const void* src, size_t n, uintptr_t* faultAddr) {
  CrcArgs a{crc, src, n};
  return GuardedRun([](void* p) {
    auto* c = static_cast<CrcArgs*>(p);
    *c->crc = Crc32c(*c->crc, c->src, c->n);
  }, &a, faultAddr);
}

Napi::Error MakeMemoryFaultError(Napi::Env env, const char* op, uint64_t offset) {
  char hex[32];
  snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(offset));
  Napi::Error e = Napi::Error::New(env, std::string(op) + ": SIGBUS at guest memory offset " + hex +
                                            ": its backing could not provide the page (a file truncated under it, or a full filesystem under a file it writes)");
  e.Set("code", Napi::String::New(env, "MEMORY_FAULT"));
  e.Set("syscall", Napi::String::New(env, op));
  e.Set("offset", Napi::Number::New(env, static_cast<double>(offset)));
  return e;
}

}  // namespace vcpud
