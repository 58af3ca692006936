#include "vcpu_runner.h"

#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "errors.h"
#include "ioctl_call.h"
#include "kvm_abi.h"

namespace vcpud {

namespace {

// Ports of the guest ABI (test/guests/README.md).
constexpr uint16_t kSerialBase = 0x3f8;
constexpr uint16_t kSerialLsr = 0x3fd;
constexpr uint8_t kLsrTransmitterEmpty = 0x60;  // THRE | TEMT: guests that poll may send
constexpr uint16_t kDebugValuePort = 0x500;
constexpr uint16_t kDebugDonePort = 0x501;
constexpr uint16_t kPostPort = 0x80;  // BIOS POST/delay writes: harmless

// Bounded buffers between the vCPU thread and JS. When full the vCPU waits (like a UART with
// flow control) instead of dropping output: nothing the guest prints is lost.
constexpr size_t kConsoleCap = 64 * 1024;
constexpr size_t kEventCap = 4096;

// A real-time signal Node and libuv do not use (SIGUSR1 starts Node's inspector). Its handler
// does nothing: delivery alone makes KVM_RUN return EINTR.
int KickSignal() { return SIGRTMIN + 2; }

void InstallKickHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa = {};
    sa.sa_handler = [](int) {};
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the ioctl must return
    sigaction(KickSignal(), &sa, nullptr);
  });
}

const char* StateName(RunState s) {
  switch (s) {
    case RunState::kCreated: return "created";
    case RunState::kRunning: return "running";
    case RunState::kPaused: return "paused";
    case RunState::kHalted: return "halted";
    case RunState::kStopped: return "stopped";
  }
  return "unknown";
}

uint64_t ReadLe(const uint8_t* p, size_t size) {
  uint64_t v = 0;
  memcpy(&v, p, std::min<size_t>(size, sizeof v));
  return v;
}

Napi::Object DetailsObject(Napi::Env env, const std::map<std::string, double>& details) {
  Napi::Object o = Napi::Object::New(env);
  for (const auto& [k, v] : details) o.Set(k, Napi::Number::New(env, v));
  return o;
}

class PauseWorker : public Napi::AsyncWorker {
 public:
  PauseWorker(Napi::Env env, VcpuRunner* runner, Napi::Object self)
      : Napi::AsyncWorker(env), runner_(runner), self_(Napi::Persistent(self)),
        deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override { runner_->PauseAndWait(); }
  void OnOK() override { deferred_.Resolve(Env().Undefined()); }

 private:
  VcpuRunner* runner_;
  Napi::ObjectReference self_;  // keeps the runner alive while the pause is in flight
  Napi::Promise::Deferred deferred_;
};

}  // namespace

void VcpuRunner::Register(Napi::Env env, Napi::Object exports) {
  Napi::Function f = DefineClass(env, "VcpuRunner",
                                 {InstanceMethod("resume", &VcpuRunner::Resume),
                                  InstanceMethod("pause", &VcpuRunner::Pause),
                                  InstanceMethod("drain", &VcpuRunner::Drain),
                                  InstanceMethod("status", &VcpuRunner::Status),
                                  InstanceMethod("state", &VcpuRunner::State),
                                  InstanceMethod("exitCounts", &VcpuRunner::ExitCounts),
                                  InstanceMethod("destroy", &VcpuRunner::Destroy),
                                  InstanceMethod("markPaused", &VcpuRunner::MarkPaused),
                                  InstanceMethod("setThrottle", &VcpuRunner::SetThrottle)});
  exports.Set("VcpuRunner", f);
}

VcpuRunner::VcpuRunner(const Napi::CallbackInfo& info) : Napi::ObjectWrap<VcpuRunner>(info) {
  Napi::Env env = info.Env();
  fd_ = FdArg(info, 0, "VcpuRunner");
  mmapSize_ = U64Arg(info, 1, "VcpuRunner", "mmapSize");
  if (!info[2].IsFunction()) throw Napi::TypeError::New(env, "VcpuRunner: onEvent must be a function");
  if (mmapSize_ < sizeof(kvm_run)) throw Napi::RangeError::New(env, "VcpuRunner: mmapSize smaller than kvm_run");
  void* p = mmap(nullptr, mmapSize_, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) throw MakeSysError(env, "mmap(kvm_run)", errno);
  run_ = static_cast<kvm_run*>(p);
  InstallKickHandler();
  tsfn_ = Napi::ThreadSafeFunction::New(env, info[2].As<Napi::Function>(), "vcpud.VcpuRunner", 0, 1);
  tsfn_.Unref(env);  // a paused VM must not keep the process alive
}

