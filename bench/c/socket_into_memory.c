/* socket_into_memory BYTES [ROUNDS]
 *
 * What a unix socket between two processes costs when the receiver keeps the bytes, as a migration's
 * destination must: a forked sender writes BYTES (random, 1 MiB writes) and the receiver reads them
 *   - "reused":    into one 1 MiB buffer it reads over and over (what the Node floor's receiver does);
 *   - "fresh":     straight into place in a new anonymous mapping of BYTES (each page faulted in,
 *                  zeroed and charged by the read's copy);
 *   - "populated": the same, each 1 MiB first faulted in with one MADV_POPULATE_WRITE (as vcpud's
 *                  receiver does).
 * Each mode runs ROUNDS times (default 3), alternating; per mode the median round's MiB/s and the
 * CPU ms per GiB of each side (getrusage). Prints one JSON object.
 * Only libc. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (1u << 20)
#define MODES 3
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

static const char *const MODE_NAMES[MODES] = {"reused", "fresh", "populated"};

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static double cpu_ms(int who) {
  struct rusage u;
  getrusage(who, &u);
  return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1e3 + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e3;
}

static void die(const char *what) {
  fprintf(stderr, "socket_into_memory: %s: %s\n", what, strerror(errno));
  exit(1);
}

/* Reads exactly n bytes into p; 0 at the peer's end. */
static size_t read_full(int fd, uint8_t *p, size_t n) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, p + got, n - got);
    if (r == 0) break;
    if (r < 0) {
      if (errno == EINTR) continue;
      die("read");
    }
    got += (size_t)r;
  }
  return got;
}

/* The receiver's side of one round; returns its CPU ms (the sender is a child, reaped by the caller). */
static double receive(int fd, size_t bytes, int mode) {
  double c0 = cpu_ms(RUSAGE_SELF);
  uint8_t *dst = NULL;
  if (mode == 0) {
    dst = malloc(CHUNK);
    if (!dst) die("malloc");
    memset(dst, 1, CHUNK);
  } else {
    dst = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dst == MAP_FAILED) die("mmap");
  }
  size_t total = 0;
  for (;;) {
    uint8_t *at = mode == 0 ? dst : dst + total;
    size_t want = bytes - total < CHUNK ? bytes - total : CHUNK;
    if (want == 0) break;
    if (mode == 2) madvise(at, want, MADV_POPULATE_WRITE);
    size_t got = read_full(fd, at, want);
    total += got;
    if (got < want) break;
  }
  if (total != bytes) {
    fprintf(stderr, "socket_into_memory: received %zu of %zu bytes\n", total, bytes);
    exit(1);
  }
  double c = cpu_ms(RUSAGE_SELF) - c0;
  if (mode == 0)
    free(dst);
  else
    munmap(dst, bytes);
  return c;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: socket_into_memory BYTES [ROUNDS]\n");
    return 2;
  }
  size_t bytes = strtoull(argv[1], NULL, 0);
  int rounds = argc > 2 ? atoi(argv[2]) : 3;
  if (bytes == 0 || rounds < 1 || rounds > 50) {
    fprintf(stderr, "socket_into_memory: BYTES must be > 0 and ROUNDS 1..50\n");
    return 2;
  }
  uint8_t *src = malloc(CHUNK);
  if (!src) die("malloc");
  for (size_t i = 0; i < CHUNK; i++) src[i] = (uint8_t)rand();

  double rate[MODES][50], sendMs[MODES][50], recvMs[MODES][50];
  for (int r = 0; r < rounds; r++) {
    for (int m = 0; m < MODES; m++) {
      int sv[2];
      if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0) die("socketpair");
      int timing[2];
      if (pipe(timing) < 0) die("pipe");
      double t0 = now();
      pid_t pid = fork();
      if (pid < 0) die("fork");
      if (pid == 0) {
        close(sv[0]);
        close(timing[0]);
        for (size_t sent = 0; sent < bytes;) {
          size_t n = bytes - sent < CHUNK ? bytes - sent : CHUNK;
          ssize_t w = write(sv[1], src, n);
          if (w < 0) {
            if (errno == EINTR) continue;
            die("write");
          }
          sent += (size_t)w;
        }
        double c = cpu_ms(RUSAGE_SELF);
        if (write(timing[1], &c, sizeof c) != sizeof c) die("write timing");
        _exit(0);
      }
      close(sv[1]);
      close(timing[1]);
      double c = receive(sv[0], bytes, m);
      double elapsed = now() - t0;
      double senderCpu = 0;
      if (read(timing[0], &senderCpu, sizeof senderCpu) != sizeof senderCpu) die("read timing");
      waitpid(pid, NULL, 0);
      close(sv[0]);
      close(timing[0]);
      double perGiB = (double)(1ull << 30) / bytes;
      rate[m][r] = bytes / 1048576.0 / elapsed;
      sendMs[m][r] = senderCpu * perGiB;
      recvMs[m][r] = c * perGiB;
    }
  }
  printf("{");
  for (int m = 0; m < MODES; m++) {
    double med[3];
    double *cols[3] = {rate[m], sendMs[m], recvMs[m]};
    for (int k = 0; k < 3; k++) {
      qsort(cols[k], rounds, sizeof(double), cmp);
      med[k] = cols[k][rounds / 2];
    }
    printf("%s\"%s\":{\"mibs\":%.1f,\"sendMsPerGiB\":%.1f,\"receiveMsPerGiB\":%.1f}", m ? "," : "", MODE_NAMES[m], med[0], med[1], med[2]);
  }
  printf("}\n");
  return 0;
}
