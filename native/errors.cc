#include "errors.h"

#include <cstring>
#include <string>

namespace vcpud {

Napi::Error MakeSysError(Napi::Env env, const char* op, int err, long required) {
  const char* code = strerrorname_np(err);
  std::string codeStr = code ? code : "EUNKNOWN";
  std::string msg = std::string(op) + " failed: " + codeStr + " (" + std::to_string(err) + ", " +
                    strerror(err) + ")";
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("errno", Napi::Number::New(env, err));
  e.Set("code", Napi::String::New(env, codeStr));
  e.Set("syscall", Napi::String::New(env, op));
  if (required >= 0) e.Set("required", Napi::Number::New(env, static_cast<double>(required)));
  return e;
}

Napi::Error MakePositiveReturnError(Napi::Env env, const char* op, long ret) {
  Napi::Error e = Napi::Error::New(
      env, std::string(op) + " failed: returned " + std::to_string(ret) + " instead of 0");
  e.Set("errno", Napi::Number::New(env, 0));
  e.Set("code", Napi::String::New(env, "EPOSITIVE"));
  e.Set("syscall", Napi::String::New(env, op));
  e.Set("returned", Napi::Number::New(env, static_cast<double>(ret)));
  return e;
}

void ThrowLength(Napi::Env env, const char* op, const std::string& what) {
  throw Napi::RangeError::New(env, std::string(op) + ": " + what);
}

}  // namespace vcpud