VcpuRunner::~VcpuRunner() { Shutdown(); }

void VcpuRunner::Shutdown() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (!run_) return;
    quit_ = true;
    run_->immediate_exit = 1;
    if (started_) pthread_kill(tid_, KickSignal());
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  if (ticker_.joinable()) ticker_.join();
  munmap(run_, mmapSize_);
  run_ = nullptr;
  tsfn_.Release();
}

Napi::Value VcpuRunner::Destroy(const Napi::CallbackInfo& info) {
  Shutdown();
  return info.Env().Undefined();
}

Napi::Value VcpuRunner::Resume(const Napi::CallbackInfo& info) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!run_) throw Napi::Error::New(info.Env(), "VcpuRunner.resume: runner destroyed");
  if (state_ == RunState::kRunning || pauseRequested_) return Napi::Boolean::New(info.Env(), false);
  run_->immediate_exit = 0;
  reason_.clear();
  details_.clear();
  SetState(RunState::kRunning);
  if (!started_) {
    started_ = true;
    thread_ = std::thread([this] { Loop(); });
    tid_ = thread_.native_handle();
  }
  return Napi::Boolean::New(info.Env(), true);
}

Napi::Value VcpuRunner::MarkPaused(const Napi::CallbackInfo& info) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!run_) throw Napi::Error::New(info.Env(), "VcpuRunner.markPaused: runner destroyed");
  if (state_ != RunState::kCreated) return Napi::Boolean::New(info.Env(), false);
  state_ = RunState::kPaused;  // no state event: nothing ran, nobody watches a VM this new
  return Napi::Boolean::New(info.Env(), true);
}

Napi::Value VcpuRunner::Pause(const Napi::CallbackInfo& info) {
  if (!run_) throw Napi::Error::New(info.Env(), "VcpuRunner.pause: runner destroyed");
  auto* w = new PauseWorker(info.Env(), this, info.This().As<Napi::Object>());
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

void VcpuRunner::PauseAndWait() {
  std::unique_lock<std::mutex> lk(mu_);
  if (state_ != RunState::kRunning || quit_) return;
  pauseRequested_ = true;
  run_->immediate_exit = 1;  // covers the window before the thread re-enters KVM_RUN
  pthread_kill(tid_, KickSignal());
  cv_.notify_all();  // wakes a thread waiting for console space
  cv_.wait(lk, [&] { return state_ != RunState::kRunning || quit_; });
}

void VcpuRunner::Loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return quit_ || state_ == RunState::kRunning; });
    if (quit_) return;
    if (pauseRequested_) {
      CompletePendingIo(lk);
      SetState(RunState::kPaused);
      continue;
    }
    if (throttleDue_) {
      ThrottleSleep(lk);
      continue;  // a pause or quit may have come during the sleep
    }
    inKvmRun_ = true;
    lk.unlock();
    int r = ioctl(fd_, KREQ(RUN), 0);
    int err = r < 0 ? errno : 0;
    lk.lock();
    inKvmRun_ = false;
    if (r < 0) {
      if (err == EINTR || err == EAGAIN) {
        exits_[KVM_EXIT_INTR]++;
        continue;
      }
      Stop("kvm_run_error", {{"errno", err}});
      continue;
    }
    exits_[std::min<uint32_t>(run_->exit_reason, exits_.size() - 1)]++;
    HandleExit(lk);
  }
}

Napi::Value VcpuRunner::SetThrottle(const Napi::CallbackInfo& info) {
  const char* op = "VcpuRunner.setThrottle";
  uint64_t percent = U64Arg(info, 0, op, "percent");
  uint64_t slice = info.Length() > 1 && !info[1].IsUndefined() ? U64Arg(info, 1, op, "sliceMs") : 10;
  if (percent > 99) throw Napi::RangeError::New(info.Env(), std::string(op) + ": percent must be 0..99");
  if (slice < 1 || slice > 1000) throw Napi::RangeError::New(info.Env(), std::string(op) + ": sliceMs must be 1..1000");
  std::unique_lock<std::mutex> lk(mu_);
  if (!run_) throw Napi::Error::New(info.Env(), std::string(op) + ": runner destroyed");
  throttle_ = static_cast<int>(percent);
  sliceMs_ = static_cast<int>(slice);
  if (throttle_ && !ticker_.joinable()) ticker_ = std::thread([this] { Ticker(); });
  cv_.notify_all();
  return info.Env().Undefined();
}

