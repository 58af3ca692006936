// Three-stream hardware CRC-32C after Mark Adler's crc32c.c (zlib licence): the buffer is cut into
// three blocks whose CRCs run in parallel through the CRC32 instruction (latency 3, throughput 1),
// then combined by "shifting" the earlier CRCs over the later blocks' lengths with precomputed
// GF(2) operator tables.
#include "crc32c.h"

#include <cstring>
#include <mutex>

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

namespace vcpud {
namespace {

constexpr uint32_t kPoly = 0x82f63b78;  // reflected Castagnoli
constexpr size_t kLong = 8192;
constexpr size_t kShort = 256;

uint32_t g_table[8][256];       // slicing-by-8 for the software path
uint32_t g_long[4][256];        // operator: append kLong zero bytes
uint32_t g_short[4][256];       // operator: append kShort zero bytes
bool g_hw = false;
std::once_flag g_once;

uint32_t Gf2MatrixTimes(const uint32_t* mat, uint32_t vec) {
  uint32_t sum = 0;
  while (vec) {
    if (vec & 1) sum ^= *mat;
    vec >>= 1;
    mat++;
  }
  return sum;
}

void Gf2MatrixSquare(uint32_t* square, const uint32_t* mat) {
  for (int n = 0; n < 32; n++) square[n] = Gf2MatrixTimes(mat, mat[n]);
}

// The operator that appends `len` zero bytes (len a power of two) to a CRC.
void ZerosOp(uint32_t* even, size_t len) {
  uint32_t odd[32];
  odd[0] = kPoly;  // one zero bit
  uint32_t row = 1;
  for (int n = 1; n < 32; n++) {
    odd[n] = row;
    row <<= 1;
  }
  Gf2MatrixSquare(even, odd);  // two zero bits
  Gf2MatrixSquare(odd, even);  // four zero bits
  do {
    Gf2MatrixSquare(even, odd);
    len >>= 1;
    if (len == 0) return;
    Gf2MatrixSquare(odd, even);
    len >>= 1;
  } while (len);
  memcpy(even, odd, sizeof odd);
}

void Zeros(uint32_t zeros[][256], size_t len) {
  uint32_t op[32];
  ZerosOp(op, len);
  for (uint32_t n = 0; n < 256; n++) {
    zeros[0][n] = Gf2MatrixTimes(op, n);
    zeros[1][n] = Gf2MatrixTimes(op, n << 8);
    zeros[2][n] = Gf2MatrixTimes(op, n << 16);
    zeros[3][n] = Gf2MatrixTimes(op, n << 24);
  }
}

inline uint32_t Shift(uint32_t zeros[][256], uint32_t crc) {
  return zeros[0][crc & 0xff] ^ zeros[1][(crc >> 8) & 0xff] ^ zeros[2][(crc >> 16) & 0xff] ^
         zeros[3][crc >> 24];
}

void Init() {
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = n;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ kPoly : c >> 1;
    g_table[0][n] = c;
  }
  for (uint32_t n = 0; n < 256; n++) {
    uint32_t c = g_table[0][n];
    for (int k = 1; k < 8; k++) {
      c = g_table[0][c & 0xff] ^ (c >> 8);
      g_table[k][n] = c;
    }
  }
  Zeros(g_long, kLong);
  Zeros(g_short, kShort);
#if defined(__x86_64__)
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) g_hw = (c & bit_SSE4_2) != 0;
#endif
}

uint32_t Software(uint32_t crc, const uint8_t* p, size_t len) {
  uint64_t c = crc ^ 0xffffffffu;
  while (len && (reinterpret_cast<uintptr_t>(p) & 7)) {
    c = g_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    len--;
  }
  while (len >= 8) {
    uint64_t w;
    memcpy(&w, p, 8);
    w ^= c;
    c = g_table[7][w & 0xff] ^ g_table[6][(w >> 8) & 0xff] ^ g_table[5][(w >> 16) & 0xff] ^
        g_table[4][(w >> 24) & 0xff] ^ g_table[3][(w >> 32) & 0xff] ^ g_table[2][(w >> 40) & 0xff] ^
        g_table[1][(w >> 48) & 0xff] ^ g_table[0][w >> 56];
    p += 8;
    len -= 8;
  }
  while (len--) c = g_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
  return static_cast<uint32_t>(c) ^ 0xffffffffu;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t Hardware(uint32_t crc, const uint8_t* next, size_t len) {
  uint64_t crc0 = crc ^ 0xffffffffu;
  while (len && (reinterpret_cast<uintptr_t>(next) & 7)) {
    crc0 = _mm_crc32_u8(static_cast<uint32_t>(crc0), *next++);
    len--;
  }
  auto load = [](const uint8_t* p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
  };
  while (len >= kLong * 3) {
    uint64_t crc1 = 0, crc2 = 0;
    const uint8_t* end = next + kLong;
    do {
      crc0 = _mm_crc32_u64(crc0, load(next));
      crc1 = _mm_crc32_u64(crc1, load(next + kLong));
      crc2 = _mm_crc32_u64(crc2, load(next + kLong * 2));
      next += 8;
    } while (next < end);
    crc0 = Shift(g_long, static_cast<uint32_t>(crc0)) ^ crc1;
    crc0 = Shift(g_long, static_cast<uint32_t>(crc0)) ^ crc2;
    next += kLong * 2;
    len -= kLong * 3;
  }
  while (len >= kShort * 3) {
    uint64_t crc1 = 0, crc2 = 0;
    const uint8_t* end = next + kShort;
    do {
      crc0 = _mm_crc32_u64(crc0, load(next));
      crc1 = _mm_crc32_u64(crc1, load(next + kShort));
      crc2 = _mm_crc32_u64(crc2, load(next + kShort * 2));
      next += 8;
    } while (next < end);
    crc0 = Shift(g_short, static_cast<uint32_t>(crc0)) ^ crc1;
    crc0 = Shift(g_short, static_cast<uint32_t>(crc0)) ^ crc2;
    next += kShort * 2;
    len -= kShort * 3;
  }
  while (len >= 8) {
    crc0 = _mm_crc32_u64(crc0, load(next));
    next += 8;
    len -= 8;
  }
  while (len--) crc0 = _mm_crc32_u8(static_cast<uint32_t>(crc0), *next++);
  return static_cast<uint32_t>(crc0) ^ 0xffffffffu;
}
#endif

}  // namespace

uint32_t Crc32c(uint32_t crc, const void* buf, size_t len) {
  std::call_once(g_once, Init);
  const uint8_t* p = static_cast<const uint8_t*>(buf);
#if defined(__x86_64__)
  if (g_hw) return Hardware(crc, p, len);
#endif
  return Software(crc, p, len);
}

uint32_t Crc32cSoftware(uint32_t crc, const void* buf, size_t len) {
  std::call_once(g_once, Init);
  return Software(crc, static_cast<const uint8_t*>(buf), len);
}

}  // namespace vcpud
