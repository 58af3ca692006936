// One Prepare function per KVM ioctl: argument and length checks, nothing else. Policy (size
// negotiation, retries, decoding) lives in src/ffi. The 2018 nested-state proposal's ioctl numbers
// (0xbb/0xbc) are deliberately absent: upstream reuses them for SEV memory regions, and the real
// KVM_GET/SET_NESTED_STATE (0xbe/0xbf) come from <linux/kvm.h>.
#include "kvm_ioctls.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <unistd.h>

#include <time.h>

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <cstring>
#include <string>
#include <vector>

#include "dirty_log.h"
#include "guest_memory.h"
#include "ioctl_call.h"
#include "kvm_abi.h"
#include "wire_program.h"

namespace vcpud {

namespace {

Call Make(const char* name, int fd, unsigned long req, void* arg, Returns returns) {
  Call c;
  c.name = name;
  c.fd = fd;
  c.request = req;
  c.arg = arg;
  c.returns = returns;
  return c;
}

void CheckStructLength(Napi::Env env, const char* name, size_t length, size_t size) {
  if (length != size)
    ThrowLength(env, name, "buffer is " + std::to_string(length) + " bytes, the struct is " + std::to_string(size));
}

// An xsave buffer must hold the VM's uABI xsave size (XsaveSized says why).
void CheckXsaveLength(Napi::Env env, const char* name, size_t length, uint64_t xsaveSize) {
  size_t need = std::max<size_t>(KSIZE(kvm_xsave), xsaveSize);
  if (length < need) ThrowLength(env, name, "buffer is " + std::to_string(length) + " bytes, needs " + std::to_string(need));
}

// An ioctl on a fixed-size struct the caller owns as a Buffer of exactly that size.
Call FixedStruct(const Napi::CallbackInfo& info, const char* name, unsigned long req, size_t size) {
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, name);
  CheckStructLength(info.Env(), name, buf.Length(), size);
  Call c = Make(name, fd, req, buf.Data(), Returns::kZero);
  c.holder = buf;
  return c;
}

// An ioctl with no argument or a by-value argument.
Call ByValue(const Napi::CallbackInfo& info, const char* name, unsigned long req, Returns r,
             bool hasValue) {
  int fd = FdArg(info, 0, name);
  uint64_t v = hasValue ? U64Arg(info, 1, name, "value") : 0;
  return Make(name, fd, req, reinterpret_cast<void*>(v), r);
}

// Variable-length structs start with a u32 count; the buffer must hold count entries.
uint32_t CountFitting(const Napi::CallbackInfo& info, const char* name,
                      const Napi::Buffer<uint8_t>& buf, size_t header, size_t entry) {
  if (buf.Length() < header)
    ThrowLength(info.Env(), name, "buffer shorter than the " + std::to_string(header) + "-byte header");
  return static_cast<uint32_t>((buf.Length() - header) / entry);
}

void CheckCount(const Napi::CallbackInfo& info, const char* name, const Napi::Buffer<uint8_t>& buf,
                size_t header, size_t entry) {
  uint32_t declared;
  memcpy(&declared, buf.Data(), sizeof declared);
  if (declared > CountFitting(info, name, buf, header, entry))
    ThrowLength(info.Env(), name,
                "header declares " + std::to_string(declared) + " entries, the buffer holds " +
                    std::to_string(CountFitting(info, name, buf, header, entry)));
}

long ReadU32Count(const void* arg) {
  uint32_t n;
  memcpy(&n, arg, sizeof n);
  return n;
}

// A list the kernel fills: the count is set from the buffer's capacity; on E2BIG the kernel
// writes the needed count back when `writesBack` (MSR lists do, CPUID does not).
Call FilledList(const Napi::CallbackInfo& info, const char* name, unsigned long req, size_t header,
                size_t entry, bool writesBack) {
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, name);
  uint32_t cap = CountFitting(info, name, buf, header, entry);
  memcpy(buf.Data(), &cap, sizeof cap);
  Call c = Make(name, fd, req, buf.Data(), Returns::kZero);
  c.holder = buf;
  if (writesBack) c.required = ReadU32Count;
  return c;
}

// A list the caller filled: the header's count must fit in the buffer.
Call GivenList(const Napi::CallbackInfo& info, const char* name, unsigned long req, size_t header,
               size_t entry, Returns r) {
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, name);
  CheckCount(info, name, buf, header, entry);
  Call c = Make(name, fd, req, buf.Data(), r);
  c.holder = buf;
  return c;
}

constexpr size_t kListHeader = 8;  // kvm_msrs and kvm_cpuid2: u32 count + u32 pad