void VcpuRunner::Ticker() {
  using std::chrono::microseconds;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return quit_ || (throttle_ && state_ == RunState::kRunning && !throttleDue_); });
    if (quit_) return;
    microseconds run(sliceMs_ * 10 * (100 - throttle_));
    int was = throttle_;
    // The run share: cut short when the throttle changes or the vCPU stops running.
    if (cv_.wait_for(lk, run, [&] { return quit_ || throttle_ != was || state_ != RunState::kRunning; })) continue;
    throttleDue_ = true;
    run_->immediate_exit = 1;  // covers the window before the thread re-enters KVM_RUN
    if (inKvmRun_) pthread_kill(tid_, KickSignal());
    cv_.wait(lk, [&] { return quit_ || !throttleDue_; });
  }
}

void VcpuRunner::ThrottleSleep(std::unique_lock<std::mutex>& lk) {
  auto start = std::chrono::steady_clock::now();
  run_->immediate_exit = 0;  // pauseRequested_ is false here (checked first); a pause sets it again
  std::chrono::microseconds sleep(sliceMs_ * 10 * throttle_);
  cv_.wait_for(lk, sleep, [&] { return quit_ || pauseRequested_ || throttle_ == 0; });
  throttledMs_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  throttleDue_ = false;
  cv_.notify_all();  // the ticker starts the next slice
}

void VcpuRunner::CompletePendingIo(std::unique_lock<std::mutex>& lk) {
  run_->immediate_exit = 1;
  lk.unlock();
  ioctl(fd_, KREQ(RUN), 0);  // returns EINTR once the kernel has finished the pending exit
  lk.lock();
  run_->immediate_exit = 0;
}

bool VcpuRunner::HandleExit(std::unique_lock<std::mutex>& lk) {
  switch (run_->exit_reason) {
    case KVM_EXIT_IO:
      return HandleIo(lk);
    case KVM_EXIT_INTR:
      return true;
    case KVM_EXIT_HLT:
      SetState(RunState::kHalted);
      return false;
    case KVM_EXIT_MMIO:
      Stop("mmio", {{"physAddr", static_cast<double>(run_->mmio.phys_addr)},
                    {"len", run_->mmio.len},
                    {"isWrite", run_->mmio.is_write},
                    {"data", static_cast<double>(ReadLe(run_->mmio.data, run_->mmio.len))}});
      return false;
    case KVM_EXIT_SHUTDOWN:
      Stop("shutdown", {});
      return false;
    case KVM_EXIT_FAIL_ENTRY:
      Stop("fail_entry",
           {{"hardwareEntryFailureReason", static_cast<double>(run_->fail_entry.hardware_entry_failure_reason)},
            {"cpu", run_->fail_entry.cpu}});
      return false;
    case KVM_EXIT_INTERNAL_ERROR: {
      std::map<std::string, double> d{{"suberror", run_->internal.suberror}, {"ndata", run_->internal.ndata}};
      for (uint32_t i = 0; i < std::min<uint32_t>(run_->internal.ndata, 4); i++)
        d["data" + std::to_string(i)] = static_cast<double>(run_->internal.data[i]);
      Stop("internal_error", d);
      return false;
    }
    case KVM_EXIT_SYSTEM_EVENT:
      Stop("system_event", {{"type", run_->system_event.type}});
      return false;
    default:
      Stop("unhandled_exit", {{"exitReason", run_->exit_reason}});
      return false;
  }
}

