// The pages of one guest memory that vcpud itself wrote (GuestMemory write, readFromFd, mapFile,
// applyFrames), for a live migration: KVM's dirty log sees only the guest's writes. One bit per
// 4 KiB page in atomic words, so writers on the libuv pool and Take() on the JS thread never lose
// a bit. A writer marks after its copy: a Take() that sees the bit also sees the bytes.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace vcpud {

class WrittenPages {
 public:
  // Starts (clearing any old bits) or stops recording. JS thread only.
  void Track(bool on, size_t pages) {
    if (on) {
      if (!words_) {
        nwords_ = (pages + 63) / 64;
        words_.reset(new std::atomic<uint64_t>[nwords_]);
      }
      for (size_t i = 0; i < nwords_; i++) words_[i].store(0, std::memory_order_relaxed);
    }
    // The array stays allocated once made: a pool writer that read on == true may still use it.
    on_.store(on, std::memory_order_release);
  }

  bool tracking() const { return on_.load(std::memory_order_acquire); }

  // Marks the pages of [offset, +len) (bytes). Any thread.
  void Mark(uint64_t offset, uint64_t len) {
    if (len == 0 || !tracking()) return;
    for (uint64_t p = offset / 4096, last = (offset + len - 1) / 4096; p <= last;) {
      uint64_t w = p / 64, bit = p % 64;
      uint64_t n = std::min<uint64_t>(64 - bit, last - p + 1);
      uint64_t mask = n == 64 ? ~0ull : ((1ull << n) - 1) << bit;
      words_[w].fetch_or(mask, std::memory_order_release);
      p += n;
    }
  }

  // ORs the recorded bits into `out` (LSB first, bit i = page i; `bytes` long) and clears them.
  void Take(uint8_t* out, size_t bytes) {
    if (!words_) return;
    for (size_t w = 0; w < nwords_ && w * 8 < bytes; w++) {
      if (words_[w].load(std::memory_order_relaxed) == 0) continue;
      uint64_t v = words_[w].exchange(0, std::memory_order_acq_rel);
      for (size_t b = 0; b < 8 && w * 8 + b < bytes; b++) out[w * 8 + b] |= static_cast<uint8_t>(v >> (8 * b));
    }
  }

 private:
  std::atomic<bool> on_{false};
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
  size_t nwords_ = 0;
};

}  // namespace vcpud
