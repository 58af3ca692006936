// Access to memory that may raise SIGBUS, survived. Guest memory restored lazily maps a snapshot
// file (MAP_PRIVATE); when someone truncates or rewrites that file in place (`cp other NAME`
// opens it O_TRUNC), every mapped page past the new end of file - even pages the guest has since
// written, which truncation discards too - raises SIGBUS on the next access, and without a guard
// that kills vcpud and every VM it owns.
//
// Why a SIGBUS handler that jumps out of guarded regions:
// - Checking the file (fstat) before an access is racy: it can shrink between the check and the
//   copy. vcpud still does it (GuestMemory.backingFiles) to notice rewrites that do not fault.
// - userfaultfd-based lazy restore (pages filled by vcpud from pread) would avoid the fault, but
//   every read of an unfilled page by vcpud or KVM would then wait on a fault-handling thread:
//   a larger change of the restore path for the same guarantee.
// - A handler must know whether a fault is one it may recover. A thread-local pointer set only
//   for the dynamic extent of GuardedRun says so; any other SIGBUS (another thread, code outside
//   a guard, one sent with kill) goes to the previous handler or the default action, exactly as
//   if this handler were not installed.
// The handler is installed once per process, on first use, and works on any thread (the JS thread,
// libuv pool threads). It is async-signal-safe: one initial-exec TLS load, siglongjmp, sigaction.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace vcpud {

// Runs fn(arg) on the calling thread. A SIGBUS the kernel raises for an access fn makes abandons
// fn at the faulting instruction (siglongjmp): returns false with the faulting address in
// *faultAddr. fn must hold nothing that needs unwinding (no destructors, locks or allocations live
// across an access that may fault). Guards nest.
bool GuardedRun(void (*fn)(void*), void* arg, uintptr_t* faultAddr);

// memcpy / Crc32c under GuardedRun: false (and the faulting address) when src or dst faulted.
bool GuardedCopy(void* dst, const void* src, size_t n, uintptr_t* faultAddr);
bool GuardedCrc32c(uint32_t* crc, const void* src, size_t n, uintptr_t* faultAddr);

// The JS error for a guarded access that faulted: code "MEMORY_FAULT", `offset` = the faulting
// byte's offset in the guest memory. JS thread only.
Napi::Error MakeMemoryFaultError(Napi::Env env, const char* op, uint64_t offset);

}  // namespace vcpud