// ---- system (/dev/kvm) ----
Call GetApiVersion(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_GET_API_VERSION", KREQ(GET_API_VERSION), Returns::kNumber, false);
}
Call CheckExtension(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_CHECK_EXTENSION", KREQ(CHECK_EXTENSION), Returns::kNumber, true);
}
Call GetVcpuMmapSize(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_GET_VCPU_MMAP_SIZE", KREQ(GET_VCPU_MMAP_SIZE), Returns::kNumber, false);
}
Call GetMsrIndexList(const Napi::CallbackInfo& i) {
  return FilledList(i, "KVM_GET_MSR_INDEX_LIST", KREQ(GET_MSR_INDEX_LIST), 4, 4, true);
}
Call GetMsrFeatureIndexList(const Napi::CallbackInfo& i) {
  return FilledList(i, "KVM_GET_MSR_FEATURE_INDEX_LIST", KREQ(GET_MSR_FEATURE_INDEX_LIST), 4, 4, true);
}
Call GetSupportedCpuid(const Napi::CallbackInfo& i) {
  return FilledList(i, "KVM_GET_SUPPORTED_CPUID", KREQ(GET_SUPPORTED_CPUID), kListHeader,
                    KSIZE(kvm_cpuid_entry2), false);
}
Call CreateVm(const Napi::CallbackInfo& i) {
  Call c = ByValue(i, "KVM_CREATE_VM", KREQ(CREATE_VM), Returns::kNumber, true);
  c.eintrRetries = 100;  // nothing is created when it fails so (QEMU retries it too); bounded against a signal storm
  return c;
}

// ---- VM ----
Call CreateIrqchip(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_CREATE_IRQCHIP", KREQ(CREATE_IRQCHIP), Returns::kZero, false);
}
Call CreateVcpu(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_CREATE_VCPU", KREQ(CREATE_VCPU), Returns::kNumber, true);
}
Call SetTssAddr(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_SET_TSS_ADDR", KREQ(SET_TSS_ADDR), Returns::kZero, true);
}
Call EnableCap(const Napi::CallbackInfo& i) {
  return FixedStruct(i, "KVM_ENABLE_CAP", KREQ(ENABLE_CAP), KSIZE(kvm_enable_cap));
}
Call GetClock(const Napi::CallbackInfo& i) {
  return FixedStruct(i, "KVM_GET_CLOCK", KREQ(GET_CLOCK), KSIZE(kvm_clock_data));
}
Call SetClock(const Napi::CallbackInfo& i) {
  return FixedStruct(i, "KVM_SET_CLOCK", KREQ(SET_CLOCK), KSIZE(kvm_clock_data));
}
// struct kvm_irqchip: chip_id (0 PIC master, 1 PIC slave, 2 IOAPIC) selects what the union holds.
Call GetIrqchip(const Napi::CallbackInfo& i) {
  return FixedStruct(i, "KVM_GET_IRQCHIP", KREQ(GET_IRQCHIP), KSIZE(kvm_irqchip));
}
Call SetIrqchip(const Napi::CallbackInfo& i) {
  return FixedStruct(i, "KVM_SET_IRQCHIP", KREQ(SET_IRQCHIP), KSIZE(kvm_irqchip));
}
// (vmFd, slot, flags, guestPhysAddr, GuestMemory): the host address never crosses into JS.
Call SetUserMemoryRegion(const Napi::CallbackInfo& info) {
  const char* name = "KVM_SET_USER_MEMORY_REGION";
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = Napi::Buffer<uint8_t>::New(info.Env(), KSIZE(kvm_userspace_memory_region));
  auto* region = reinterpret_cast<kvm_userspace_memory_region*>(buf.Data());
  region->slot = static_cast<uint32_t>(U64Arg(info, 1, name, "slot"));
  region->flags = static_cast<uint32_t>(U64Arg(info, 2, name, "flags"));
  region->guest_phys_addr = U64Arg(info, 3, name, "guestPhysAddr");
  GuestMemory* mem = GuestMemory::FromArg(info, 4, name);
  region->memory_size = mem->Size();
  region->userspace_addr = reinterpret_cast<uint64_t>(mem->Base());
  Call c = Make(name, fd, KREQ(SET_USER_MEMORY_REGION), buf.Data(), Returns::kZero);
  c.holder = buf;
  return c;
}

