/* ioctl_floor [N] [FILE.bin]
 *
 * The floor for reading vCPU state: ns per call of each state ioctl on one
 * vCPU of a VM that has an in-kernel irqchip (KVM_CREATE_IRQCHIP before the
 * vCPU, as vcpud does, so KVM_GET_LAPIC works). Each ioctl is called N times
 * (default 20000) in each of 5 batches; the value is the median batch's
 * ns/call. With FILE.bin (e.g. counter64.bin) the vCPU first runs that guest
 * for 1000 exits, so state is measured on a vCPU that has been in long mode
 * (a paused VM), not a never-run one.
 *
 * Prints one JSON object: {"KVM_GET_REGS": ns, ...} plus "errors" (ioctls that
 * failed here, with errno: those are skipped, not fatal), "info" (sizes used)
 * and "caps" (KVM_CHECK_EXTENSION on the VM fd for the caps these rely on). */
#include "kvm_min.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#define BATCHES 5

struct op {
  const char *name;
  int fd;
  unsigned long req;
  unsigned long arg; /* pointer or immediate */
  double ns;         /* result, < 0 if failed */
  int err;
};

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static int call(struct op *op) { return ioctl(op->fd, op->req, op->arg); }

static void measure(struct op *op, int n) {
  /* One probe call: a failing ioctl is reported, not timed. */
  if (call(op) < 0) {
    op->err = errno;
    op->ns = -1;
    return;
  }
  double per[BATCHES];
  for (int b = 0; b < BATCHES; b++) {
    double t0 = now_seconds();
    for (int i = 0; i < n; i++) {
      if (call(op) < 0) {
        op->err = errno;
        op->ns = -1;
        return;
      }
    }
    per[b] = (now_seconds() - t0) * 1e9 / n;
  }
  qsort(per, BATCHES, sizeof(per[0]), cmp_double);
  op->ns = per[BATCHES / 2];
}

