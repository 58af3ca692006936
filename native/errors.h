// Errors thrown to JS carry the ioctl name, the errno number and its symbolic name,
// in the shape of Node's ErrnoException, so src/ffi can type them without parsing text.
#pragma once
#include <napi.h>
#include <string>

namespace vcpud {

// Result of one system call: ret as returned, err = errno captured right after it.
struct SysResult {
  long ret = 0;
  int err = 0;
  bool ok() const { return ret >= 0 && err == 0; }
};

// Builds the JS error for a failed call. `required` (>= 0) is attached for E2BIG size negotiation.
Napi::Error MakeSysError(Napi::Env env, const char* op, int err, long required = -1);

// KVM ioctls must return 0; a positive value is also a failure (one VMX SET path does it).
Napi::Error MakePositiveReturnError(Napi::Env env, const char* op, long ret);

// Throws a RangeError naming the argument when a caller-supplied length does not fit the struct.
[[noreturn]] void ThrowLength(Napi::Env env, const char* op, const std::string& what);

}  // namespace vcpud
