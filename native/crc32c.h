// CRC-32C (Castagnoli, the iSCSI/ext4 polynomial 0x1EDC6F41, reflected 0x82F63B78): the checksum of
// every snapshot chunk. Hardware CRC32 instructions (SSE4.2) with three interleaved streams when the
// CPU has them (x86-64 hosts running KVM do), a table-driven fallback otherwise.
#pragma once
#include <cstddef>
#include <cstdint>

namespace vcpud {

// Continues `crc` (0 for a new checksum) over `len` bytes: Crc32c(Crc32c(0, a), b) == Crc32c(0, a||b).
uint32_t Crc32c(uint32_t crc, const void* buf, size_t len);

// Copies `len` bytes from `src` to `dst` (not overlapping) and returns their CRC-32C continuing
// `crc`, in one pass: each word is checksummed as it is stored, so the result describes the bytes
// at `dst` even if `src` changes meanwhile.
uint32_t Crc32cCopy(uint32_t crc, void* dst, const void* src, size_t len);

// The table-driven path alone (what hosts without SSE4.2 run), so tests can compare both.
uint32_t Crc32cSoftware(uint32_t crc, const void* buf, size_t len);

}  // namespace vcpud
