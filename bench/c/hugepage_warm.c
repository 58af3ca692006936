/* hugepage_warm PAGES
 *
 * Touches PAGES pages of the 2 MiB hugetlb pool once (MAP_HUGETLB, one write per page, unmapped
 * again), so a pool just reserved is backed before it is measured: on a host that reports free
 * memory to its hypervisor the first touch of a page costs what a 4 KiB page's does, per byte,
 * and later touches of pool pages (which never return to the buddy allocator) cost only the
 * kernel's zeroing. Prints {"pages": N, "ms": first-touch time}. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv) {
  long pages = argc > 1 ? atol(argv[1]) : 0;
  if (pages <= 0) {
    fprintf(stderr, "usage: hugepage_warm PAGES\n");
    return 2;
  }
  size_t len = (size_t)pages << 21;
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  volatile char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
  if (p == MAP_FAILED) {
    perror("mmap MAP_HUGETLB");
    return 1;
  }
  for (size_t off = 0; off < len; off += 2u << 20) p[off] = 1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  munmap((void *)p, len);
  printf("{\"pages\": %ld, \"ms\": %.1f}\n", pages, (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6);
  return 0;
}
