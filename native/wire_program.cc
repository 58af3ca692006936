#include "wire_program.h"

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace vcpud {
namespace {

enum Op : uint32_t {
#define VCPUD_WIRE_ENUM(name, code) k##name = code,
  VCPUD_WIRE_OPS(VCPUD_WIRE_ENUM)
#undef VCPUD_WIRE_ENUM
};

// Deep enough for every state message (a loop of messages holding messages); a program nesting deeper is refused.
constexpr int kMaxDepth = 16;

// Raised for a malformed program or an out-of-bounds read; turned into a RangeError at the JS boundary.
struct ProgramFault {
  std::string what;
};

// Raised when `out` cannot hold the next bytes: the whole run is abandoned and -1 returned.
struct OutOfRoom {};

class Runner {
 public:
  using Input = WireInput;

  Runner(const uint32_t* prog, size_t words, const std::vector<Input>& inputs, uint8_t* out, size_t out_len, size_t pos)
      : prog_(prog), words_(words), inputs_(inputs), out_(out), out_len_(out_len), pos_(pos) {
    if (!inputs_.empty()) Select(0, 0);
  }

  size_t Run() {
    Block(0, words_, 0, 0, false);
    return pos_;
  }

 private:
  [[noreturn]] __attribute__((noinline, cold)) void Fault(const std::string& what, size_t at) { throw ProgramFault{what + " (program word " + std::to_string(at) + ")"}; }

  void Select(uint32_t k, size_t at) {
    if (k >= inputs_.size()) Fault("INPUT " + std::to_string(k) + " of " + std::to_string(inputs_.size()) + " inputs", at);
    in_ = inputs_[k].data;
    in_len_ = inputs_[k].len;
  }

  uint32_t Word(size_t pc, size_t end) {
    if (pc >= end) Fault("op truncated", pc);
    return prog_[pc];
  }

  __attribute__((always_inline)) const uint8_t* In(size_t base, uint32_t off, size_t len, size_t pc) {
    size_t at = base + off;
    if (at < base || at > in_len_ || len > in_len_ - at)
      Fault("read of " + std::to_string(len) + " bytes at input offset " + std::to_string(at) + " past its " + std::to_string(in_len_) + " bytes", pc);
    return in_ + at;
  }

  void Room(size_t n) {
    if (n > out_len_ - pos_) throw OutOfRoom{};
  }

  void Varint(uint64_t v) {
    Room(10);
    while (v > 0x7f) {
      out_[pos_++] = static_cast<uint8_t>((v & 0x7f) | 0x80);
      v >>= 7;
    }
    out_[pos_++] = static_cast<uint8_t>(v);
  }

  void Bytes(const uint8_t* p, size_t n) {
    Varint(n);
    Room(n);
    memcpy(out_ + pos_, p, n);
    pos_ += n;
  }

  template <typename T>
  T Load(size_t base, uint32_t off, size_t pc) {
    T v;
    memcpy(&v, In(base, off, sizeof v, pc), sizeof v);
    return v;
  }

  // Writes a body's length in the byte kept for it, moving the body on when the length needs more bytes.
  void End(size_t start) {
    size_t len = pos_ - start - 1;
    size_t extra = 0;
    for (size_t l = len >> 7; l > 0; l >>= 7) extra++;
    Room(extra);
    if (extra) memmove(out_ + start + 1 + extra, out_ + start + 1, len);
    size_t after = pos_ + extra;
    pos_ = start;
    Varint(len);
    pos_ = after;
  }

  // Runs words [pc, end) with `base` as the base of offsets; `depth0` is the BEGIN depth this block must end at.
  void Block(size_t pc, size_t end, size_t base, int depth0, bool in_loop) {
    while (pc < end) {
      size_t at = pc;
      uint32_t word = prog_[pc++];
      uint32_t op = word & kOpMask;
      // A field's tag folded into the op that writes its value (or begins its body): one dispatch per field.
      if (uint32_t tag = word >> kTagShift) {
        if (op == kLIT || op == kEND || op == kLOOP || op == kINPUT) Fault("op " + std::to_string(op) + " takes no tag", at);
        Varint(tag);
      }
      switch (op) {
        case kLIT: {
          uint32_t n = Word(pc++, end);
          size_t w = (static_cast<size_t>(n) + 3) / 4;
          if (w > end - pc) Fault("LIT longer than the program", at);
          Room(n);
          const uint8_t* lit = reinterpret_cast<const uint8_t*>(prog_ + pc);
          for (uint32_t i = 0; i < n; i++) out_[pos_ + i] = lit[i];  // a few bytes: no memcpy call
          pos_ += n;
          pc += w;
          break;
        }
        case kU8:
          Varint(Load<uint8_t>(base, Word(pc++, end), at));
          break;
        case kU16:
          Varint(Load<uint16_t>(base, Word(pc++, end), at));
          break;
        case kU32:
          Varint(Load<uint32_t>(base, Word(pc++, end), at));
          break;
        case kBOOL:
          Varint(Load<uint8_t>(base, Word(pc++, end), at) != 0 ? 1 : 0);
          break;
        case kU64:
          Varint(Load<uint64_t>(base, Word(pc++, end), at));
          break;
        case kBYTES: {
          uint32_t off = Word(pc++, end);
          uint32_t len = Word(pc++, end);
          Bytes(In(base, off, len, at), len);
          break;
        }
        case kREST: {
          uint32_t off = Word(pc++, end);
          const uint8_t* p = In(base, off, 0, at);
          Bytes(p, in_len_ - (base + off));
          break;
        }
        case kBEGIN:
          if (depth_ == kMaxDepth) Fault("BEGINs nested deeper than " + std::to_string(kMaxDepth), at);
          Room(1);
          starts_[depth_++] = pos_++;
          break;
        case kEND:
          if (depth_ == depth0) Fault("END without BEGIN", at);
          End(starts_[--depth_]);
          break;
        case kINPUT:
          // Loops run over one input: a loop body switching inputs would leave its base in the wrong one.
          if (in_loop) Fault("INPUT inside a loop", at);
          Select(Word(pc++, end), at);
          break;
        case kMAP: {
          uint32_t v = Load<uint32_t>(base, Word(pc++, end), at);
          uint32_t n = Word(pc++, end);
          uint32_t fallback = Word(pc++, end);
          if (n > end - pc) Fault("MAP table longer than the program", at);
          Varint(v < n ? prog_[pc + v] : fallback);
          pc += n;
          break;
        }
        case kLOOP: {
          uint32_t count_off = Word(pc++, end);
          uint32_t max = Word(pc++, end);
          uint32_t off = Word(pc++, end);
          uint32_t stride = Word(pc++, end);
          uint32_t body = Word(pc++, end);
          if (body > end - pc) Fault("LOOP body longer than the program", at);
          uint32_t count = Load<uint32_t>(base, count_off, at);
          if (count > max) count = max;
          for (uint32_t i = 0; i < count; i++) {
            size_t element = base + off + static_cast<size_t>(i) * stride;
            if (element > in_len_) Fault("LOOP element " + std::to_string(i) + " starts past the input's end", at);
            Block(pc, pc + body, element, depth_, true);
          }
          pc += body;
          break;
        }
        default:
          Fault("unknown op " + std::to_string(op), at);
      }
    }
    if (depth_ != depth0) Fault("BEGIN without END", end);
  }

  const uint32_t* prog_;
  size_t words_;
  const std::vector<Input>& inputs_;
  const uint8_t* in_ = nullptr;
  size_t in_len_ = 0;
  uint8_t* out_;
  size_t out_len_;
  size_t pos_;
  size_t starts_[kMaxDepth];
  int depth_ = 0;
};

Napi::Value EncodeWire(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsTypedArray() || !info[1].IsArray() || !info[2].IsBuffer() || !info[3].IsNumber())
    throw Napi::TypeError::New(env, "encodeWire: expected (Uint32Array, Buffer[], Buffer, number)");
  auto prog = info[0].As<Napi::TypedArray>();
  if (prog.TypedArrayType() != napi_uint32_array) throw Napi::TypeError::New(env, "encodeWire: the program must be a Uint32Array");
  auto words = prog.As<Napi::Uint32Array>();
  auto list = info[1].As<Napi::Array>();
  std::vector<Runner::Input> inputs(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    if (!v.IsBuffer()) throw Napi::TypeError::New(env, "encodeWire: input " + std::to_string(i) + " is not a Buffer");
    auto b = v.As<Napi::Buffer<uint8_t>>();
    inputs[i] = {b.Data(), b.Length()};
  }
  auto out = info[2].As<Napi::Buffer<uint8_t>>();
  size_t pos = OutputOffsetArg(env, info[3], out.Length(), "encodeWire: pos is not an offset within out");
  try {
    return Napi::Number::New(env, static_cast<double>(RunWireProgram(words.Data(), words.ElementLength(), inputs, out.Data(), out.Length(), pos)));
  } catch (const std::range_error& e) {
    throw Napi::RangeError::New(env, std::string("encodeWire: ") + e.what());
  }
}

Napi::Object Ops(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
#define VCPUD_WIRE_EXPORT(name, code) o.Set(#name, Napi::Number::New(env, code));
  VCPUD_WIRE_OPS(VCPUD_WIRE_EXPORT)
#undef VCPUD_WIRE_EXPORT
  o.Set("TAG_SHIFT", Napi::Number::New(env, kTagShift));
  return o;
}

}  // namespace

long RunWireProgram(const uint32_t* prog, size_t words, const std::vector<WireInput>& inputs, uint8_t* out, size_t out_len,
                    size_t pos) {
  Runner r(prog, words, inputs, out, out_len, pos);
  try {
    return static_cast<long>(r.Run());
  } catch (const OutOfRoom&) {
    return -1;
  } catch (const ProgramFault& f) {
    throw std::range_error(f.what);
  }
}

size_t OutputOffsetArg(Napi::Env env, const Napi::Value& v, size_t len, const char* refusal) {
  double p = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
  if (!(p >= 0 && p <= static_cast<double>(len)) || p != static_cast<double>(static_cast<size_t>(p))) throw Napi::RangeError::New(env, refusal);
  return static_cast<size_t>(p);
}

void RegisterWireProgram(Napi::Env env, Napi::Object exports) {
  exports.Set("encodeWire", Napi::Function::New(env, EncodeWire, "encodeWire"));
  exports.Set("wireOps", Ops(env));
}

}  // namespace vcpud
