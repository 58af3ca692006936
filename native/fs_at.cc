// File operations relative to directory fds (openat2, openat, mkdirat, unlinkat, renameat, linkat,
// fstat, fstatat, readdir of an fd): one thin function per system call, errno preserved, no policy.
// Each returns a Promise and runs on the libuv pool: any of them can block on a slow filesystem.
// The confinement policy (which flags, what is refused) is src/vm/snapshot-store.ts's.
#include "fs_at.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "errors.h"

namespace vcpud {
namespace {

// A directory fd argument: a non-negative fd or AT_FDCWD.
int DirFdArg(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (!info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": fd must be a number");
  int fd = info[i].As<Napi::Number>().Int32Value();
  if (fd < 0 && fd != AT_FDCWD) throw Napi::RangeError::New(info.Env(), std::string(op) + ": fd " + std::to_string(fd) + " is closed");
  return fd;
}

std::string StringArg(const Napi::CallbackInfo& info, size_t i, const char* op, const char* what) {
  if (!info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": " + what + " must be a string");
  std::string s = info[i].As<Napi::String>().Utf8Value();
  if (s.find('\0') != std::string::npos) throw Napi::TypeError::New(info.Env(), std::string(op) + ": " + what + " contains a NUL");
  return s;
}

int64_t IntArg(const Napi::CallbackInfo& info, size_t i, const char* op, const char* what) {
  if (!info[i].IsNumber()) throw Napi::TypeError::New(info.Env(), std::string(op) + ": " + what + " must be a number");
  return info[i].As<Napi::Number>().Int64Value();
}

Napi::Object StatToJs(Napi::Env env, const struct stat& st) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("mode", Napi::Number::New(env, st.st_mode));
  o.Set("size", Napi::Number::New(env, static_cast<double>(st.st_size)));
  o.Set("mtimeMs", Napi::Number::New(env, st.st_mtim.tv_sec * 1e3 + st.st_mtim.tv_nsec / 1e6));
  o.Set("uid", Napi::Number::New(env, st.st_uid));
  o.Set("ino", Napi::Number::New(env, static_cast<double>(st.st_ino)));
  o.Set("dev", Napi::Number::New(env, static_cast<double>(st.st_dev)));
  return o;
}

// One system call on the pool: `work` returns its result (ret < 0 with errno captured as err),
// `result` turns a success into the JS value.
class FsWorker : public Napi::AsyncWorker {
 public:
  FsWorker(Napi::Env env, const char* op, std::function<SysResult()> work, std::function<Napi::Value(Napi::Env, long)> result)
      : Napi::AsyncWorker(env), op_(op), work_(std::move(work)), result_(std::move(result)), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { r_ = work_(); }
  void OnOK() override {
    Napi::Env env = Env();
    if (r_.ret < 0) {
      deferred_.Reject(MakeSysError(env, op_, r_.err).Value());
      return;
    }
    deferred_.Resolve(result_(env, r_.ret));
  }

