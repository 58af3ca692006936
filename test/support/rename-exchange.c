// Swaps two paths with renameat2(RENAME_EXCHANGE) in a loop for a bounded time: the adversary of
// the snapshot-directory confinement tests. Usage: rename-exchange A B SECONDS; prints the swap count.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  double seconds = atof(argv[3]);
  long swaps = 0;
  for (;;) {
    for (int i = 0; i < 1000; i++) {
      if (renameat2(AT_FDCWD, argv[1], AT_FDCWD, argv[2], RENAME_EXCHANGE) != 0) {
        perror("renameat2");
        return 1;
      }
      swaps++;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    if ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 >= seconds) break;
  }
  printf("%ld\n", swaps);
  return 0;
}
