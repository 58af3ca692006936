// Socket options Node does not set on stream sockets.
#pragma once
#include <napi.h>

namespace vcpud {

// Exports setSendBuffer(fd, bytes) -> number: SO_SNDBUF on the socket fd (the kernel caps it at
// net.core.wmem_max and doubles it for its bookkeeping); answers the size in effect, as
// getsockopt reads it. Throws with the errno.
void RegisterSocketOptions(Napi::Env env, Napi::Object exports);

}  // namespace vcpud
