// Guest RAM: an anonymous mapping owned by a JS object. Its host address never reaches JS;
// reads and writes are bounds-checked copies.
#pragma once
#include <napi.h>

#include <cstddef>
#include <cstdint>

namespace vcpud {

class GuestMemory : public Napi::ObjectWrap<GuestMemory> {
 public:
  static void Register(Napi::Env env, Napi::Object exports);
  static GuestMemory* FromArg(const Napi::CallbackInfo& info, size_t i, const char* op);

  explicit GuestMemory(const Napi::CallbackInfo& info);
  ~GuestMemory() override;

  uint8_t* Base() const { return base_; }
  size_t Size() const { return size_; }

 private:
  Napi::Value Read(const Napi::CallbackInfo& info);   // (offset, buffer): fills buffer
  Napi::Value Write(const Napi::CallbackInfo& info);  // (offset, buffer)
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);
  void CheckRange(Napi::Env env, const char* op, uint64_t offset, size_t len) const;
  void Unmap();

  static Napi::FunctionReference* ctor_;
  uint8_t* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace vcpud