// ---- vCPU: fixed-size sections ----
#define VCPUD_FIXED(Fn, REQ, TYPE) \
  Call Fn(const Napi::CallbackInfo& i) { return FixedStruct(i, "KVM_" #REQ, KREQ(REQ), KSIZE(TYPE)); }
VCPUD_FIXED(GetRegs, GET_REGS, kvm_regs)
VCPUD_FIXED(SetRegs, SET_REGS, kvm_regs)
VCPUD_FIXED(GetSregs, GET_SREGS, kvm_sregs)
VCPUD_FIXED(SetSregs, SET_SREGS, kvm_sregs)
VCPUD_FIXED(GetSregs2, GET_SREGS2, kvm_sregs2)
VCPUD_FIXED(SetSregs2, SET_SREGS2, kvm_sregs2)
VCPUD_FIXED(GetFpu, GET_FPU, kvm_fpu)
VCPUD_FIXED(SetFpu, SET_FPU, kvm_fpu)
VCPUD_FIXED(GetXsave, GET_XSAVE, kvm_xsave)
VCPUD_FIXED(GetXcrs, GET_XCRS, kvm_xcrs)
VCPUD_FIXED(SetXcrs, SET_XCRS, kvm_xcrs)
VCPUD_FIXED(GetLapic, GET_LAPIC, kvm_lapic_state)
VCPUD_FIXED(SetLapic, SET_LAPIC, kvm_lapic_state)
VCPUD_FIXED(GetVcpuEvents, GET_VCPU_EVENTS, kvm_vcpu_events)
VCPUD_FIXED(SetVcpuEvents, SET_VCPU_EVENTS, kvm_vcpu_events)
VCPUD_FIXED(GetDebugregs, GET_DEBUGREGS, kvm_debugregs)
VCPUD_FIXED(SetDebugregs, SET_DEBUGREGS, kvm_debugregs)
VCPUD_FIXED(GetMpState, GET_MP_STATE, kvm_mp_state)
VCPUD_FIXED(SetMpState, SET_MP_STATE, kvm_mp_state)
#undef VCPUD_FIXED

// KVM_GET_XSAVE2 writes and KVM_SET_XSAVE reads the vCPU's whole uABI xsave size (KVM_CAP_XSAVE2,
// at least 4096 bytes) regardless of what userspace allocated. That size is a fact of the caller's
// VM (src/ffi asks its fd): the caller passes it, and the buffer must hold it.
Call XsaveSized(const Napi::CallbackInfo& info, const char* name, unsigned long req) {
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, name);
  CheckXsaveLength(info.Env(), name, buf.Length(), U64Arg(info, 2, name, "xsaveSize"));
  Call c = Make(name, fd, req, buf.Data(), Returns::kZero);
  c.holder = buf;
  return c;
}
Call GetXsave2(const Napi::CallbackInfo& i) { return XsaveSized(i, "KVM_GET_XSAVE2", KREQ(GET_XSAVE2)); }
Call SetXsave(const Napi::CallbackInfo& i) { return XsaveSized(i, "KVM_SET_XSAVE", KREQ(SET_XSAVE)); }

// ---- vCPU: lists ----
// KVM_GET/SET_MSRS return how many entries were processed: partial success is a number, not an error.
Call GetMsrs(const Napi::CallbackInfo& i) {
  return GivenList(i, "KVM_GET_MSRS", KREQ(GET_MSRS), kListHeader, KSIZE(kvm_msr_entry), Returns::kNumber);
}
Call SetMsrs(const Napi::CallbackInfo& i) {
  return GivenList(i, "KVM_SET_MSRS", KREQ(SET_MSRS), kListHeader, KSIZE(kvm_msr_entry), Returns::kNumber);
}
Call SetCpuid2(const Napi::CallbackInfo& i) {
  return GivenList(i, "KVM_SET_CPUID2", KREQ(SET_CPUID2), kListHeader, KSIZE(kvm_cpuid_entry2), Returns::kZero);
}
// KVM_GET_CPUID2's nent made the count of the entries filled. Older kernels (Debian's 6.1, seen in the
// nested lab) write nent back only when failing with E2BIG: on success the caller's count stays and the
// entries past the real ones are the buffer's zeros. Trailing blank entries (function, index, flags and
// the four registers all zero: a second leaf 0, which no vCPU has) are dropped from the count, or a
// read-back CPUID would hold 256 entries, and KVM_SET_CPUID2 of it on a vCPU that has run fails with
// EINVAL (6.1 accepts only the identical CPUID then).
void TrimCpuid2(void* arg) {
  auto* list = static_cast<uint8_t*>(arg);
  constexpr size_t kValueBytes = offsetof(kvm_cpuid_entry2, padding);  // function .. edx
  uint32_t nent;
  memcpy(&nent, list, sizeof nent);
  auto blank = [&](uint32_t i) {
    const uint8_t* e = list + kListHeader + static_cast<size_t>(i) * KSIZE(kvm_cpuid_entry2);
    for (size_t b = 0; b < kValueBytes; b++)
      if (e[b]) return false;
    return true;
  };
  while (nent > 0 && blank(nent - 1)) nent--;
  memcpy(list, &nent, sizeof nent);
}

Call GetCpuid2(const Napi::CallbackInfo& i) {
  Call c = FilledList(i, "KVM_GET_CPUID2", KREQ(GET_CPUID2), kListHeader, KSIZE(kvm_cpuid_entry2), false);
  c.after = TrimCpuid2;
  return c;
}
Call GetTscKhz(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_GET_TSC_KHZ", KREQ(GET_TSC_KHZ), Returns::kNumber, false);
}
Call SetTscKhz(const Napi::CallbackInfo& i) {
  return ByValue(i, "KVM_SET_TSC_KHZ", KREQ(SET_TSC_KHZ), Returns::kZero, true);
}

// ---- vCPU: nested state ----
constexpr size_t kNestedHeader = 128;  // flags, format, size + the 120-byte header union

long ReadNestedSize(const void* arg) { return static_cast<const kvm_nested_state*>(arg)->size; }

// GET declares the whole buffer as `size`. The buffer must be at least the VM's
// KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE), which the caller passes: 6.1 SVM writes 4224 bytes in
// guest mode even when a smaller size is declared. On E2BIG the kernel has written the required size back.
Call GetNestedState(const Napi::CallbackInfo& info) {
  const char* name = "KVM_GET_NESTED_STATE";
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, name);
  size_t need = std::max<size_t>(kNestedHeader, U64Arg(info, 2, name, "maxSize"));
  if (buf.Length() < need)
    ThrowLength(info.Env(), name,
                "buffer is " + std::to_string(buf.Length()) + " bytes, needs " + std::to_string(need));
  memset(buf.Data(), 0, kNestedHeader);
  reinterpret_cast<kvm_nested_state*>(buf.Data())->size = static_cast<uint32_t>(buf.Length());
  Call c = Make(name, fd, KREQ(GET_NESTED_STATE), buf.Data(), Returns::kZero);
  c.holder = buf;
  c.required = ReadNestedSize;
  return c;
}