 private:
  const char* op_;
  std::function<SysResult()> work_;
  std::function<Napi::Value(Napi::Env, long)> result_;
  SysResult r_;
  Napi::Promise::Deferred deferred_;
};

Napi::Value Queue(Napi::Env env, const char* op, std::function<SysResult()> work, std::function<Napi::Value(Napi::Env, long)> result) {
  auto* w = new FsWorker(env, op, std::move(work), std::move(result));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

SysResult Checked(long ret) {
  SysResult r;
  r.ret = ret;
  if (ret < 0) r.err = errno;
  return r;
}

Napi::Value AsNumber(Napi::Env env, long ret) { return Napi::Number::New(env, static_cast<double>(ret)); }
Napi::Value AsUndefined(Napi::Env env, long) { return env.Undefined(); }

// openat2(dirfd, path, flags, mode, resolve) -> fd. ENOSYS on kernels before 5.6.
Napi::Value Openat2(const Napi::CallbackInfo& info) {
  int dirfd = DirFdArg(info, 0, "openat2");
  std::string p = StringArg(info, 1, "openat2", "path");
  open_how how{};
  how.flags = static_cast<uint64_t>(IntArg(info, 2, "openat2", "flags")) | O_CLOEXEC;
  how.mode = static_cast<uint64_t>(IntArg(info, 3, "openat2", "mode"));
  how.resolve = static_cast<uint64_t>(IntArg(info, 4, "openat2", "resolve"));
  return Queue(info.Env(), "openat2", [=] { return Checked(syscall(SYS_openat2, dirfd, p.c_str(), &how, sizeof how)); }, AsNumber);
}

// openat(dirfd, path, flags, mode) -> fd.
Napi::Value Openat(const Napi::CallbackInfo& info) {
  int dirfd = DirFdArg(info, 0, "openat");
  std::string p = StringArg(info, 1, "openat", "path");
  int flags = static_cast<int>(IntArg(info, 2, "openat", "flags")) | O_CLOEXEC;
  mode_t mode = static_cast<mode_t>(IntArg(info, 3, "openat", "mode"));
  return Queue(info.Env(), "openat", [=] { return Checked(openat(dirfd, p.c_str(), flags, mode)); }, AsNumber);
}

// mkdirat(dirfd, name, mode).
Napi::Value Mkdirat(const Napi::CallbackInfo& info) {
  int dirfd = DirFdArg(info, 0, "mkdirat");
  std::string p = StringArg(info, 1, "mkdirat", "name");
  mode_t mode = static_cast<mode_t>(IntArg(info, 2, "mkdirat", "mode"));
  return Queue(info.Env(), "mkdirat", [=] { return Checked(mkdirat(dirfd, p.c_str(), mode)); }, AsUndefined);
}

// unlinkat(dirfd, name, flags).
Napi::Value Unlinkat(const Napi::CallbackInfo& info) {
  int dirfd = DirFdArg(info, 0, "unlinkat");
  std::string p = StringArg(info, 1, "unlinkat", "name");
  int flags = static_cast<int>(IntArg(info, 2, "unlinkat", "flags"));
  return Queue(info.Env(), "unlinkat", [=] { return Checked(unlinkat(dirfd, p.c_str(), flags)); }, AsUndefined);
}

// renameat(olddirfd, oldname, newdirfd, newname).
Napi::Value Renameat(const Napi::CallbackInfo& info) {
  int from = DirFdArg(info, 0, "renameat");
  std::string a = StringArg(info, 1, "renameat", "old name");
  int to = DirFdArg(info, 2, "renameat");
  std::string b = StringArg(info, 3, "renameat", "new name");
  return Queue(info.Env(), "renameat", [=] { return Checked(renameat(from, a.c_str(), to, b.c_str())); }, AsUndefined);
}

// linkat(olddirfd, oldname, newdirfd, newname, flags).
Napi::Value Linkat(const Napi::CallbackInfo& info) {
  int from = DirFdArg(info, 0, "linkat");
  std::string a = StringArg(info, 1, "linkat", "old name");
  int to = DirFdArg(info, 2, "linkat");
  std::string b = StringArg(info, 3, "linkat", "new name");
  int flags = static_cast<int>(IntArg(info, 4, "linkat", "flags"));
  return Queue(info.Env(), "linkat", [=] { return Checked(linkat(from, a.c_str(), to, b.c_str(), flags)); }, AsUndefined);
}

// fstatat(dirfd, name, flags) -> { mode, size, mtimeMs, uid, ino, dev }; fstat(fd) is fstatat(fd, "", AT_EMPTY_PATH).
Napi::Value Fstatat(const Napi::CallbackInfo& info) {
  int dirfd = DirFdArg(info, 0, "fstatat");
  std::string p = StringArg(info, 1, "fstatat", "name");
  int flags = static_cast<int>(IntArg(info, 2, "fstatat", "flags"));
  auto st = std::make_shared<struct stat>();
  return Queue(info.Env(), "fstatat", [=] { return Checked(fstatat(dirfd, p.c_str(), st.get(), flags)); },
               [st](Napi::Env env, long) -> Napi::Value { return StatToJs(env, *st); });
}

// readdir(fd) -> { names: string[], types: Uint8Array (d_type, DT_UNKNOWN where the filesystem gives none) },
// "." and ".." left out. Reads from the start through a duplicate, so `fd` stays the caller's.
Napi::Value Readdir(const Napi::CallbackInfo& info) {
  int fd = DirFdArg(info, 0, "readdir");
  struct Entries {
    std::vector<std::string> names;
    std::vector<uint8_t> types;
  };
  auto out = std::make_shared<Entries>();
  return Queue(
      info.Env(), "readdir",
      [=] {
        SysResult r;
        int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (dup < 0) return Checked(-1);
        DIR* d = fdopendir(dup);
        if (!d) {
          r = Checked(-1);
          close(dup);
          return r;
        }
        rewinddir(d);
        for (;;) {
          errno = 0;
          struct dirent* e = readdir(d);
          if (!e) {
            if (errno) r = Checked(-1);
            break;
          }
          if (e->d_name[0] == '.' && (e->d_name[1] == 0 || (e->d_name[1] == '.' && e->d_name[2] == 0))) continue;
          out->names.emplace_back(e->d_name);
          out->types.push_back(e->d_type);
        }
        closedir(d);
        return r;
      },
      [out](Napi::Env env, long) -> Napi::Value {
        Napi::Array names = Napi::Array::New(env, out->names.size());
        for (size_t i = 0; i < out->names.size(); i++) names.Set(static_cast<uint32_t>(i), Napi::String::New(env, out->names[i]));
        Napi::Uint8Array types = Napi::Uint8Array::New(env, out->types.size());
        std::copy(out->types.begin(), out->types.end(), types.Data());
        Napi::Object o = Napi::Object::New(env);
        o.Set("names", names);
        o.Set("types", types);
        return o;
      });
}

// clearNonblock(fd): drops O_NONBLOCK from an open file (two fcntls; never blocks, so synchronous).
Napi::Value ClearNonblock(const Napi::CallbackInfo& info) {
  int fd = DirFdArg(info, 0, "clearNonblock");
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) < 0) throw MakeSysError(info.Env(), "fcntl", errno);
  return info.Env().Undefined();
}