static void *xcalloc(size_t n) {
  void *p = calloc(1, n);
  if (!p) die("calloc");
  return p;
}

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 20000;
  if (n <= 0) n = 20000;

  struct kvm_vm vm;
  struct kvm_vcpu v;
  vm_create(&vm, GUEST_MEM_DEFAULT);
  if (ioctl(vm.fd, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
  vcpu_create(&vm, &v, 0);
  vcpu_reset_realmode(&v);
  if (argc > 2) {
    guest_load(&vm, argv[2]);
    for (int i = 0; i < 1000; i++) {
      if (ioctl(v.fd, KVM_RUN, 0) < 0) die("KVM_RUN");
      if (v.run->exit_reason != KVM_EXIT_IO) {
        fprintf(stderr, "warm-up: exit %s\n", exit_reason_name(v.run->exit_reason));
        break;
      }
    }
  }

  /* Buffers for the state ioctls. */
  static struct kvm_regs regs;
  static struct kvm_sregs sregs;
  static struct kvm_fpu fpu;
  static struct kvm_xcrs xcrs;
  static struct kvm_lapic_state lapic;
  static struct kvm_vcpu_events events;
  static struct kvm_debugregs dregs;
  static struct kvm_mp_state mp;
  if (ioctl(v.fd, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
  if (ioctl(v.fd, KVM_GET_SREGS, &sregs) < 0) die("KVM_GET_SREGS");
  static struct kvm_sregs2 sregs2;
  /* CPUID2: room for the KVM maximum (256 entries), as vcpud reads it. */
  struct kvm_cpuid2 *cpuid = xcalloc(sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
  cpuid->nent = 256;

  /* XSAVE: KVM_GET_XSAVE2 with the size KVM_CAP_XSAVE2 reports when > 0
   * (needed once AMX-sized state exists), else the fixed 4 KiB KVM_GET_XSAVE. */
  int xsave2 = ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
  size_t xsave_size = xsave2 > 0 ? (size_t)xsave2 : sizeof(struct kvm_xsave);
  if (xsave_size < sizeof(struct kvm_xsave)) xsave_size = sizeof(struct kvm_xsave);
  struct kvm_xsave *xsave = xcalloc(xsave_size);

  /* MSRs: the full list KVM reports (KVM_GET_MSR_INDEX_LIST on /dev/kvm). */
  struct kvm_msr_list probe = {.nmsrs = 0};
  if (ioctl(vm.kvm, KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG) die("KVM_GET_MSR_INDEX_LIST");
  struct kvm_msr_list *list = xcalloc(sizeof(*list) + probe.nmsrs * sizeof(uint32_t));
  list->nmsrs = probe.nmsrs;
  if (ioctl(vm.kvm, KVM_GET_MSR_INDEX_LIST, list) < 0) die("KVM_GET_MSR_INDEX_LIST");
  struct kvm_msrs *msrs = xcalloc(sizeof(*msrs) + list->nmsrs * sizeof(struct kvm_msr_entry));
  msrs->nmsrs = list->nmsrs;
  for (uint32_t i = 0; i < list->nmsrs; i++) msrs->entries[i].index = list->indices[i];
  /* KVM_GET_MSRS returns how many it read, stopping at the first it cannot. */
  int msrs_read = ioctl(v.fd, KVM_GET_MSRS, msrs);
  uint32_t msr_stop = msrs_read >= 0 && (uint32_t)msrs_read < list->nmsrs ? list->indices[msrs_read] : 0;

  /* Nested state: not in the brief's list, but vcpud serves it; size from the cap. */
  int nested_cap = ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_NESTED_STATE);
  size_t nested_size = nested_cap > 0 ? (size_t)nested_cap : sizeof(struct kvm_nested_state);
  struct kvm_nested_state *nested = xcalloc(nested_size);
  nested->size = nested_size;

#define OP(name, fd, arg) {#name, fd, name, (unsigned long)(arg), 0, 0}
  struct op ops[] = {
      OP(KVM_GET_REGS, v.fd, &regs),
      OP(KVM_SET_REGS, v.fd, &regs),
      OP(KVM_GET_SREGS, v.fd, &sregs),
      OP(KVM_SET_SREGS, v.fd, &sregs),
      OP(KVM_GET_SREGS2, v.fd, &sregs2),
      OP(KVM_GET_CPUID2, v.fd, cpuid),
      OP(KVM_GET_FPU, v.fd, &fpu),
      xsave2 > 0 ? (struct op)OP(KVM_GET_XSAVE2, v.fd, xsave) : (struct op)OP(KVM_GET_XSAVE, v.fd, xsave),
      OP(KVM_GET_XCRS, v.fd, &xcrs),
      OP(KVM_GET_MSRS, v.fd, msrs),
      OP(KVM_GET_LAPIC, v.fd, &lapic),
      OP(KVM_GET_VCPU_EVENTS, v.fd, &events),
      OP(KVM_GET_DEBUGREGS, v.fd, &dregs),
      OP(KVM_GET_MP_STATE, v.fd, &mp),
      OP(KVM_GET_TSC_KHZ, v.fd, 0),
      OP(KVM_CHECK_EXTENSION, vm.fd, KVM_CAP_USER_MEMORY), /* on the VM fd */
      OP(KVM_GET_NESTED_STATE, v.fd, nested),
  };
  size_t nops = sizeof(ops) / sizeof(ops[0]);
  for (size_t i = 0; i < nops; i++) measure(&ops[i], n);

  printf("{\n");
  for (size_t i = 0; i < nops; i++)
    if (ops[i].ns >= 0) printf("  \"%s\": %.1f,\n", ops[i].name, ops[i].ns);
  printf("  \"errors\": {");
  const char *sep = "";
  for (size_t i = 0; i < nops; i++)
    if (ops[i].ns < 0) {
      printf("%s\"%s\": \"errno %d (%s)\"", sep, ops[i].name, ops[i].err, strerror(ops[i].err));
      sep = ", ";
    }
  printf("},\n");
  printf("  \"info\": {\"calls_per_batch\": %d, \"batches\": %d, \"warmed_up\": %s, \"xsave_size\": %zu, "
         "\"msr_index_list\": %u, \"msrs_read\": %d, \"msr_stop_index\": \"0x%x\", \"nested_state_size\": %u, "
         "\"tsc_khz\": %d},\n",
         n, BATCHES, argc > 2 ? "true" : "false", xsave_size, list->nmsrs, msrs_read, msr_stop, nested->size,
         ioctl(v.fd, KVM_GET_TSC_KHZ, 0));

  static const struct { const char *name; int cap; } caps[] = {
      {"IRQCHIP", KVM_CAP_IRQCHIP},           {"XSAVE", KVM_CAP_XSAVE},
      {"XSAVE2", KVM_CAP_XSAVE2},             {"XCRS", KVM_CAP_XCRS},
      {"DEBUGREGS", KVM_CAP_DEBUGREGS},       {"VCPU_EVENTS", KVM_CAP_VCPU_EVENTS},
      {"MP_STATE", KVM_CAP_MP_STATE},         {"GET_TSC_KHZ", KVM_CAP_GET_TSC_KHZ},
      {"TSC_CONTROL", KVM_CAP_TSC_CONTROL},   {"NESTED_STATE", KVM_CAP_NESTED_STATE},
      {"SYNC_REGS", KVM_CAP_SYNC_REGS},       {"IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT},
      {"SPLIT_IRQCHIP", KVM_CAP_SPLIT_IRQCHIP}, {"GET_MSR_FEATURES", KVM_CAP_GET_MSR_FEATURES},
      {"X86_USER_SPACE_MSR", KVM_CAP_X86_USER_SPACE_MSR}, {"EXCEPTION_PAYLOAD", KVM_CAP_EXCEPTION_PAYLOAD},
      {"SET_GUEST_DEBUG", KVM_CAP_SET_GUEST_DEBUG}, {"ADJUST_CLOCK", KVM_CAP_ADJUST_CLOCK},
      {"NR_VCPUS", KVM_CAP_NR_VCPUS},         {"MAX_VCPUS", KVM_CAP_MAX_VCPUS},
      {"NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS},   {"IOEVENTFD", KVM_CAP_IOEVENTFD},
  };
  printf("  \"caps\": {");
  for (size_t i = 0; i < sizeof(caps) / sizeof(caps[0]); i++)
    printf("%s\"%s\": %d", i ? ", " : "", caps[i].name, ioctl(vm.fd, KVM_CHECK_EXTENSION, caps[i].cap));
  printf("}\n}\n");
  return 0;
}
