// KVM dirty-page logging ioctls on a VM fd (KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG) as Prepare
// functions for ioctl_call.h. Bitmaps are one bit per 4 KiB page of the slot, LSB first, in u64
// words: the kernel reads or writes ALIGN(pages, 64) / 8 bytes, which the buffer must hold.
// Enabling logging (KVM_ENABLE_CAP and the slot's KVM_MEM_LOG_DIRTY_PAGES flag) uses the generic
// ioctls; which mode to use is src/ffi's business.
#pragma once
#include "ioctl_call.h"

namespace vcpud {

// (vmFd, slot, GuestMemory of the slot, bitmap): the kernel fills the bitmap. Without manual
// protect it also clears its log and write-protects the pages again.
Call GetDirtyLog(const Napi::CallbackInfo& info);

// (vmFd, slot, GuestMemory of the slot, firstPage, numPages, bitmap): re-protects the pages of
// [firstPage, +numPages) whose bit is set in `bitmap`, a slot-wide bitmap (bit i = page i, as
// GetDirtyLog fills it). The kernel requires firstPage % 64 == 0 and numPages % 64 == 0 unless the
// range ends at the slot's end (EINVAL otherwise).
Call ClearDirtyLog(const Napi::CallbackInfo& info);

}  // namespace vcpud
