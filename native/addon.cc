// vcpud's native addon: thin KVM ioctls, guest memory and the vCPU run thread.
#include <linux/kvm.h>
#include <napi.h>

#include <initializer_list>
#include <utility>

#include "crc32c.h"
#include "errors.h"
#include "file_crc.h"
#include "fs_at.h"
#include "guest_memory.h"
#include "ioctl_call.h"
#include "kvm_ioctls.h"
#include "page_frames.h"
#include "vcpu_runner.h"
#include "socket_options.h"
#include "wire_program.h"

namespace vcpud {
namespace {

// Capability numbers straight from <linux/kvm.h>, so src/ffi never hard-codes them.
Napi::Object Caps(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
#define VCPUD_CAP(N) c.Set(#N, Napi::Number::New(env, KVM_CAP_##N))
  VCPUD_CAP(IRQCHIP);
  VCPUD_CAP(HLT);
  VCPUD_CAP(USER_MEMORY);
  VCPUD_CAP(SET_TSS_ADDR);
  VCPUD_CAP(EXT_CPUID);
  VCPUD_CAP(NR_VCPUS);
  VCPUD_CAP(MAX_VCPUS);
  VCPUD_CAP(NR_MEMSLOTS);
  VCPUD_CAP(MP_STATE);
  VCPUD_CAP(VCPU_EVENTS);
  VCPUD_CAP(DEBUGREGS);
  VCPUD_CAP(XSAVE);
  VCPUD_CAP(XCRS);
  VCPUD_CAP(XSAVE2);
  VCPUD_CAP(SREGS2);
  VCPUD_CAP(TSC_CONTROL);
  VCPUD_CAP(GET_TSC_KHZ);
  VCPUD_CAP(NESTED_STATE);
  VCPUD_CAP(IMMEDIATE_EXIT);
  VCPUD_CAP(GET_MSR_FEATURES);
  VCPUD_CAP(ADJUST_CLOCK);
  VCPUD_CAP(EXCEPTION_PAYLOAD);
  VCPUD_CAP(X86_SMM);
  VCPUD_CAP(HYPERV_ENLIGHTENED_VMCS);
  VCPUD_CAP(SET_IDENTITY_MAP_ADDR);
  VCPUD_CAP(TSC_DEADLINE_TIMER);
  VCPUD_CAP(KVMCLOCK_CTRL);
  VCPUD_CAP(X86_DISABLE_EXITS);
  VCPUD_CAP(MANUAL_DIRTY_LOG_PROTECT2);
  VCPUD_CAP(DIRTY_LOG_RING);
#undef VCPUD_CAP
  return c;
}

// An object of named numbers: constants from the C headers, so src/ffi states none of them again.
Napi::Object Numbers(Napi::Env env, std::initializer_list<std::pair<const char*, double>> entries) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [name, value] : entries) o.Set(name, Napi::Number::New(env, value));
  return o;
}

// crc32c(buffer, seed = 0, software = false, copyInto?): CRC-32C of the bytes, continuing `seed`;
// with copyInto (a buffer at least as long), copied into it as they are checksummed (Crc32cCopy).
Napi::Value Crc32cJs(const Napi::CallbackInfo& info) {
  Napi::Buffer<uint8_t> buf = BufferArg(info, 0, "crc32c");
  uint32_t seed = info.Length() > 1 && !info[1].IsUndefined() ? static_cast<uint32_t>(U64Arg(info, 1, "crc32c", "seed")) : 0;
  bool software = info.Length() > 2 && info[2].ToBoolean();
  if (info.Length() > 3 && !info[3].IsUndefined()) {
    Napi::Buffer<uint8_t> into = BufferArg(info, 3, "crc32c");
    if (software || into.Length() < buf.Length())
      throw Napi::RangeError::New(info.Env(), "crc32c: copyInto must hold the buffer, and takes the hardware path");
    return Napi::Number::New(info.Env(), Crc32cCopy(seed, into.Data(), buf.Data(), buf.Length()));
  }
  return Napi::Number::New(info.Env(), software ? Crc32cSoftware(seed, buf.Data(), buf.Length())
                                                 : Crc32c(seed, buf.Data(), buf.Length()));
}

}  // namespace
}  // namespace vcpud

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) {
  using namespace vcpud;
  RegisterIoctls(env, exports);
  GuestMemory::Register(env, exports);
  VcpuRunner::Register(env, exports);
  RegisterFsAt(env, exports);
  RegisterFileCrc(env, exports);
  RegisterWireProgram(env, exports);
  RegisterSocketOptions(env, exports);
  exports.Set("crc32c", Napi::Function::New(env, Crc32cJs, "crc32c"));
  exports.Set("caps", Caps(env));
  // The memory-slot flag and KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2's bits.
  exports.Set("dirtyLogFlags", Numbers(env, {{"memLogDirtyPages", KVM_MEM_LOG_DIRTY_PAGES},
                                             {"manualProtectEnable", KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE},
                                             {"initiallySet", KVM_DIRTY_LOG_INITIALLY_SET}}));
  exports.Set("pageFrameFormat", Numbers(env, {{"magic", kFrameMagic},
                                               {"version", kFrameVersion},
                                               {"headerBytes", kFrameHeaderBytes},
                                               {"tableEntryBytes", kFrameTableEntryBytes},
                                               {"pageCrcBytes", kFramePageCrcBytes},
                                               {"pageBytes", kFramePageBytes},
                                               {"maxFramePages", kMaxFramePages},
                                               {"defaultFramePages", kDefaultFramePages},
                                               {"maxFrameBytes", static_cast<double>(kMaxFrameBytes)}}));
  exports.Set("apiVersion", Napi::Number::New(env, KVM_API_VERSION));
  return exports;
}

NODE_API_MODULE(vcpud_native, InitAddon)
