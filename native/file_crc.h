// CRC-32C of byte ranges of a file, read through a read-only mapping of it on the libuv pool: how a
// snapshot chain's restore verifies a layer's memory data without reading it through guest memory,
// so newer layers can be mapped over guest memory while older layers are still being checked.
#pragma once
#include <napi.h>

namespace vcpud {

// crc32cFileRanges(fd, ranges: Float64Array [offset0, length0, offset1, length1, ...], threads = 1)
//   -> Promise<Uint32Array>: the CRC-32C of each range, the ranges shared by `threads` threads (the
//   pool thread and threads - 1 of its own, up to 8) in about equal bytes. The descriptor is
//   duplicated, so the caller may close its own at once. A range past the end of the file
//   (truncated meanwhile) rejects with a MEMORY_FAULT error whose offset is the file offset that
//   faulted.
void RegisterFileCrc(Napi::Env env, Napi::Object exports);

}  // namespace vcpud