// lockExclusive(fd): flock(fd, LOCK_EX | LOCK_NB): never blocks (EWOULDBLOCK when another open file
// description holds it), so synchronous. The lock goes with the last descriptor, also at a crash.
Napi::Value LockExclusive(const Napi::CallbackInfo& info) {
  int fd = DirFdArg(info, 0, "lockExclusive");
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) throw MakeSysError(info.Env(), "flock", errno);
  return info.Env().Undefined();
}

Napi::Object Constants(Napi::Env env) {
  Napi::Object c = Napi::Object::New(env);
#define VCPUD_CONST(N) c.Set(#N, Napi::Number::New(env, N))
  VCPUD_CONST(AT_FDCWD);
  VCPUD_CONST(AT_EMPTY_PATH);
  VCPUD_CONST(AT_SYMLINK_NOFOLLOW);
  VCPUD_CONST(AT_REMOVEDIR);
  VCPUD_CONST(O_RDONLY);
  VCPUD_CONST(O_WRONLY);
  VCPUD_CONST(O_CREAT);
  VCPUD_CONST(O_EXCL);
  VCPUD_CONST(O_NOFOLLOW);
  VCPUD_CONST(O_DIRECTORY);
  VCPUD_CONST(O_NONBLOCK);
  VCPUD_CONST(O_PATH);
  VCPUD_CONST(RESOLVE_BENEATH);
  VCPUD_CONST(RESOLVE_NO_SYMLINKS);
  VCPUD_CONST(RESOLVE_NO_MAGICLINKS);
  VCPUD_CONST(RESOLVE_NO_XDEV);
  VCPUD_CONST(S_IFMT);
  VCPUD_CONST(S_IFREG);
  VCPUD_CONST(S_IFDIR);
  VCPUD_CONST(S_IFLNK);
  VCPUD_CONST(DT_UNKNOWN);
  VCPUD_CONST(DT_REG);
  VCPUD_CONST(DT_DIR);
  VCPUD_CONST(DT_LNK);
#undef VCPUD_CONST
  return c;
}

}  // namespace

void RegisterFsAt(Napi::Env env, Napi::Object exports) {
  Napi::Object fs = Napi::Object::New(env);
  fs.Set("openat2", Napi::Function::New(env, Openat2, "openat2"));
  fs.Set("openat", Napi::Function::New(env, Openat, "openat"));
  fs.Set("mkdirat", Napi::Function::New(env, Mkdirat, "mkdirat"));
  fs.Set("unlinkat", Napi::Function::New(env, Unlinkat, "unlinkat"));
  fs.Set("renameat", Napi::Function::New(env, Renameat, "renameat"));
  fs.Set("linkat", Napi::Function::New(env, Linkat, "linkat"));
  fs.Set("fstatat", Napi::Function::New(env, Fstatat, "fstatat"));
  fs.Set("readdir", Napi::Function::New(env, Readdir, "readdir"));
  fs.Set("clearNonblock", Napi::Function::New(env, ClearNonblock, "clearNonblock"));
  fs.Set("lockExclusive", Napi::Function::New(env, LockExclusive, "lockExclusive"));
  fs.Set("constants", Constants(env));
  exports.Set("fsAt", fs);
}

}  // namespace vcpud
