#include "missing_page_fill.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "guest_memory.h"

namespace vcpud {

bool MissingPageFill::Begin(uint8_t* p, size_t len) {
  End();
  int fd = static_cast<int>(syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY));
  if (fd < 0) return false;  // no userfaultfd (kernel, seccomp, vm.unprivileged_userfaultfd)
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_SIGBUS;
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uintptr_t>(p);
  reg.range.len = len;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  if (ioctl(fd, UFFDIO_API, &api) != 0 || ioctl(fd, UFFDIO_REGISTER, &reg) != 0 || !(reg.ioctls & (1ull << _UFFDIO_COPY))) {
    close(fd);  // closing unregisters whatever was registered
    return false;
  }
  fd_ = fd;
  start_ = p;
  len_ = len;
  return true;
}

void MissingPageFill::Copy(uint8_t* dst, const uint8_t* src, size_t len) {
  while (len && fd_ >= 0) {
    uffdio_copy c{};
    c.dst = reinterpret_cast<uintptr_t>(dst);
    c.src = reinterpret_cast<uintptr_t>(src);
    c.len = len;
    int rc = ioctl(fd_, UFFDIO_COPY, &c);
    size_t done = c.copy > 0 ? static_cast<size_t>(c.copy) : 0;
    dst += done;
    src += done;
    len -= done;
    if (rc == 0 || len == 0) continue;
    if (errno == EAGAIN) continue;  // the mapping changed meanwhile: retried from where it stopped
    if (errno != EEXIST) {
      End();  // anything else: no more userfaultfd copies; the rest is copied as usual below
      break;
    }
    // The page at dst is present (written before, e.g. by an ancestor snapshot): written in place.
    memcpy(dst, src, kPageSize);
    dst += kPageSize;
    src += kPageSize;
    len -= kPageSize;
  }
  if (len) memcpy(dst, src, len);
}

void MissingPageFill::End() {
  if (fd_ < 0) return;
  uffdio_range r{};
  r.start = reinterpret_cast<uintptr_t>(start_);
  r.len = len_;
  ioctl(fd_, UFFDIO_UNREGISTER, &r);
  close(fd_);  // also unregisters, should the ioctl have failed
  fd_ = -1;
}

}  // namespace vcpud
