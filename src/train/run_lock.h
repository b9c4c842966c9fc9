// RunLock: one job per run folder. <run.dir>/LOCK records who holds the folder (host, pid, SLURM job
// id, start time) and a heartbeat that a thread refreshes; a second job finds it and refuses to
// start, naming the holder, so two jobs never write checkpoints and metrics into one folder. A lock
// whose holder is gone is taken over with a message: on the same host when its pid no longer runs,
// from another host when its heartbeat is older than `stale_after_s`.
#pragma once
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace sedd {

struct RunLockOptions {
  double heartbeat_s = 30;     // how often the holder rewrites its heartbeat
  double stale_after_s = 180;  // a lock from another host without a heartbeat this long is abandoned
  double wait_s = 10;          // how long to wait for a live holder on this host to exit before refusing
};

class RunLock {
 public:
  // Takes <dir>/LOCK or throws OptionError naming the holder. `note` gets a line when an abandoned
  // lock was taken over (else stays empty).
  RunLock(const std::string& dir, RunLockOptions options, std::string* note);
  ~RunLock();  // removes the lock (when it is still ours)
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;
  const std::string& path() const { return path_; }

 private:
  void heartbeat_loop();

  std::string path_, host_, job_, started_;
  long pid_ = 0;
  RunLockOptions options_;
  std::thread heartbeat_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
};

}  // namespace sedd
