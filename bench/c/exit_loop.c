/* exit_loop FILE.bin [seconds] [max_exits]
 *
 * The floor for "exit round trips per second": runs counter64 on one vCPU and
 * handles its exits in a tight loop as a VMM would (serial bytes appended to a
 * buffer, debug values kept, nothing printed) until `seconds` of wall time
 * (default 2) or `max_exits` exits (if given, > 0) have passed.
 * Prints {"exits":N,"seconds":S,"exits_per_second":R,...} on stdout. */
#include "kvm_min.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>

#define SERIAL_BUF (1u << 20) /* ring: keeps the last 1 MiB of console output */
#define CLOCK_EVERY 256       /* read the clock every N exits, not every exit */

int main(int argc, char **argv) {
  if (argc < 2 || argc > 4) {
    fprintf(stderr, "usage: %s counter64.bin [seconds] [max_exits]\n", argv[0]);
    return 1;
  }
  double seconds = argc > 2 ? atof(argv[2]) : 2.0;
  uint64_t max_exits = argc > 3 ? strtoull(argv[3], NULL, 0) : 0;

  struct kvm_vm vm;
  struct kvm_vcpu v;
  vm_create(&vm, GUEST_MEM_DEFAULT);
  guest_load(&vm, argv[1]);
  vcpu_create(&vm, &v, 0);
  vcpu_reset_realmode(&v);

  static uint8_t serial[SERIAL_BUF];
  uint64_t serial_len = 0, exits = 0, debug_count = 0;
  uint32_t last_debug = 0;

  double start = now_seconds(), end = start + seconds, now = start;
  for (;;) {
    if (ioctl(v.fd, KVM_RUN, 0) < 0) {
      if (errno == EINTR) continue;
      die("KVM_RUN");
    }
    exits++;
    struct kvm_run *r = v.run;
    if (r->exit_reason != KVM_EXIT_IO || r->io.direction != KVM_EXIT_IO_OUT) {
      fprintf(stderr, "unexpected exit %u (%s) after %" PRIu64 " exits\n", r->exit_reason,
              exit_reason_name(r->exit_reason), exits);
      return 2;
    }
    uint8_t *data = io_data(&v);
    if (r->io.port == PORT_SERIAL) {
      for (uint32_t k = 0; k < r->io.count; k++) serial[serial_len++ % SERIAL_BUF] = data[k];
    } else if (r->io.port == PORT_DEBUG && r->io.size == 4) {
      memcpy(&last_debug, data, 4);
      debug_count++;
    } else {
      fprintf(stderr, "unexpected OUT to port 0x%x\n", r->io.port);
      return 2;
    }
    if (max_exits && exits >= max_exits) break;
    if (!max_exits && exits % CLOCK_EVERY == 0 && (now = now_seconds()) >= end) break;
  }
  now = now_seconds();
  double elapsed = now - start;

  /* Sanity: the guest's memory mirror must match the last value it reported
   * (it reports after printing, so the mirror may be one ahead). */
  uint64_t mirror;
  memcpy(&mirror, vm.mem + 0x9000, 8);
  if (debug_count && !(mirror == last_debug || mirror == (uint64_t)last_debug + 1)) {
    fprintf(stderr, "counter mismatch: memory %" PRIu64 ", last debug %u\n", mirror, last_debug);
    return 3;
  }
  /* And the last complete console line must be that reported value too
   * (or the one before it if we stopped between printing and reporting). */
  uint64_t line = 0, scale = 1;
  uint64_t pos = serial_len;
  while (pos > 0 && serial[(pos - 1) % SERIAL_BUF] != '\n') pos--; /* drop partial line */
  if (pos > 0) pos--;                                                /* skip its '\n' */
  while (pos > 0 && serial[(pos - 1) % SERIAL_BUF] != '\n') {
    line += (serial[(pos - 1) % SERIAL_BUF] - '0') * scale;
    scale *= 10;
    pos--;
  }
  if (debug_count && !(line == last_debug || line == (uint64_t)last_debug + 1)) {
    fprintf(stderr, "console mismatch: last line %" PRIu64 ", last debug %u\n", line, last_debug);
    return 3;
  }
  printf("{\"exits\":%" PRIu64 ",\"seconds\":%.6f,\"exits_per_second\":%.0f,"
         "\"counter\":%" PRIu64 ",\"serial_bytes\":%" PRIu64 "}\n",
         exits, elapsed, exits / elapsed, mirror, serial_len);
  return 0;
}
