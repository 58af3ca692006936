// File operations relative to directory fds, for the snapshot directory's confinement.
#pragma once
#include <napi.h>

namespace vcpud {

// Adds exports.fsAt: openat2, openat, mkdirat, unlinkat, renameat, linkat, fstatat, readdir, clearNonblock, lockExclusive, constants.
void RegisterFsAt(Napi::Env env, Napi::Object exports);

}  // namespace vcpud
