// CRC-32C. The CRC32 instruction has a latency of three cycles and a throughput of one, so a
// single dependency chain runs at a third of the instruction's speed. Long buffers are therefore
// cut into three lanes checksummed side by side; the lanes are joined with the identity
//   raw(A || B) = raw(A) * x^(8|B|) mod P  xor  raw(B)
// (raw = the CRC without its initial and final inversion, which is linear), where multiplying by
// the constant x^(8|B|) mod P is a linear map on 32 bits, tabulated per byte once at start-up.
#include "crc32c.h"

#include <cstring>
#include <mutex>

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

namespace vcpud {
namespace {

// Bit-reflected: bit 31 holds the coefficient of x^0, bit 0 that of x^31, so a right shift
// multiplies by x. kPoly is P = x^32 + ... reflected, without its x^32 term.
constexpr uint32_t kPoly = 0x82f63b78;
constexpr uint32_t kOne = 0x80000000;  // the polynomial 1

uint32_t TimesX(uint32_t a) { return (a >> 1) ^ (a & 1 ? kPoly : 0); }

uint32_t MultiplyModP(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t coefficient = kOne; coefficient; coefficient >>= 1) {  // x^0, x^1, ... of a
    if (a & coefficient) product ^= b;
    b = TimesX(b);
  }
  return product;
}

// "Append `bytes` zero bytes to a raw CRC", i.e. multiply by x^(8*bytes) mod P, as four byte tables.
struct ZeroAppender {
  uint32_t byByte[4][256];

  void Init(size_t bytes) {
    uint32_t power = kOne;
    for (size_t i = 0; i < bytes * 8; i++) power = TimesX(power);
    for (int lane = 0; lane < 4; lane++)
      for (uint32_t v = 0; v < 256; v++) byByte[lane][v] = MultiplyModP(v << (8 * lane), power);
  }
  uint32_t Apply(uint32_t crc) const {
    return byByte[0][crc & 0xff] ^ byByte[1][(crc >> 8) & 0xff] ^ byByte[2][(crc >> 16) & 0xff] ^
           byByte[3][crc >> 24];
  }
};

// Lane widths, longest first: every buffer of at least three lanes of a width is taken in
// three-lane steps of that width before a narrower one. A 4 KiB page takes one 1 KiB step and
// two 128-byte steps, then 256 bytes in one chain.
constexpr size_t kLaneWidths[] = {8192, 1024, 128};
constexpr int kTiers = sizeof kLaneWidths / sizeof kLaneWidths[0];

struct Tables {
  uint32_t byteTable[256];  // the software path: one byte at a time
  ZeroAppender append[kTiers];
  bool hardware = false;
};

Tables g;
std::once_flag g_once;

void Init() {
  for (uint32_t v = 0; v < 256; v++) {
    uint32_t r = v;
    for (int bit = 0; bit < 8; bit++) r = TimesX(r);
    g.byteTable[v] = r;
  }
  for (int t = 0; t < kTiers; t++) g.append[t].Init(kLaneWidths[t]);
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) g.hardware = (c & bit_SSE4_2) != 0;
#endif
}

uint32_t RawSoftware(uint32_t raw, const uint8_t* p, size_t len) {
  for (size_t i = 0; i < len; i++) raw = g.byteTable[(raw ^ p[i]) & 0xff] ^ (raw >> 8);
  return raw;
}

#if defined(__x86_64__)
// Memory-level parallelism. The lanes keep few loads in flight, so on memory that is not in the
// caches (a guest page about to be sent, a snapshot's pages) each line was waited for in turn: 4 KiB
// pages scattered in DRAM took 157-181 ms per GiB, 59-62 with their lines requested first (46 -> 48
// in L1; BENCHMARKS.md, session 14). So the first kPrefetchUpFront bytes are requested at once,
// every other line: the L2's adjacent-line prefetcher fetches the pair, and a request per line cost
// more in L1 and gained nothing. Longer buffers need no more: past the first lines the hardware's
// stream prefetchers follow each lane (prefetching ahead in the lanes made 256 KiB in L2 25% slower
// and DRAM no faster).
constexpr size_t kCacheLine = 64;
constexpr size_t kPrefetchUpFront = 4096;

// kCopy: each word is also stored at `out` as it is checksummed, so the CRC describes the copy
// even if `p` changes meanwhile (a running guest's page), in one pass over `p`.
template <bool kCopy>
__attribute__((target("sse4.2"))) uint32_t RawHardware(uint32_t raw, const uint8_t* p, size_t len, uint8_t* out) {
  auto word = [](const uint8_t* at) {
    uint64_t w;
    memcpy(&w, at, sizeof w);
    return w;
  };
  auto put = [](uint8_t* at, uint64_t w) { memcpy(at, &w, sizeof w); };
  for (size_t off = 0; off < len && off < kPrefetchUpFront; off += 2 * kCacheLine) __builtin_prefetch(p + off);
  for (int t = 0; t < kTiers; t++) {
    const size_t width = kLaneWidths[t];
    while (len >= 3 * width) {
      uint64_t a = raw, b = 0, c = 0;
      for (size_t off = 0; off < width; off += 8) {
        const uint64_t wa = word(p + off), wb = word(p + width + off), wc = word(p + 2 * width + off);
        a = _mm_crc32_u64(a, wa);
        b = _mm_crc32_u64(b, wb);
        c = _mm_crc32_u64(c, wc);
        if constexpr (kCopy) {
          put(out + off, wa);
          put(out + width + off, wb);
          put(out + 2 * width + off, wc);
        }
      }
      raw = g.append[t].Apply(g.append[t].Apply(static_cast<uint32_t>(a)) ^ static_cast<uint32_t>(b)) ^
            static_cast<uint32_t>(c);
      p += 3 * width;
      len -= 3 * width;
      if constexpr (kCopy) out += 3 * width;
    }
  }
  uint64_t r = raw;
  for (; len >= 8; p += 8, len -= 8) {
    const uint64_t w = word(p);
    r = _mm_crc32_u64(r, w);
    if constexpr (kCopy) put(out, w), out += 8;
  }
  raw = static_cast<uint32_t>(r);
  for (; len; p++, len--) {
    const uint8_t v = *p;
    raw = _mm_crc32_u8(raw, v);
    if constexpr (kCopy) *out++ = v;
  }
  return raw;
}
#endif

}  // namespace

uint32_t Crc32c(uint32_t crc, const void* buf, size_t len) {
  std::call_once(g_once, Init);
  const uint8_t* p = static_cast<const uint8_t*>(buf);
#if defined(__x86_64__)
  if (g.hardware) return ~RawHardware<false>(~crc, p, len, nullptr);
#endif
  return ~RawSoftware(~crc, p, len);
}

uint32_t Crc32cCopy(uint32_t crc, void* dst, const void* src, size_t len) {
  std::call_once(g_once, Init);
  uint8_t* out = static_cast<uint8_t*>(dst);
#if defined(__x86_64__)
  if (g.hardware) return ~RawHardware<true>(~crc, static_cast<const uint8_t*>(src), len, out);
#endif
  memcpy(out, src, len);
  return ~RawSoftware(~crc, out, len);
}

uint32_t Crc32cSoftware(uint32_t crc, const void* buf, size_t len) {
  std::call_once(g_once, Init);
  return ~RawSoftware(~crc, static_cast<const uint8_t*>(buf), len);
}

}  // namespace vcpud
