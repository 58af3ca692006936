// A dedicated thread per vCPU looping on KVM_RUN. It handles the exits of the guest ABI
// (serial 0x3f8, debug ports 0x500/0x501, HLT) itself, so an exit round trip never touches JS,
// and reports console bytes, debug values and state changes to JS in coalesced batches.
//
// Pause protocol: set kvm_run.immediate_exit, signal the thread out of KVM_RUN, then run KVM_RUN
// once more with immediate_exit set so the kernel completes a pending PIO/MMIO exit before we
// stop. Only then is the vCPU paused: state read while paused is consistent.
//
// Throttle (live migration's auto-converge): with setThrottle(p) a ticker thread lets the vCPU run
// (100-p)% of each slice, then kicks it out of KVM_RUN (immediate_exit + signal, as a pause does)
// and the run thread sleeps the other p% before entering again. A pending I/O exit simply
// completes on the next KVM_RUN. A pause or destroy cuts the sleep short.
#pragma once
#include <linux/kvm.h>
#include <napi.h>
#include <pthread.h>

#include <array>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace vcpud {

enum class RunState { kCreated, kRunning, kPaused, kHalted, kStopped };

struct GuestEvent {
  enum Kind { kValue, kDone, kState } kind;
  uint64_t value;  // debug value or done code; for kState the new RunState
};

class VcpuRunner : public Napi::ObjectWrap<VcpuRunner> {
 public:
  static void Register(Napi::Env env, Napi::Object exports);
  // (vcpuFd, mmapSize, onEvent): onEvent() is called (coalesced) when drain() has something.
  explicit VcpuRunner(const Napi::CallbackInfo& info);
  ~VcpuRunner() override;

  // Blocks until the vCPU is out of KVM_RUN with pending I/O completed (runs off the JS thread).
  void PauseAndWait();

 private:
  Napi::Value Resume(const Napi::CallbackInfo& info);
  Napi::Value Pause(const Napi::CallbackInfo& info);  // Promise<void>
  Napi::Value Drain(const Napi::CallbackInfo& info);
  Napi::Value Status(const Napi::CallbackInfo& info);
  // The run state's name alone: what a state access checks on every call, without Status's object.
  Napi::Value State(const Napi::CallbackInfo& info);
  Napi::Value ExitCounts(const Napi::CallbackInfo& info);
  Napi::Value Destroy(const Napi::CallbackInfo& info);
  // CREATED -> PAUSED without running: a restored vCPU is a paused one, not a new one.
  Napi::Value MarkPaused(const Napi::CallbackInfo& info);
  // (percent 0..99, sliceMs = 10): 0 turns throttling off.
  Napi::Value SetThrottle(const Napi::CallbackInfo& info);
  void Ticker();
  // The run thread's share of a throttled slice: sleeps p% of it. Called with mu_ held.
  void ThrottleSleep(std::unique_lock<std::mutex>& lk);

  void Loop();
  // Each returns true when the vCPU keeps running after the exit. Called with mu_ held.
  bool HandleExit(std::unique_lock<std::mutex>& lk);
  bool HandleIo(std::unique_lock<std::mutex>& lk);
  void CompletePendingIo(std::unique_lock<std::mutex>& lk);
  void SetState(RunState s);
  void Stop(const std::string& reason, std::map<std::string, double> details);
  void Notify();
  void Shutdown();

  int fd_;
  size_t mmapSize_;
  kvm_run* run_ = nullptr;
  std::thread thread_;
  pthread_t tid_{};
  bool started_ = false;

  std::mutex mu_;
  std::condition_variable cv_;
  int roomWaiters_ = 0;  // vCPU threads waiting in HandleIo for console/event space (under mu_)
  RunState state_ = RunState::kCreated;
  bool pauseRequested_ = false;
  bool quit_ = false;
  bool inKvmRun_ = false;
  std::string reason_;
  std::map<std::string, double> details_;

  std::string console_;
  std::vector<GuestEvent> events_;
  std::array<uint64_t, 64> exits_{};
  bool notifyPending_ = false;

  int throttle_ = 0;           // percent of each slice the vCPU sleeps (under mu_)
  int sliceMs_ = 10;
  bool throttleDue_ = false;   // the ticker ended a run share: sleep before the next KVM_RUN
  double throttledMs_ = 0;     // total time slept for the throttle
  std::thread ticker_;
  Napi::ThreadSafeFunction tsfn_;
};

}  // namespace vcpud
