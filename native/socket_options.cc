#include "socket_options.h"

#include <sys/socket.h>

#include <climits>

#include "errors.h"
#include "ioctl_call.h"

namespace vcpud {

namespace {

Napi::Value SetSendBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "setSendBuffer";
  int fd = FdArg(info, 0, op);
  uint64_t bytes = U64Arg(info, 1, op, "bytes");
  if (bytes < 1 || bytes > INT_MAX) throw Napi::RangeError::New(env, "setSendBuffer: bytes 1..2^31-1");
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
