// A protobuf wire-format writer driven by a program of 32-bit words: the mechanism GetState uses to turn
// the bytes a vCPU ioctl returned into a message's bytes without building JS values in between. What a
// program writes (field numbers, offsets, types) is decided in src/server/convert/raw-state.ts, which
// compiles it from the ffi layouts and the proto descriptors; this file only runs it.
#pragma once
#include <napi.h>

#include <cstdint>
#include <vector>

namespace vcpud {

// Op codes, exported to JS as `wireOps` so the compiler and this interpreter share one table. An op word
// holds its code in the low 8 bits and, for the ops that write a value or begin a body, may hold a field
// tag above them (kTagShift, exported as wireOps.TAG_SHIFT) that is written first; 0 means none. Offsets
// are bytes from the current base (the input's start, or the element a loop is at); every read is
// bounds-checked.
//   LIT n, ceil(n/4) words        n literal bytes (tags, constant strings), packed little-endian
//   U8/U16/U32 off                 the unsigned integer at off, as a varint
//   BOOL off                       1 when the byte at off is non-zero, else 0
//   U64 off                        the u64 at off, as a varint
//   BYTES off len                  len, then len bytes from off (a bytes field's length and contents)
//   REST off                       the same for every byte from off to the input's end
//   BEGIN / END                    a length-delimited body between them (nested messages, packed lists)
//   MAP off n default t0..tn-1     the u32 v at off mapped: t[v] when v < n, else default, as a varint
//                                  (a proto enum's number from a kernel value)
//   INPUT k                        reads from input k from here on, its base at its start
//   LOOP count_off max off stride body_words
//                                  the next body_words words, once per element: min(u32 at count_off, max)
//                                  times, the base moved to off + i * stride for element i
#define VCPUD_WIRE_OPS(X) \
  X(LIT, 1)               \
  X(U8, 2)                \
  X(U16, 3)               \
  X(U32, 4)               \
  X(BOOL, 5)              \
  X(U64, 6)               \
  X(BYTES, 7)             \
  X(REST, 8)              \
  X(BEGIN, 9)             \
  X(END, 10)              \
  X(LOOP, 11)             \
  X(INPUT, 12)            \
  X(MAP, 13)

// encodeWire(program: Uint32Array, inputs: Buffer[], out: Buffer, pos: number) -> number
//   Runs `program` over `inputs` (input 0 first), writing from out[pos]; returns the position after the last byte written,
//   or -1 when `out` is too small (the caller grows it and runs the program again). A malformed program or
//   a read past the input's end throws RangeError naming the op and the offset.
constexpr uint32_t kTagShift = 8;
constexpr uint32_t kOpMask = (1u << kTagShift) - 1;

// One input of a native run: bytes the program reads, owned by the caller.
struct WireInput {
  const uint8_t* data;
  size_t len;
};

// Runs `prog` over `inputs` into out[pos..out_len) for native callers (a prepared state read encodes
// its buffers right after its ioctls): the position after the last byte written, or -1 when `out` is
// too small. A malformed program or an out-of-bounds read throws std::range_error naming the op.
long RunWireProgram(const uint32_t* prog, size_t words, const std::vector<WireInput>& inputs, uint8_t* out, size_t out_len,
                    size_t pos);

// The output offset a JS caller gave for a run: a whole number within the output's `len` bytes, else a
// RangeError with `refusal`.
size_t OutputOffsetArg(Napi::Env env, const Napi::Value& v, size_t len, const char* refusal);

void RegisterWireProgram(Napi::Env env, Napi::Object exports);

}  // namespace vcpud
