// RunLock; see run_lock.h.
#include "train/run_lock.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <chrono>
#include <cstdlib>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/fs.h"

namespace sedd {

namespace {

double seconds_since_epoch() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string lock_started_utc() {
  std::time_t t = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&t, &utc);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &utc);
  return buf;
}

std::string lock_host_name() {
  char name[256] = {0};
  gethostname(name, sizeof name - 1);
  return name;
}

// A process that runs: it exists and is not a zombie (killed, not yet reaped by its parent).
bool process_running(long pid) {
  if (pid <= 0) return false;
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return true;  // no /proc: trust kill()
  const size_t close = line.rfind(')');  // "pid (comm) state ..."; comm may hold spaces
  return close == std::string::npos || close + 2 >= line.size() ||
         (line[close + 2] != 'Z' && line[close + 2] != 'X');
}

std::string describe_holder(const nlohmann::json& holder) {
  std::string job = holder.value("job", std::string());
  return fmt::format("host {}, pid {}{}, started {}", holder.value("host", std::string("?")), holder.value("pid", 0L),
                     job.empty() ? "" : ", SLURM job " + job, holder.value("started", std::string("?")));
}

}  // namespace

RunLock::RunLock(const std::string& dir, RunLockOptions options, std::string* note)
    : path_(dir + "/LOCK"), host_(lock_host_name()), pid_(static_cast<long>(getpid())), started_(lock_started_utc()),
      options_(options) {
  if (const char* job = std::getenv("SLURM_JOB_ID")) job_ = job;
  std::filesystem::create_directories(dir);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::duration<double>(options_.wait_s);
  for (int attempt = 0;; ++attempt) {
    const std::string tmp = fs::temp_name(path_);
    {
      std::ofstream out(tmp);
      out << nlohmann::json{{"host", host_}, {"pid", pid_}, {"job", job_}, {"started", started_}, {"heartbeat", seconds_since_epoch()}}
                 .dump()
          << "\n";
      SEDD_CHECK(out.good(), "{}: cannot write the run folder's lock", tmp);
    }
    // link(2) creates the name only when it does not exist: the lock appears whole or not at all.
    const int rc = link(tmp.c_str(), path_.c_str());
    const int err = errno;
    std::filesystem::remove(tmp);
    if (rc == 0) break;
    SEDD_CHECK(err == EEXIST, "{}: cannot create the run folder's lock: {}", path_, std::strerror(err));
    SEDD_CHECK(attempt < 3, "{}: the lock changed hands while it was being taken; try again", path_);

    nlohmann::json holder;
    std::string why;
    try {
      holder = nlohmann::json::parse(fs::read_text(path_));
    } catch (const std::exception&) {
      why = "it cannot be read";
    }
    if (why.empty()) {
      const std::string host = holder.value("host", std::string());
      const long pid = holder.value("pid", 0L);
      const double age = seconds_since_epoch() - holder.value("heartbeat", 0.0);
      if (host == host_) {
        if (!process_running(pid)) {
          why = fmt::format("its pid {} is gone", pid);
        } else if (std::chrono::steady_clock::now() < give_up) {
          // A job killed a moment ago may still be exiting: give it a few seconds before refusing.
          std::this_thread::sleep_for(std::chrono::milliseconds(200));
          --attempt;
          continue;
        }
      } else if (age > options_.stale_after_s) {
        why = fmt::format("its heartbeat stopped {:.0f} s ago", age);
      }
      if (why.empty())
        throw OptionError(fmt::format(
            "{}: this run folder is in use by another job ({}; heartbeat {:.0f} s ago). Two jobs in one run "
            "folder would overwrite each other's checkpoints and metrics: wait for it to end, use another "
            "run.dir, or remove {} if that job is gone (a lock from another host is taken over after {:.0f} s "
            "without a heartbeat)",
            dir, describe_holder(holder), age, path_, options_.stale_after_s));
    }
    // Abandoned: move it aside (only one contender's rename succeeds), then try again.
    const std::string aside = path_ + ".abandoned";
    if (std::rename(path_.c_str(), aside.c_str()) == 0 && note)
      *note = fmt::format("{}: took over a lock left by a job that is gone ({}{}{})", path_,
                          holder.is_object() ? describe_holder(holder) : "unreadable lock", "; ", why);
  }
  heartbeat_ = std::thread([this] { heartbeat_loop(); });
}

RunLock::~RunLock() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (heartbeat_.joinable()) heartbeat_.join();
  try {  // remove it only when it is still ours
    auto holder = nlohmann::json::parse(fs::read_text(path_));
    if (holder.value("host", std::string()) == host_ && holder.value("pid", 0L) == pid_) std::filesystem::remove(path_);
  } catch (const std::exception&) {
    // gone or replaced: nothing of ours to remove
  }
}

void RunLock::heartbeat_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!cv_.wait_for(lock, std::chrono::duration<double>(options_.heartbeat_s), [&] { return stop_; })) {
    try {
      auto holder = nlohmann::json::parse(fs::read_text(path_));
      if (holder.value("host", std::string()) != host_ || holder.value("pid", 0L) != pid_) return;  // not ours now
      holder["heartbeat"] = seconds_since_epoch();
      fs::write_text_atomic(path_, holder.dump() + "\n");
    } catch (const std::exception&) {
      // a missed heartbeat only makes the lock look older; the next one retries
    }
  }
}

}  // namespace sedd
