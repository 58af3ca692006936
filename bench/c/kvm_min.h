/* Minimal KVM helpers shared by the bench/validation programs: one VM with
 * flat RAM at GPA 0, vCPUs with their kvm_run mapped, and the guest ABI start
 * state (test/guests/README.md). Errors are fatal: these are tools, not libs. */
#ifndef KVM_MIN_H
#define KVM_MIN_H

#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>

#define GUEST_LOAD_ADDR 0x1000
#define GUEST_MEM_DEFAULT (2u << 20) /* the ABI's minimum: 2 MiB */

#define PORT_SERIAL 0x3f8
#define PORT_SERIAL_LSR 0x3fd
#define PORT_DEBUG 0x500
#define PORT_DONE 0x501

struct kvm_vm {
  int kvm;       /* /dev/kvm */
  int fd;        /* VM fd */
  uint8_t *mem;  /* host mapping of guest RAM */
  size_t mem_size;
  int run_size;  /* KVM_GET_VCPU_MMAP_SIZE */
  struct kvm_cpuid2 *cpuid; /* KVM_GET_SUPPORTED_CPUID, fetched once */
};

struct kvm_vcpu {
  int fd;
  int index;
  struct kvm_run *run;
};

void die(const char *what);                 /* perror + exit(1) */
void vm_create(struct kvm_vm *vm, size_t mem_size);
/* Creates vCPU `index`, maps its kvm_run and sets CPUID to KVM_GET_SUPPORTED_CPUID. */
void vcpu_create(struct kvm_vm *vm, struct kvm_vcpu *vcpu, int index);
size_t guest_load(struct kvm_vm *vm, const char *path); /* at 0x1000, returns size */
void vcpu_reset_realmode(struct kvm_vcpu *vcpu);         /* CS=0:0x1000, RSI=index */
const char *exit_reason_name(uint32_t reason);
double now_seconds(void);                                /* CLOCK_MONOTONIC */

/* Pointer to the data bytes of a KVM_EXIT_IO exit (lives inside kvm_run). */
static inline uint8_t *io_data(struct kvm_vcpu *v) {
  return (uint8_t *)v->run + v->run->io.data_offset;
}

#endif
