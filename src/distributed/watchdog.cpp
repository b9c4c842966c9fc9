// Watchdog; see watchdog.h.
#include "distributed/watchdog.h"

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <fmt/format.h>

namespace sedd {

Watchdog::Watchdog(double timeout_s, int rank, std::string host, double poll_s, double abort_deadline_s)
    : timeout_s_(timeout_s), poll_s_(poll_s), abort_deadline_s_(abort_deadline_s), rank_(rank), host_(std::move(host)) {
  thread_ = std::thread([this] { loop(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

Watchdog::Watch& Watchdog::Watch::operator=(Watch&& o) noexcept {
  release();
  dog_ = o.dog_;
  id_ = o.id_;
  o.dog_ = nullptr;
  return *this;
}

void Watchdog::Watch::release() {
  if (!dog_) return;
  std::lock_guard<std::mutex> lock(dog_->mu_);
  dog_->entries_.erase(id_);
  dog_ = nullptr;
}

Watchdog::Watch Watchdog::watch(std::string what, std::function<bool()> done) {
  std::lock_guard<std::mutex> lock(mu_);
  uint64_t id = next_id_++;
  entries_[id] = Entry{std::move(what), std::chrono::steady_clock::now(), std::move(done)};
  return Watch(this, id);
}

void Watchdog::track(std::string what, std::function<bool()> done) {
  std::lock_guard<std::mutex> lock(mu_);
  entries_[next_id_++] = Entry{std::move(what), std::chrono::steady_clock::now(), std::move(done)};
}

void Watchdog::add_error_check(std::function<std::string()> check) {
  std::lock_guard<std::mutex> lock(mu_);
  error_checks_.push_back(std::move(check));
}

void Watchdog::add_abort_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  abort_hooks_.push_back(std::move(hook));
}

void Watchdog::loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, std::chrono::duration<double>(poll_s_));
    if (stop_) break;
    for (auto& check : error_checks_) {
      std::string err = check();
      if (!err.empty()) fire(err);
    }
    auto now = std::chrono::steady_clock::now();
    for (auto it = entries_.begin(); it != entries_.end();) {
      Entry& e = it->second;
      if (e.done && e.done()) {  // asynchronous work finished: nothing more to watch
        it = entries_.erase(it);
        continue;
      }
      double waited = std::chrono::duration<double>(now - e.start).count();
      if (timeout_s_ > 0 && waited > timeout_s_)
        fire(fmt::format("collective '{}' made no progress for {:.0f} s (dist.timeout_s = {:g}): a peer rank is "
                         "hung, dead or much slower",
                         e.what, waited, timeout_s_));
      ++it;
    }
  }
}

void Watchdog::fire(const std::string& reason) {
  std::fprintf(stderr, "[rank %d on %s] watchdog: %s; aborting the job\n", rank_, host_.c_str(), reason.c_str());
  std::fflush(stderr);
  // A detached thread ends the process if the hooks or MPI_Abort hang (ncclCommAbort can wait
  // for a stream that never drains): the job must end, not hang a second time.
  std::thread([rank = rank_, host = host_, deadline = abort_deadline_s_] {
    std::this_thread::sleep_for(std::chrono::duration<double>(deadline));
    std::fprintf(stderr, "[rank %d on %s] watchdog: aborting did not finish within %g s; exiting\n", rank,
                 host.c_str(), deadline);
    std::fflush(stderr);
    std::_Exit(124);
  }).detach();
  for (auto& hook : abort_hooks_) hook();
  int level = 0, initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Query_thread(&level);
  // MPI_Abort from this thread is allowed only with MPI_THREAD_MULTIPLE; otherwise exiting
  // without MPI_Finalize makes mpirun (or srun --kill-on-bad-exit) end every other rank.
  if (level == MPI_THREAD_MULTIPLE) MPI_Abort(MPI_COMM_WORLD, 124);
  std::_Exit(124);
}

}  // namespace sedd