bool VcpuRunner::HandleIo(std::unique_lock<std::mutex>& lk) {
  const auto& io = run_->io;
  uint8_t* data = reinterpret_cast<uint8_t*>(run_) + io.data_offset;
  bool out = io.direction == KVM_EXIT_IO_OUT;
  auto waitFor = [&](auto hasRoom) {
    roomWaiters_++;
    cv_.wait(lk, [&] { return hasRoom() || pauseRequested_ || quit_; });
    roomWaiters_--;
  };
  if (io.port >= kSerialBase && io.port < kSerialBase + 8) {
    if (!out) {
      memset(data, io.port == kSerialLsr ? kLsrTransmitterEmpty : 0, size_t(io.size) * io.count);
    } else if (io.port == kSerialBase) {
      waitFor([&] { return console_.size() < kConsoleCap; });
      for (uint32_t i = 0; i < io.count; i++) console_.push_back(static_cast<char>(data[i * io.size]));
      Notify();
    }
    return true;
  }
  if (out && (io.port == kDebugValuePort || io.port == kDebugDonePort)) {
    waitFor([&] { return events_.size() < kEventCap; });
    bool done = io.port == kDebugDonePort;
    for (uint32_t i = 0; i < io.count; i++)
      events_.push_back({done ? GuestEvent::kDone : GuestEvent::kValue, ReadLe(data + i * io.size, io.size)});
    if (!done) {
      Notify();
      return true;
    }
    // Read the code before completing: CompletePendingIo drops the lock, and JS may drain events_.
    double code = static_cast<double>(ReadLe(data + (io.count - 1) * io.size, io.size));
    CompletePendingIo(lk);  // the OUT retires, so a later resume continues after it
    Stop("done", {{"value", code}});
    return false;
  }
  if (out && io.port == kPostPort) return true;
  Stop("unhandled_io", {{"port", io.port}, {"direction", io.direction}, {"size", io.size}, {"count", io.count}});
  return false;
}

void VcpuRunner::SetState(RunState s) {
  state_ = s;
  if (s != RunState::kRunning) pauseRequested_ = false;
  events_.push_back({GuestEvent::kState, static_cast<uint64_t>(s)});
  Notify();
  cv_.notify_all();
}

void VcpuRunner::Stop(const std::string& reason, std::map<std::string, double> details) {
  reason_ = reason;
  details_ = std::move(details);
  SetState(RunState::kStopped);
}

void VcpuRunner::Notify() {
  if (notifyPending_ || !run_) return;
  notifyPending_ = true;
  // A call still queued when the environment shuts down (a VM destroyed just before exit) cannot
  // reach JS; its exception must not escape into the libuv callback (std::terminate).
  tsfn_.NonBlockingCall([](Napi::Env, Napi::Function fn) {
    try {
      fn.Call({});
    } catch (const Napi::Error&) {
    }
  });
}

Napi::Value VcpuRunner::Drain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string console;
  std::vector<GuestEvent> events;
  {
    std::unique_lock<std::mutex> lk(mu_);
    notifyPending_ = false;
    console.swap(console_);
    events.swap(events_);
    // Room again for a vCPU waiting on a full buffer. Only then: waking the (paused) vCPU thread on every
    // drain made it take mu_ right after we dropped it, and the next Status() of a GetState waited for a
    // thread the scheduler had preempted while holding it (~100 us per call on a busy 2-core host).
    if (roomWaiters_) cv_.notify_all();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("console", Napi::Buffer<char>::Copy(env, console.data(), console.size()));
  Napi::Array arr = Napi::Array::New(env, events.size());
  static const char* kinds[] = {"value", "done", "state"};
  for (size_t i = 0; i < events.size(); i++) {
    Napi::Object e = Napi::Object::New(env);
    e.Set("kind", kinds[events[i].kind]);
    if (events[i].kind == GuestEvent::kState)
      e.Set("state", StateName(static_cast<RunState>(events[i].value)));
    else
      e.Set("value", Napi::Number::New(env, static_cast<double>(events[i].value)));
    arr.Set(i, e);
  }
  o.Set("events", arr);
  return o;
}

Napi::Value VcpuRunner::Status(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::unique_lock<std::mutex> lk(mu_);
  Napi::Object o = Napi::Object::New(env);
  o.Set("state", StateName(state_));
  if (!reason_.empty()) o.Set("reason", reason_);
  o.Set("details", DetailsObject(env, details_));
  o.Set("throttle", Napi::Number::New(env, throttle_));
  o.Set("throttledMs", Napi::Number::New(env, throttledMs_));
  return o;
}

Napi::Value VcpuRunner::State(const Napi::CallbackInfo& info) {
  std::unique_lock<std::mutex> lk(mu_);
  return Napi::String::New(info.Env(), StateName(state_));
}

Napi::Value VcpuRunner::ExitCounts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::unique_lock<std::mutex> lk(mu_);
  Napi::Object o = Napi::Object::New(env);
  for (size_t i = 0; i < exits_.size(); i++)
    if (exits_[i]) o.Set(std::to_string(i), Napi::Number::New(env, static_cast<double>(exits_[i])));
  return o;
}

}  // namespace vcpud