// SET passes the caller's bytes unchanged; the kernel reads `size` bytes, so they must exist.
Call SetNestedState(const Napi::CallbackInfo& info) {
  const char* name = "KVM_SET_NESTED_STATE";
  int fd = FdArg(info, 0, name);
  Napi::Buffer<uint8_t> buf = BufferArg(info, 1, name);
  if (buf.Length() < kNestedHeader)
    ThrowLength(info.Env(), name, "buffer shorter than the 128-byte header");
  uint32_t size = reinterpret_cast<const kvm_nested_state*>(buf.Data())->size;
  if (size > buf.Length())
    ThrowLength(info.Env(), name,
                "header size " + std::to_string(size) + " exceeds the " + std::to_string(buf.Length()) +
                    "-byte buffer");
  Call c = Make(name, fd, KREQ(SET_NESTED_STATE), buf.Data(), Returns::kZero);
  c.holder = buf;
  return c;
}

// ---- vCPU: a batch of GET ioctls in one call ----
// GetState reads up to 13 sections; one native call for all of them saves 12 JS->native transitions.
// Each op is one of the GET ioctls above with the same buffer checks; the batch stops at the first
// failure and hands back that ioctl's error (the same object the single call would throw), so errno
// and classification are unchanged. Per op it records the return value and the ioctl's own duration,
// so src/ffi reports every ioctl to the metrics observer exactly as single calls do.
enum class BatchKind { kFixed, kXsave2, kGivenList, kFilledList, kNumber };
struct BatchOp {
  const char* name;
  unsigned long request;
  BatchKind kind;
  size_t size;  // struct size (kFixed) or list entry size
  Returns returns;
  void (*after)(void* arg) = nullptr;  // as the single call's (Call::after)
};
#define VCPUD_BATCH_FIXED(REQ, TYPE) {"KVM_" #REQ, KREQ(REQ), BatchKind::kFixed, KSIZE(TYPE), Returns::kZero}
const BatchOp kBatchOps[] = {
    VCPUD_BATCH_FIXED(GET_REGS, kvm_regs),
    VCPUD_BATCH_FIXED(GET_SREGS, kvm_sregs),
    VCPUD_BATCH_FIXED(GET_SREGS2, kvm_sregs2),
    VCPUD_BATCH_FIXED(GET_FPU, kvm_fpu),
    VCPUD_BATCH_FIXED(GET_XCRS, kvm_xcrs),
    VCPUD_BATCH_FIXED(GET_VCPU_EVENTS, kvm_vcpu_events),
    VCPUD_BATCH_FIXED(GET_DEBUGREGS, kvm_debugregs),
    VCPUD_BATCH_FIXED(GET_MP_STATE, kvm_mp_state),
    VCPUD_BATCH_FIXED(GET_LAPIC, kvm_lapic_state),
    VCPUD_BATCH_FIXED(GET_XSAVE, kvm_xsave),
    {"KVM_GET_XSAVE2", KREQ(GET_XSAVE2), BatchKind::kXsave2, 0, Returns::kZero},
    {"KVM_GET_MSRS", KREQ(GET_MSRS), BatchKind::kGivenList, KSIZE(kvm_msr_entry), Returns::kNumber},
    {"KVM_GET_CPUID2", KREQ(GET_CPUID2), BatchKind::kFilledList, KSIZE(kvm_cpuid_entry2), Returns::kZero, TrimCpuid2},
    {"KVM_GET_TSC_KHZ", KREQ(GET_TSC_KHZ), BatchKind::kNumber, 0, Returns::kNumber},
};
#undef VCPUD_BATCH_FIXED
constexpr size_t kBatchOpCount = sizeof kBatchOps / sizeof kBatchOps[0];

// The op's ioctl argument, after the same checks its single-call Prepare function makes.
void* BatchArg(Napi::Env env, const BatchOp& op, const Napi::Value& v, uint64_t xsaveSize) {
  if (op.kind == BatchKind::kNumber) return nullptr;
  if (!v.IsBuffer()) throw Napi::TypeError::New(env, std::string(op.name) + ": expected a Buffer");
  auto buf = v.As<Napi::Buffer<uint8_t>>();
  size_t len = buf.Length();
  switch (op.kind) {
    case BatchKind::kFixed:
      CheckStructLength(env, op.name, len, op.size);
      break;
    case BatchKind::kXsave2:
      CheckXsaveLength(env, op.name, len, xsaveSize);
      break;
    case BatchKind::kGivenList: {
      if (len < kListHeader) ThrowLength(env, op.name, "buffer shorter than the 8-byte header");
      uint32_t declared;
      memcpy(&declared, buf.Data(), sizeof declared);
      if (declared > (len - kListHeader) / op.size) ThrowLength(env, op.name, "header declares more entries than the buffer holds");
      break;
    }
    case BatchKind::kFilledList: {
      if (len < kListHeader) ThrowLength(env, op.name, "buffer shorter than the 8-byte header");
      uint32_t cap = static_cast<uint32_t>((len - kListHeader) / op.size);
      memcpy(buf.Data(), &cap, sizeof cap);
      break;
    }
    case BatchKind::kNumber:
      break;
  }
  return buf.Data();
}

