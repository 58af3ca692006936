// Filling fresh (never touched) anonymous memory with UFFDIO_COPY: the kernel allocates each page
// with the data already in it, instead of a fault that allocates and zeroes the page followed by a
// copy over the zeroes (BENCHMARKS.md, "RestoreSnapshotStream: where the time goes").
#pragma once
#include <cstddef>
#include <cstdint>

namespace vcpud {

// One range registered with a userfaultfd for as long as the object lives. While registered, a
// user-mode touch of a missing page in it raises SIGBUS (UFFD_FEATURE_SIGBUS; nothing waits for a
// handler) and a kernel-mode one is served as usual (UFFD_USER_MODE_ONLY): the caller must be the
// only one touching the range's missing pages meanwhile.
class MissingPageFill {
 public:
  MissingPageFill() = default;
  MissingPageFill(const MissingPageFill&) = delete;
  MissingPageFill& operator=(const MissingPageFill&) = delete;
  ~MissingPageFill() { End(); }

  // Registers [p, +len) (page-aligned); false, with nothing registered, when the kernel, its
  // settings or the mapping (only private anonymous memory qualifies here) do not allow it.
  bool Begin(uint8_t* p, size_t len);
  bool Active() const { return fd_ >= 0; }
  // Copies `len` bytes (whole pages, dst page-aligned, inside the range) from src: missing pages
  // are filled by UFFDIO_COPY, pages already present are written in place. If the kernel refuses
  // a copy for another reason the range is unregistered and the rest copied as usual.
  void Copy(uint8_t* dst, const uint8_t* src, size_t len);
  // Unregisters the range (idempotent).
  void End();

 private:
  int fd_ = -1;
  uint8_t* start_ = nullptr;
  size_t len_ = 0;
};

}  // namespace vcpud
