/* run_guest FILE.bin [max_exits] [vcpus]
 *
 * Runs a test guest under the ABI of test/guests/README.md:
 *   OUT 0x3f8 (1 byte)  -> stdout (with vcpus > 1: line-buffered, "cpuN: " prefix)
 *   IN  0x3fd           -> 0x20 (transmitter empty)
 *   OUT 0x500 (4 bytes) -> stderr "debug VALUE"
 *   OUT 0x501 (4 bytes) -> that vCPU is done; exit code = value
 *   HLT                 -> that vCPU is done (code 0)
 *   anything else       -> print the exit and exit 2
 * max_exits (0 = unlimited) stops the run with exit code 0 after that many
 * KVM_RUN returns in total. With vcpus > 1 the vCPUs are run round-robin from
 * one thread (each KVM_RUN returns at the next exit), which is enough for the
 * test guests, and the per-vCPU counters at 0x9000 + 8*i are printed at the end. */
#include "kvm_min.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MAX_VCPUS 64
#define COUNTER_BASE 0x9000

struct line {
  char buf[256];
  size_t len;
};

static void serial_byte(int nvcpus, int index, struct line *l, uint8_t c) {
  if (nvcpus == 1) {
    fputc(c, stdout);
    return;
  }
  if (c != '\n' && l->len < sizeof(l->buf) - 1) {
    l->buf[l->len++] = (char)c;
    return;
  }
  printf("cpu%d: %.*s\n", index, (int)l->len, l->buf);
  l->len = 0;
}

/* Prints an exit the ABI does not cover. */
static void report_unhandled(struct kvm_vcpu *v) {
  struct kvm_run *r = v->run;
  fflush(stdout);
  fprintf(stderr, "cpu%d: unhandled exit %u (%s)", v->index, r->exit_reason,
          exit_reason_name(r->exit_reason));
  switch (r->exit_reason) {
    case KVM_EXIT_IO:
      fprintf(stderr, ": %s port 0x%x size %u count %u", r->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
              r->io.port, r->io.size, r->io.count);
      break;
    case KVM_EXIT_MMIO: {
      uint64_t data = 0;
      memcpy(&data, r->mmio.data, r->mmio.len < 8 ? r->mmio.len : 8);
      fprintf(stderr, ": %s gpa 0x%" PRIx64 " len %u data 0x%" PRIx64, r->mmio.is_write ? "write" : "read",
              (uint64_t)r->mmio.phys_addr, r->mmio.len, data);
      break;
    }
    case KVM_EXIT_FAIL_ENTRY:
      fprintf(stderr, ": hardware_entry_failure_reason 0x%" PRIx64,
              (uint64_t)r->fail_entry.hardware_entry_failure_reason);
      break;
    case KVM_EXIT_INTERNAL_ERROR:
      fprintf(stderr, ": suberror %u", r->internal.suberror);
      for (uint32_t i = 0; i < r->internal.ndata && i < 16; i++)
        fprintf(stderr, " 0x%" PRIx64, (uint64_t)r->internal.data[i]);
      break;
  }
  struct kvm_regs regs;
  if (ioctl(v->fd, KVM_GET_REGS, &regs) == 0) fprintf(stderr, " (rip 0x%" PRIx64 ")", (uint64_t)regs.rip);
  fputc('\n', stderr);
}

int main(int argc, char **argv) {
  if (argc < 2 || argc > 4) {
    fprintf(stderr, "usage: %s FILE.bin [max_exits] [vcpus]\n", argv[0]);
    return 1;
  }
  uint64_t max_exits = argc > 2 ? strtoull(argv[2], NULL, 0) : 0;
  int nvcpus = argc > 3 ? atoi(argv[3]) : 1;
  if (nvcpus < 1 || nvcpus > MAX_VCPUS) {
    fprintf(stderr, "vcpus must be 1..%d\n", MAX_VCPUS);
    return 1;
  }

  struct kvm_vm vm;
  vm_create(&vm, GUEST_MEM_DEFAULT);
  guest_load(&vm, argv[1]);
  static struct kvm_vcpu vcpus[MAX_VCPUS];
  static struct line lines[MAX_VCPUS];
  int done[MAX_VCPUS] = {0};
  for (int i = 0; i < nvcpus; i++) {
    vcpu_create(&vm, &vcpus[i], i);
    vcpu_reset_realmode(&vcpus[i]);
  }

  uint64_t exits = 0;
  int running = nvcpus, result = 0;
  while (running > 0) {
    for (int i = 0; i < nvcpus; i++) {
      if (done[i]) continue;
      if (max_exits && exits >= max_exits) {
        fflush(stdout);
        fprintf(stderr, "max exits reached (%" PRIu64 ")\n", exits);
        goto out;
      }
      struct kvm_vcpu *v = &vcpus[i];
      if (ioctl(v->fd, KVM_RUN, 0) < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        die("KVM_RUN");
      }
      exits++;
      struct kvm_run *r = v->run;
      if (r->exit_reason == KVM_EXIT_HLT) {
        done[i] = 1;
        running--;
        continue;
      }
      if (r->exit_reason != KVM_EXIT_IO) {
        report_unhandled(v);
        return 2;
      }
      uint8_t *data = io_data(v);
      int out = r->io.direction == KVM_EXIT_IO_OUT;
      if (out && r->io.port == PORT_SERIAL && r->io.size == 1) {
        for (uint32_t k = 0; k < r->io.count; k++) serial_byte(nvcpus, i, &lines[i], data[k]);
      } else if (!out && r->io.port == PORT_SERIAL_LSR && r->io.size == 1) {
        memset(data, 0x20, r->io.count);
      } else if (out && r->io.port == PORT_DEBUG && r->io.size == 4) {
        uint32_t val;
        memcpy(&val, data, 4);
        fflush(stdout);
        if (nvcpus == 1) fprintf(stderr, "debug %u\n", val);
        else fprintf(stderr, "cpu%d: debug %u\n", i, val);
      } else if (out && r->io.port == PORT_DONE && r->io.size == 4) {
        uint32_t val;
        memcpy(&val, data, 4);
        if ((int)val > result) result = (int)val;
        done[i] = 1;
        running--;
      } else {
        report_unhandled(v);
        return 2;
      }
    }
  }
out:
  fflush(stdout);
  /* counter64's per-vCPU mirrors; all zero (not printed) for the other guests. */
  for (int i = 0; nvcpus > 1 && i < nvcpus; i++) {
    uint64_t c;
    memcpy(&c, vm.mem + COUNTER_BASE + 8 * i, 8);
    if (c) fprintf(stderr, "cpu%d: counter[0x%x] = %" PRIu64 "\n", i, COUNTER_BASE + 8 * i, c);
  }
  return result;
}