double MonotonicSeconds() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_nsec) / 1e9;
}

// kvm_sregs as KVM_GET_SREGS gives it, from the kvm_sregs2 and kvm_vcpu_events the same batch read:
// the struct up to apic_base is kvm_sregs2's, and interrupt_bitmap holds the injected interrupt's bit
// (src/ffi/sregs-from-sregs2.ts says why these are the same bytes).
void SregsFromSregs2(uint8_t* sregs, const uint8_t* sregs2, const uint8_t* events) {
  constexpr size_t kCommon = offsetof(kvm_sregs, interrupt_bitmap);
  static_assert(kCommon == offsetof(kvm_sregs2, flags), "kvm_sregs2 is laid out as kvm_sregs up to apic_base");
  memcpy(sregs, sregs2, kCommon);
  memset(sregs + kCommon, 0, KSIZE(kvm_sregs) - kCommon);
  if (!events[offsetof(kvm_vcpu_events, interrupt.injected)]) return;
  // The bitmap is little-endian u64 words (set_bit): bit nr is bit nr % 8 of byte nr / 8.
  uint8_t nr = events[offsetof(kvm_vcpu_events, interrupt.nr)];
  sregs[kCommon + nr / 8] |= static_cast<uint8_t>(1u << (nr % 8));
}

// The buffers a batch fills kvm_sregs from (`derive`: [sregs, sregs2, vcpu_events], each its struct's
// size), or all null when the argument is undefined.
struct Derive {
  uint8_t* sregs = nullptr;
  const uint8_t* sregs2 = nullptr;
  const uint8_t* events = nullptr;
  void Run() const {
    if (sregs) SregsFromSregs2(sregs, sregs2, events);
  }
};

Derive DeriveArg(Napi::Env env, const char* name, const Napi::Value& v) {
  Derive d;
  if (v.IsUndefined()) return d;
  if (!v.IsArray() || v.As<Napi::Array>().Length() != 3) throw Napi::TypeError::New(env, std::string(name) + ": derive must be [sregs, sregs2, vcpu_events]");
  auto a = v.As<Napi::Array>();
  const size_t sizes[] = {KSIZE(kvm_sregs), KSIZE(kvm_sregs2), KSIZE(kvm_vcpu_events)};
  uint8_t* p[3];
  for (uint32_t i = 0; i < 3; i++) {
    Napi::Value b = a.Get(i);
    if (!b.IsBuffer()) throw Napi::TypeError::New(env, std::string(name) + ": derive[" + std::to_string(i) + "] is not a Buffer");
    CheckStructLength(env, name, b.As<Napi::Buffer<uint8_t>>().Length(), sizes[i]);
    p[i] = b.As<Napi::Buffer<uint8_t>>().Data();
  }
  d.sregs = p[0];
  d.sregs2 = p[1];
  d.events = p[2];
  return d;
}

// Runs `calls` in order, recording out[2i] = the return value and out[2i+1] = the duration in seconds of
// each call that ran; stops at the first failure and returns its error (not thrown) with `batchIndex`,
// else an empty value.
Napi::Value RunCalls(Napi::Env env, const std::vector<Call>& calls, double* out) {
  for (size_t i = 0; i < calls.size(); i++) {
    double start = MonotonicSeconds();
    SysResult r = calls[i].Run();
    out[2 * i] = static_cast<double>(r.ret);
    out[2 * i + 1] = MonotonicSeconds() - start;
    try {
      Finish(env, calls[i], r);
    } catch (const Napi::Error& e) {
      Napi::Object err = e.Value();
      err.Set("batchIndex", Napi::Number::New(env, static_cast<double>(i)));
      return err;
    }
  }
  return Napi::Value();
}

