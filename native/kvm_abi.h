// Request numbers and struct sizes as C computes them (see kvm_abi.def for why).
#pragma once
#include <cstddef>

extern "C" {
#define VCPUD_REQ(N) extern const unsigned long vcpud_req_##N;
#define VCPUD_SIZE(T) extern const size_t vcpud_sizeof_##T;
#include "kvm_abi.def"
#undef VCPUD_REQ
#undef VCPUD_SIZE
}

#define KREQ(N) vcpud_req_##N
#define KSIZE(T) vcpud_sizeof_##T
