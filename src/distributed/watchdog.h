// Watchdog: a background thread that ends the job when a collective makes no progress.
//
// Collectives register while they are in flight (blocking MPI calls for their duration, NCCL work
// until its CUDA event completes). Every `poll_s` the thread checks them; one in flight for longer
// than the timeout, or an NCCL communicator reporting an asynchronous error, makes it print one line
// naming the rank, the host, the collective and its bucket, run the abort hooks (ncclCommAbort), and
// end the job (MPI_Abort where MPI allows calls from this thread, else the process exits, which
// makes mpirun/srun end the others). It runs on its own thread, so a rank blocked inside a
// collective is still caught. The hooks and MPI_Abort may block themselves (ncclCommAbort behind a
// stuck stream), so a hard deadline is armed before them: the process exits when it passes.
#pragma once
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace sedd {

class Watchdog {
 public:
  // timeout_s <= 0 disables the timeout (asynchronous errors are still acted on). Once it fires,
  // the process exits (code 124) at the latest `abort_deadline_s` later.
  Watchdog(double timeout_s, int rank, std::string host, double poll_s = 0.25, double abort_deadline_s = 10);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // An entry while it lives: `done` (optional, called from the watchdog thread) reports completion
  // of asynchronous work; without it the entry counts as in flight until destroyed.
  class Watch {
   public:
    Watch() = default;
    Watch(Watchdog* dog, uint64_t id) : dog_(dog), id_(id) {}
    Watch(Watch&& o) noexcept : dog_(o.dog_), id_(o.id_) { o.dog_ = nullptr; }
    Watch& operator=(Watch&& o) noexcept;
    Watch(const Watch&) = delete;
    ~Watch() { release(); }
    void release();

   private:
    Watchdog* dog_ = nullptr;
    uint64_t id_ = 0;
  };
  Watch watch(std::string what, std::function<bool()> done = {});
  // Asynchronous work that the caller does not wait for: watched until `done` returns true
  // (then dropped, with whatever the function holds).
  void track(std::string what, std::function<bool()> done);

  // Checked every poll: a non-empty result is an asynchronous failure (e.g. ncclCommGetAsyncError).
  void add_error_check(std::function<std::string()> check);
  // Run before the job is ended (e.g. ncclCommAbort), in order.
  void add_abort_hook(std::function<void()> hook);
  double timeout_s() const { return timeout_s_; }

 private:
  struct Entry {
    std::string what;
    std::chrono::steady_clock::time_point start;
    std::function<bool()> done;
  };
  void loop();
  [[noreturn]] void fire(const std::string& reason);

  double timeout_s_, poll_s_, abort_deadline_s_;
  int rank_;
  std::string host_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t next_id_ = 1;
  std::map<uint64_t, Entry> entries_;
  std::vector<std::function<std::string()>> error_checks_;
  std::vector<std::function<void()>> abort_hooks_;
  std::thread thread_;
};

}  // namespace sedd