// The checked calls of a batch: `ops` (kBatchOps indices) with their `args`, `out` long enough for them.
std::vector<Call> BatchCalls(const Napi::CallbackInfo& info, const char* name, int fd, size_t opsAt, uint64_t xsaveSize) {
  Napi::Env env = info.Env();
  if (!info[opsAt].IsTypedArray() || !info[opsAt + 1].IsArray() || !info[opsAt + 2].IsTypedArray() ||
      info[opsAt + 2].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw Napi::TypeError::New(env, std::string(name) + ": expected (Uint8Array, Array, Float64Array)");
  auto ops = info[opsAt].As<Napi::Uint8Array>();
  auto args = info[opsAt + 1].As<Napi::Array>();
  size_t n = ops.ElementLength();
  if (args.Length() != n || info[opsAt + 2].As<Napi::Float64Array>().ElementLength() < 2 * n)
    ThrowLength(env, name, "ops, args and out disagree in length");
  std::vector<Call> calls(n);
  for (size_t i = 0; i < n; i++) {
    if (ops[i] >= kBatchOpCount) ThrowLength(env, name, "op " + std::to_string(ops[i]) + " is not a batch op");
    const BatchOp& op = kBatchOps[ops[i]];
    calls[i] = Make(op.name, fd, op.request, BatchArg(env, op, args.Get(i), xsaveSize), op.returns);
    calls[i].after = op.after;
  }
  return calls;
}

// getBatch(fd, ops: Uint8Array of kBatchOps indices, args: (Buffer|undefined)[], out: Float64Array(2n),
//          xsaveSize: the VM's KVM_CAP_XSAVE2 size, for a KVM_GET_XSAVE2 op (0 when there is none),
//          derive?: [sregs, sregs2, vcpu_events]: kvm_sregs filled from the other two after the ioctls)
// -> undefined when every op succeeded, else the failing op's error (not thrown) with `batchIndex`.
// out[2i] = the ioctl's return value, out[2i+1] = its duration in seconds, for each op that ran.
Napi::Value GetBatch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* name = "getBatch";
  int fd = FdArg(info, 0, name);
  uint64_t xsaveSize = U64Arg(info, 4, name, "xsaveSize");
  std::vector<Call> calls = BatchCalls(info, name, fd, 1, xsaveSize);
  Derive derive = DeriveArg(env, name, info[5]);
  Napi::Value failure = RunCalls(env, calls, info[3].As<Napi::Float64Array>().Data());
  if (!failure.IsEmpty()) return failure;
  derive.Run();
  return env.Undefined();
}

// A batch made again and again over the same buffers (GetState of one vCPU): checked once, its buffers
// and program held, so a run costs the ioctls and no argument conversions. After a complete run it may
// encode its buffers with a wire program (native/wire_program.h) straight into the caller's buffer.
//   new PreparedBatch(ops, args, out, xsaveSize, derive?, returnsTo?, program?, inputs?)
//     returnsTo: per op, a 4-byte Buffer that gets the op's return value (u32, little-endian) or undefined
//     program, inputs: a wire program and the Buffers it reads (among them the ops' buffers)
//   run(fd, dest?, pos?) -> the failing op's error (with batchIndex), as getBatch; else, without dest,
//     undefined; with dest: the position after the program's output, -1 when dest has no room for it,
//     -2 when a list read stopped short (KVM_GET_MSRS read fewer MSRs than asked), which the program
//     must not encode.
class PreparedBatch : public Napi::ObjectWrap<PreparedBatch> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PreparedBatch", {InstanceMethod("run", &PreparedBatch::Run)});
  }

  explicit PreparedBatch(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PreparedBatch>(info) {
    Napi::Env env = info.Env();
    const char* name = "PreparedBatch";
    uint64_t xsaveSize = U64Arg(info, 3, name, "xsaveSize");
    // fd -1 until a run: each run is given the vCPU's fd as it is then.
    calls_ = BatchCalls(info, name, -1, 0, xsaveSize);
    out_ = info[2].As<Napi::Float64Array>().Data();
    auto ops = info[0].As<Napi::Uint8Array>();
    for (size_t i = 0; i < calls_.size(); i++) {
      const BatchOp& op = kBatchOps[ops[i]];
      if (op.kind == BatchKind::kFilledList || op.kind == BatchKind::kGivenList) {
        uint8_t* buf = static_cast<uint8_t*>(calls_[i].arg);
        uint32_t count;
        memcpy(&count, buf, sizeof count);
        lists_.push_back({i, buf, count, op.kind == BatchKind::kFilledList});
      }
    }
    derive_ = DeriveArg(env, name, info[4]);
    returns_.assign(calls_.size(), nullptr);
    if (!info[5].IsUndefined()) {
      if (!info[5].IsArray() || info[5].As<Napi::Array>().Length() != calls_.size())
        throw Napi::TypeError::New(env, "PreparedBatch: returnsTo must be an array with an entry per op");
      auto r = info[5].As<Napi::Array>();
      for (uint32_t i = 0; i < r.Length(); i++) {
        Napi::Value b = r.Get(i);
        if (b.IsUndefined()) continue;
        if (!b.IsBuffer() || b.As<Napi::Buffer<uint8_t>>().Length() != 4) throw Napi::TypeError::New(env, "PreparedBatch: returnsTo[" + std::to_string(i) + "] is not a 4-byte Buffer");
        returns_[i] = b.As<Napi::Buffer<uint8_t>>().Data();
      }
    }
    if (!info[6].IsUndefined()) {
      if (!info[6].IsTypedArray() || info[6].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array || !info[7].IsArray())
        throw Napi::TypeError::New(env, "PreparedBatch: expected a Uint32Array program and an array of inputs");
      auto prog = info[6].As<Napi::Uint32Array>();
      program_ = prog.Data();
      words_ = prog.ElementLength();
      auto list = info[7].As<Napi::Array>();
      for (uint32_t i = 0; i < list.Length(); i++) {
        Napi::Value v = list.Get(i);
        if (!v.IsBuffer()) throw Napi::TypeError::New(env, "PreparedBatch: input " + std::to_string(i) + " is not a Buffer");
        inputs_.push_back({v.As<Napi::Buffer<uint8_t>>().Data(), v.As<Napi::Buffer<uint8_t>>().Length()});
      }
    }
    // Every buffer and array the pointers above lie in, kept alive as long as this batch.
    Napi::Array held = Napi::Array::New(env);
    for (uint32_t i = 0; i < 8 && i < info.Length(); i++) held.Set(i, info[i]);
    held_ = Napi::Persistent(held);
  }

 private:
  struct List {
    size_t call;
    uint8_t* buf;
    uint32_t count;  // the entries asked for (GivenList) or room for (FilledList), from the header when prepared
    bool filled;
  };

  Napi::Value Run(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int fd = FdArg(info, 0, "PreparedBatch.run");
    for (Call& c : calls_) c.fd = fd;
    // A filled list's header says how many entries fit; the kernel wrote back how many it filled.
    for (const List& l : lists_)
      if (l.filled) memcpy(l.buf, &l.count, sizeof l.count);
    Napi::Value failure = RunCalls(env, calls_, out_);
    if (!failure.IsEmpty()) return failure;
    derive_.Run();
    for (size_t i = 0; i < calls_.size(); i++)
      if (returns_[i]) {
        uint32_t v = static_cast<uint32_t>(out_[2 * i]);
        memcpy(returns_[i], &v, sizeof v);
      }
    if (info.Length() < 2 || info[1].IsUndefined()) return env.Undefined();
    if (program_ == nullptr) throw Napi::TypeError::New(env, "PreparedBatch: no program to encode with");
    if (!info[1].IsBuffer()) throw Napi::TypeError::New(env, "PreparedBatch: dest must be a Buffer");
    auto dest = info[1].As<Napi::Buffer<uint8_t>>();
    size_t pos = OutputOffsetArg(env, info[2], dest.Length(), "PreparedBatch: pos is not an offset within dest");
    for (const List& l : lists_)
      if (!l.filled && out_[2 * l.call] < l.count) return Napi::Number::New(env, -2);
    try {
      return Napi::Number::New(env, static_cast<double>(RunWireProgram(program_, words_, inputs_, dest.Data(), dest.Length(), pos)));
    } catch (const std::range_error& e) {
      throw Napi::RangeError::New(env, std::string("PreparedBatch: ") + e.what());
    }
  }

  std::vector<Call> calls_;
  double* out_ = nullptr;
  std::vector<List> lists_;
  Derive derive_;
  std::vector<uint8_t*> returns_;
  const uint32_t* program_ = nullptr;
  size_t words_ = 0;
  std::vector<WireInput> inputs_;
  Napi::Reference<Napi::Array> held_;
};

