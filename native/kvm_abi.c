/* See kvm_abi.def: the C compiler's view of <linux/kvm.h>, exported to the C++ code. */
#include <linux/kvm.h>
#include <stddef.h>

#define VCPUD_REQ(N) const unsigned long vcpud_req_##N = KVM_##N;
#define VCPUD_SIZE(T) const size_t vcpud_sizeof_##T = sizeof(struct T);
#include "kvm_abi.def"
