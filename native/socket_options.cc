#include "socket_options.h"

#include <sys/socket.h>

#include <climits>

#include "errors.h"

namespace vcpud {

namespace {

Napi::Value SetSendBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber() || !info[1].IsNumber()) throw Napi::TypeError::New(env, "setSendBuffer(fd, bytes): two numbers");
  int fd = info[0].As<Napi::Number>().Int32Value();
  int64_t bytes = info[1].As<Napi::Number>().Int64Value();
  if (fd < 0 || bytes < 1 || bytes > INT_MAX) throw Napi::RangeError::New(env, "setSendBuffer: fd >= 0, bytes 1..2^31-1");
  int v = static_cast<int>(bytes);
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) != 0) throw MakeSysError(env, "setsockopt(SO_SNDBUF)", errno);
  socklen_t len = sizeof v;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, &len) != 0) throw MakeSysError(env, "getsockopt(SO_SNDBUF)", errno);
  return Napi::Number::New(env, v);
}

}  // namespace

void RegisterSocketOptions(Napi::Env env, Napi::Object exports) {
  exports.Set("setSendBuffer", Napi::Function::New(env, SetSendBuffer, "setSendBuffer"));
}

}  // namespace vcpud