Napi::Array BatchOpNames(Napi::Env env) {
  Napi::Array a = Napi::Array::New(env, kBatchOpCount);
  for (size_t i = 0; i < kBatchOpCount; i++) a.Set(static_cast<uint32_t>(i), Napi::String::New(env, kBatchOps[i].name));
  return a;
}

// ---- plain fds ----
Napi::Value OpenKvm(const Napi::CallbackInfo& info) {
  std::string path = info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "/dev/kvm";
  int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    Napi::Error e = MakeSysError(info.Env(), "open", errno);
    e.Set("path", Napi::String::New(info.Env(), path));
    throw e;
  }
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value CloseFd(const Napi::CallbackInfo& info) {
  int fd = FdArg(info, 0, "close");
  if (close(fd) < 0) throw MakeSysError(info.Env(), "close", errno);
  return info.Env().Undefined();
}

Napi::Object Sizes(Napi::Env env) {
  Napi::Object s = Napi::Object::New(env);
#define VCPUD_SIZE(T) s.Set(#T, Napi::Number::New(env, static_cast<double>(KSIZE(T))))
  VCPUD_SIZE(kvm_regs);
  VCPUD_SIZE(kvm_sregs);
  VCPUD_SIZE(kvm_sregs2);
  VCPUD_SIZE(kvm_fpu);
  VCPUD_SIZE(kvm_xsave);
  VCPUD_SIZE(kvm_xcrs);
  VCPUD_SIZE(kvm_lapic_state);
  VCPUD_SIZE(kvm_vcpu_events);
  VCPUD_SIZE(kvm_debugregs);
  VCPUD_SIZE(kvm_mp_state);
  VCPUD_SIZE(kvm_msr_entry);
  VCPUD_SIZE(kvm_cpuid_entry2);
  VCPUD_SIZE(kvm_enable_cap);
  VCPUD_SIZE(kvm_clock_data);
  VCPUD_SIZE(kvm_irqchip);
  VCPUD_SIZE(kvm_nested_state);
  VCPUD_SIZE(kvm_run);
#undef VCPUD_SIZE
  return s;
}

}  // namespace

