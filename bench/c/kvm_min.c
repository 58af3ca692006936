#include "kvm_min.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

void die(const char *what) {
  perror(what);
  exit(1);
}

void vm_create(struct kvm_vm *vm, size_t mem_size) {
  memset(vm, 0, sizeof(*vm));
  vm->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (vm->kvm < 0) die("open /dev/kvm");
  int api = ioctl(vm->kvm, KVM_GET_API_VERSION, 0);
  if (api != KVM_API_VERSION) {
    fprintf(stderr, "KVM API version %d, expected %d\n", api, KVM_API_VERSION);
    exit(1);
  }
  vm->fd = ioctl(vm->kvm, KVM_CREATE_VM, 0);
  if (vm->fd < 0) die("KVM_CREATE_VM");

  /* Anonymous mapping: zero-filled, so unused page-table entries start at 0. */
  vm->mem_size = mem_size;
  vm->mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (vm->mem == MAP_FAILED) die("mmap guest memory");
  struct kvm_userspace_memory_region region = {
      .slot = 0,
      .guest_phys_addr = 0,
      .memory_size = mem_size,
      .userspace_addr = (uint64_t)(uintptr_t)vm->mem,
  };
  if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");

  vm->run_size = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
  if (vm->run_size < (int)sizeof(struct kvm_run)) die("KVM_GET_VCPU_MMAP_SIZE");
}

void vcpu_create(struct kvm_vm *vm, struct kvm_vcpu *vcpu, int index) {
  vcpu->index = index;
  vcpu->fd = ioctl(vm->fd, KVM_CREATE_VCPU, index);
  if (vcpu->fd < 0) die("KVM_CREATE_VCPU");
  vcpu->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu->fd, 0);
  if (vcpu->run == MAP_FAILED) die("mmap kvm_run");

  /* Without KVM_SET_CPUID2 the guest's CPUID is empty, so KVM treats EFER.LME
   * as reserved and the long-mode guests' WRMSR(EFER) #GPs -> triple fault.
   * Give the vCPU everything KVM supports, as a VMM would. */
  struct kvm_cpuid2 *cpuid = vm->cpuid;
  if (!cpuid) {
    for (int n = 64;; n *= 2) {
      cpuid = calloc(1, sizeof(*cpuid) + n * sizeof(struct kvm_cpuid_entry2));
      if (!cpuid) die("calloc cpuid");
      cpuid->nent = n;
      if (ioctl(vm->kvm, KVM_GET_SUPPORTED_CPUID, cpuid) == 0) break;
      if (errno != E2BIG) die("KVM_GET_SUPPORTED_CPUID");
      free(cpuid);
    }
    vm->cpuid = cpuid;
  }
  if (ioctl(vcpu->fd, KVM_SET_CPUID2, cpuid) < 0) die("KVM_SET_CPUID2");
}

size_t guest_load(struct kvm_vm *vm, const char *path) {
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) die(path);
  struct stat st;
  if (fstat(fd, &st) < 0) die("fstat guest");
  if ((size_t)st.st_size > vm->mem_size - GUEST_LOAD_ADDR) {
    fprintf(stderr, "%s: too large for guest memory\n", path);
    exit(1);
  }
  size_t done = 0;
  while (done < (size_t)st.st_size) {
    ssize_t n = read(fd, vm->mem + GUEST_LOAD_ADDR + done, st.st_size - done);
    if (n <= 0) die("read guest");
    done += n;
  }
  close(fd);
  return done;
}

void vcpu_reset_realmode(struct kvm_vcpu *vcpu) {
  struct kvm_sregs sregs;
  if (ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  /* Reset CS is F000:FFF0 with base 0xffff0000; the ABI wants 0000:1000. */
  sregs.cs.selector = 0;
  sregs.cs.base = 0;
  if (ioctl(vcpu->fd, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");

  struct kvm_regs regs;
  memset(&regs, 0, sizeof(regs));
  regs.rip = GUEST_LOAD_ADDR;
  regs.rsi = (uint64_t)vcpu->index;
  regs.rflags = 2; /* bit 1 is reserved-as-1 */
  if (ioctl(vcpu->fd, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");
}

const char *exit_reason_name(uint32_t reason) {
  static const char *names[] = {
      [KVM_EXIT_UNKNOWN] = "UNKNOWN",       [KVM_EXIT_EXCEPTION] = "EXCEPTION",
      [KVM_EXIT_IO] = "IO",                 [KVM_EXIT_HYPERCALL] = "HYPERCALL",
      [KVM_EXIT_DEBUG] = "DEBUG",           [KVM_EXIT_HLT] = "HLT",
      [KVM_EXIT_MMIO] = "MMIO",             [KVM_EXIT_IRQ_WINDOW_OPEN] = "IRQ_WINDOW_OPEN",
      [KVM_EXIT_SHUTDOWN] = "SHUTDOWN",     [KVM_EXIT_FAIL_ENTRY] = "FAIL_ENTRY",
      [KVM_EXIT_INTR] = "INTR",             [KVM_EXIT_SET_TPR] = "SET_TPR",
      [KVM_EXIT_TPR_ACCESS] = "TPR_ACCESS", [KVM_EXIT_NMI] = "NMI",
      [KVM_EXIT_INTERNAL_ERROR] = "INTERNAL_ERROR",
      [KVM_EXIT_SYSTEM_EVENT] = "SYSTEM_EVENT",
  };
  if (reason < sizeof(names) / sizeof(names[0]) && names[reason]) return names[reason];
  return "OTHER";
}

double now_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}
