#include "dirty_log.h"

#include <linux/kvm.h>

#include <string>

#include "guest_memory.h"
#include "kvm_abi.h"

namespace vcpud {

namespace {

// Bytes of a bitmap covering `pages` pages as the kernel accesses it (whole u64 words).
uint64_t KernelBitmapBytes(uint64_t pages) { return (pages + 63) / 64 * 8; }

Napi::Buffer<uint8_t> SlotBitmapArg(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t needPages) {
  Napi::Buffer<uint8_t> bitmap = BufferArg(info, i, name);
  if (bitmap.Length() < KernelBitmapBytes(needPages))
    ThrowLength(info.Env(), name,
                "bitmap is " + std::to_string(bitmap.Length()) + " bytes, " + std::to_string(needPages) +
                    " pages need " + std::to_string(KernelBitmapBytes(needPages)));
  return bitmap;
}

Call Prepared(const char* name, int fd, unsigned long req, Napi::Buffer<uint8_t> st, Napi::Buffer<uint8_t> bitmap) {
  Call c;
  c.name = name;
  c.fd = fd;
  c.request = req;
  c.arg = st.Data();
  c.returns = Returns::kZero;
  c.holder = st;
  c.keep = bitmap;
  return c;
}

}  // namespace

Call GetDirtyLog(const Napi::CallbackInfo& info) {
  const char* name = "KVM_GET_DIRTY_LOG";
  int fd = FdArg(info, 0, name);
  uint32_t slot = static_cast<uint32_t>(U64Arg(info, 1, name, "slot"));
  GuestMemory* mem = GuestMemory::FromArg(info, 2, name);
  Napi::Buffer<uint8_t> bitmap = SlotBitmapArg(info, 3, name, mem->Size() / kPageSize);
  Napi::Buffer<uint8_t> st = Napi::Buffer<uint8_t>::New(info.Env(), KSIZE(kvm_dirty_log));
  auto* log = reinterpret_cast<kvm_dirty_log*>(st.Data());
  *log = {};
  log->slot = slot;
  log->dirty_bitmap = bitmap.Data();
  return Prepared(name, fd, KREQ(GET_DIRTY_LOG), st, bitmap);
}

Call ClearDirtyLog(const Napi::CallbackInfo& info) {
  const char* name = "KVM_CLEAR_DIRTY_LOG";
  int fd = FdArg(info, 0, name);
  uint32_t slot = static_cast<uint32_t>(U64Arg(info, 1, name, "slot"));
  GuestMemory* mem = GuestMemory::FromArg(info, 2, name);
  uint64_t first = U64Arg(info, 3, name, "firstPage");
  uint64_t num = U64Arg(info, 4, name, "numPages");
  uint64_t pages = mem->Size() / kPageSize;
  if (first > pages || num > pages - first || num > UINT32_MAX)
    throw Napi::RangeError::New(info.Env(), std::string(name) + ": pages [" + std::to_string(first) + ", +" +
                                                std::to_string(num) + ") are outside the slot's " +
                                                std::to_string(pages));
  // The kernel reads whole words from first/64 on; `first` not 64-aligned is its EINVAL to report,
  // so round down here only to size the check.
  Napi::Buffer<uint8_t> bitmap = SlotBitmapArg(info, 5, name, first - first % 64 + num);
  Napi::Buffer<uint8_t> st = Napi::Buffer<uint8_t>::New(info.Env(), KSIZE(kvm_clear_dirty_log));
  auto* clr = reinterpret_cast<kvm_clear_dirty_log*>(st.Data());
  *clr = {};
  clr->slot = slot;
  clr->first_page = first;
  clr->num_pages = static_cast<uint32_t>(num);
  clr->dirty_bitmap = bitmap.Data() + first / 64 * 8;
  return Prepared(name, fd, KREQ(CLEAR_DIRTY_LOG), st, bitmap);
}

}  // namespace vcpud
