#include "guest_memory.h"

#include <sys/mman.h>

#include <cerrno>
#include <string>

#include "errors.h"
#include "ioctl_call.h"

namespace vcpud {

Napi::FunctionReference* GuestMemory::ctor_ = nullptr;

void GuestMemory::Register(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "GuestMemory",
                                 {InstanceMethod("read", &GuestMemory::Read),
                                  InstanceMethod("write", &GuestMemory::Write),
                                  InstanceMethod("release", &GuestMemory::Release),
                                  InstanceAccessor("size", &GuestMemory::GetSize, nullptr)});
  ctor_ = new Napi::FunctionReference(Napi::Persistent(f));
  exports.Set("GuestMemory", f);
}

GuestMemory* GuestMemory::FromArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (!info[i].IsObject() || !info[i].As<Napi::Object>().InstanceOf(ctor_->Value()))
    throw Napi::TypeError::New(info.Env(), std::string(op) + ": expected a GuestMemory");
  GuestMemory* m = ObjectWrap<GuestMemory>::Unwrap(info[i].As<Napi::Object>());
  if (!m->base_) throw Napi::Error::New(info.Env(), std::string(op) + ": guest memory was released");
  return m;
}

GuestMemory::GuestMemory(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GuestMemory>(info) {
  uint64_t size = U64Arg(info, 0, "GuestMemory", "size");
  if (size == 0 || size % 4096 != 0)
    throw Napi::RangeError::New(info.Env(), "GuestMemory: size must be a non-zero multiple of 4096");
  // NORESERVE: untouched guest pages cost nothing, so memory limits count what the guest may use.
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw MakeSysError(info.Env(), "mmap", errno);
  base_ = static_cast<uint8_t*>(p);
  size_ = size;
}

GuestMemory::~GuestMemory() { Unmap(); }

void GuestMemory::Unmap() {
  if (base_) munmap(base_, size_);
  base_ = nullptr;
}

void GuestMemory::CheckRange(Napi::Env env, const char* op, uint64_t offset, size_t len) const {
  if (!base_) throw Napi::Error::New(env, std::string(op) + ": guest memory was released");
  if (offset > size_ || len > size_ - offset)
    throw Napi::RangeError::New(env, std::string(op) + ": range [" + std::to_string(offset) + ", +" +
                                         std::to_string(len) + ") is outside the " +
                                         std::to_string(size_) + "-byte guest memory");
}

Napi::Value GuestMemory::Read(const Napi::CallbackInfo& info) {
  uint64_t off = U64Arg(info, 0, "GuestMemory.read", "offset");
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, "GuestMemory.read");
  CheckRange(info.Env(), "GuestMemory.read", off, buf.Length());
  memcpy(buf.Data(), base_ + off, buf.Length());
  return info.Env().Undefined();
}

Napi::Value GuestMemory::Write(const Napi::CallbackInfo& info) {
  uint64_t off = U64Arg(info, 0, "GuestMemory.write", "offset");
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, "GuestMemory.write");
  CheckRange(info.Env(), "GuestMemory.write", off, buf.Length());
  memcpy(base_ + off, buf.Data(), buf.Length());
  return info.Env().Undefined();
}

Napi::Value GuestMemory::GetSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(base_ ? size_ : 0));
}

Napi::Value GuestMemory::Release(const Napi::CallbackInfo& info) {
  Unmap();
  return info.Env().Undefined();
}

}  // namespace vcpud