void RegisterIoctls(Napi::Env env, Napi::Object exports) {
  auto both = [&](const char* name, Napi::Value (*sync)(const Napi::CallbackInfo&),
                  Napi::Value (*async)(const Napi::CallbackInfo&)) {
    exports.Set(name, Napi::Function::New(env, sync, name));
    exports.Set(std::string(name) + "Async", Napi::Function::New(env, async, name));
  };
#define VCPUD_EXPORT(jsName, Fn) both(jsName, Sync<Fn>, Async<Fn>)
  VCPUD_EXPORT("getApiVersion", GetApiVersion);
  VCPUD_EXPORT("checkExtension", CheckExtension);
  VCPUD_EXPORT("getVcpuMmapSize", GetVcpuMmapSize);
  VCPUD_EXPORT("getMsrIndexList", GetMsrIndexList);
  VCPUD_EXPORT("getMsrFeatureIndexList", GetMsrFeatureIndexList);
  VCPUD_EXPORT("getSupportedCpuid", GetSupportedCpuid);
  VCPUD_EXPORT("createVm", CreateVm);
  VCPUD_EXPORT("createIrqchip", CreateIrqchip);
  VCPUD_EXPORT("createVcpu", CreateVcpu);
  VCPUD_EXPORT("setTssAddr", SetTssAddr);
  VCPUD_EXPORT("enableCap", EnableCap);
  VCPUD_EXPORT("getClock", GetClock);
  VCPUD_EXPORT("setClock", SetClock);
  VCPUD_EXPORT("getIrqchip", GetIrqchip);
  VCPUD_EXPORT("setIrqchip", SetIrqchip);
  VCPUD_EXPORT("setUserMemoryRegion", SetUserMemoryRegion);
  VCPUD_EXPORT("getDirtyLog", GetDirtyLog);
  VCPUD_EXPORT("clearDirtyLog", ClearDirtyLog);
  VCPUD_EXPORT("getRegs", GetRegs);
  VCPUD_EXPORT("setRegs", SetRegs);
  VCPUD_EXPORT("getSregs", GetSregs);
  VCPUD_EXPORT("setSregs", SetSregs);
  VCPUD_EXPORT("getSregs2", GetSregs2);
  VCPUD_EXPORT("setSregs2", SetSregs2);
  VCPUD_EXPORT("getFpu", GetFpu);
  VCPUD_EXPORT("setFpu", SetFpu);
  VCPUD_EXPORT("getXsave", GetXsave);
  VCPUD_EXPORT("getXsave2", GetXsave2);
  VCPUD_EXPORT("setXsave", SetXsave);
  VCPUD_EXPORT("getXcrs", GetXcrs);
  VCPUD_EXPORT("setXcrs", SetXcrs);
  VCPUD_EXPORT("getMsrs", GetMsrs);
  VCPUD_EXPORT("setMsrs", SetMsrs);
  VCPUD_EXPORT("getLapic", GetLapic);
  VCPUD_EXPORT("setLapic", SetLapic);
  VCPUD_EXPORT("getVcpuEvents", GetVcpuEvents);
  VCPUD_EXPORT("setVcpuEvents", SetVcpuEvents);
  VCPUD_EXPORT("getDebugregs", GetDebugregs);
  VCPUD_EXPORT("setDebugregs", SetDebugregs);
  VCPUD_EXPORT("getMpState", GetMpState);
  VCPUD_EXPORT("setMpState", SetMpState);
  VCPUD_EXPORT("getCpuid2", GetCpuid2);
  VCPUD_EXPORT("setCpuid2", SetCpuid2);
  VCPUD_EXPORT("getTscKhz", GetTscKhz);
  VCPUD_EXPORT("setTscKhz", SetTscKhz);
  VCPUD_EXPORT("getNestedState", GetNestedState);
  VCPUD_EXPORT("setNestedState", SetNestedState);
#undef VCPUD_EXPORT
  exports.Set("openKvm", Napi::Function::New(env, OpenKvm, "openKvm"));
  exports.Set("closeFd", Napi::Function::New(env, CloseFd, "closeFd"));
  exports.Set("sizes", Sizes(env));
  exports.Set("getBatch", Napi::Function::New(env, GetBatch, "getBatch"));
  exports.Set("PreparedBatch", PreparedBatch::Define(env));
  exports.Set("batchOps", BatchOpNames(env));
}

// ---- argument helpers ----
int FdArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (!info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": fd must be a number");
  int fd = info[i].As<Napi::Number>().Int32Value();
  if (fd < 0) throw Napi::RangeError::New(info.Env(), std::string(op) + ": fd " + std::to_string(fd) + " is closed");
  return fd;
}

Napi::Buffer<uint8_t> BufferArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (!info[i].IsBuffer()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": expected a Buffer");
  return info[i].As<Napi::Buffer<uint8_t>>();
}

bool ValueToU64(const Napi::Value& v, uint64_t* out) {
  if (v.IsBigInt()) {
    bool lossless;
    *out = v.As<Napi::BigInt>().Uint64Value(&lossless);
    return true;
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= 9007199254740991.0 && d == static_cast<double>(static_cast<uint64_t>(d))) {
      *out = static_cast<uint64_t>(d);
      return true;
    }
  }
  return false;
}

uint64_t U64Arg(const Napi::CallbackInfo& info, size_t i, const char* op, const char* what) {
  uint64_t v;
  if (ValueToU64(info[i], &v)) return v;
  throw Napi::TypeError::New(info.Env(), std::string(op) + ": " + what + " must be a non-negative integer");
}

}  // namespace vcpud
