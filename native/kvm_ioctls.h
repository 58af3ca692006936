#pragma once
#include <napi.h>

namespace vcpud {
// Exports every KVM ioctl as fn (sync) and fnAsync (Promise), plus openKvm, closeFd and sizes.
void RegisterIoctls(Napi::Env env, Napi::Object exports);
}  // namespace vcpud
