// One job per run folder: <run.dir>/LOCK. The rules on the lock itself, then two real sedd-train
// jobs on one folder (the second refused, naming the first) and a lock left by kill -9 taken over.
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/shard.h"
#include "io/error.h"
#include "io/fs.h"
#include "test_util.h"
#include "train/run_lock.h"

using namespace sedd;
using namespace sedd::test;
using namespace std::chrono_literals;

namespace {

std::string host() {
  char name[256] = {0};
  gethostname(name, sizeof name - 1);
  return name;
}

// The pid of a process that has ended (and been reaped).
long dead_pid() {
  pid_t pid = fork();
  if (pid == 0) _exit(0);
  waitpid(pid, nullptr, 0);
  return pid;
}

void write_lock(const std::string& dir, const nlohmann::json& j) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/LOCK") << j.dump() << "\n";
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string lock_error(const std::string& dir, RunLockOptions o = {}) {
  o.wait_s = 0;  // the holder is alive for good here: no grace period
  try {
    RunLock lock(dir, o, nullptr);
  } catch (const OptionError& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

TEST(RunLock, HeldWhileAliveAndRemovedAfter) {
  TempDir tmp;
  const std::string dir = tmp / "run";
  {
    std::string note;
    RunLock lock(dir, {}, &note);
    EXPECT_EQ(note, "");
    auto j = nlohmann::json::parse(fs::read_text(dir + "/LOCK"));
    EXPECT_EQ(j["host"], host());
    EXPECT_EQ(j["pid"].get<long>(), static_cast<long>(getpid()));
    EXPECT_TRUE(j.contains("started") && j.contains("heartbeat"));
    // The holder is alive (this process): a second lock is refused, naming it.
    std::string e = lock_error(dir);
    EXPECT_NE(e.find("in use by another job"), std::string::npos) << e;
    EXPECT_NE(e.find(fmt::format("pid {}", getpid())), std::string::npos) << e;
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/LOCK"));
}

TEST(RunLock, HeartbeatIsRefreshed) {
  TempDir tmp;
  RunLockOptions o;
  o.heartbeat_s = 0.05;
  RunLock lock(tmp / "run", o, nullptr);
  double first = nlohmann::json::parse(fs::read_text(tmp / "run/LOCK"))["heartbeat"].get<double>();
  std::this_thread::sleep_for(300ms);
  double later = nlohmann::json::parse(fs::read_text(tmp / "run/LOCK"))["heartbeat"].get<double>();
  EXPECT_GT(later, first);
}

TEST(RunLock, AbandonedLocksAreTakenOverAndLiveOnesRefused) {
  TempDir tmp;
  // Same host, pid gone: taken over, with a message naming the old holder.
  write_lock(tmp / "a", {{"host", host()}, {"pid", dead_pid()}, {"job", "77"}, {"started", "x"}, {"heartbeat", now_s()}});
  {
    std::string note;
    RunLock lock(tmp / "a", {}, &note);
    EXPECT_NE(note.find("took over"), std::string::npos) << note;
    EXPECT_NE(note.find("SLURM job 77"), std::string::npos) << note;
    EXPECT_EQ(nlohmann::json::parse(fs::read_text(tmp / "a/LOCK"))["pid"].get<long>(), static_cast<long>(getpid()));
  }
  // Same host, a zombie (killed, not yet reaped by its parent): gone too.
  pid_t zombie = fork();
  if (zombie == 0) _exit(0);
  std::this_thread::sleep_for(200ms);  // it has exited; not reaped until waitpid below
  write_lock(tmp / "z", {{"host", host()}, {"pid", zombie}, {"started", "x"}, {"heartbeat", now_s()}});
  {
    std::string note;
    RunLock lock(tmp / "z", {}, &note);
    EXPECT_NE(note.find(fmt::format("its pid {} is gone", zombie)), std::string::npos) << note;
  }
  waitpid(zombie, nullptr, 0);
  // A live holder on this host that exits within the grace period: the lock is taken once it is gone.
  pid_t exiting = fork();
  if (exiting == 0) {
    usleep(500000);
    _exit(0);
  }
  write_lock(tmp / "w", {{"host", host()}, {"pid", exiting}, {"started", "x"}, {"heartbeat", now_s()}});
  std::thread reaper([&] { waitpid(exiting, nullptr, 0); });
  {
    std::string note;
    RunLock lock(tmp / "w", {}, &note);  // waits up to wait_s (10 s) for it
    EXPECT_NE(note.find("is gone"), std::string::npos) << note;
  }
  reaper.join();
  // Another host with a fresh heartbeat: refused, naming the host; with a stale one: taken over.
  write_lock(tmp / "b", {{"host", "node-elsewhere"}, {"pid", 1}, {"started", "x"}, {"heartbeat", now_s()}});
  std::string e = lock_error(tmp / "b");
  EXPECT_NE(e.find("host node-elsewhere"), std::string::npos) << e;
  EXPECT_TRUE(std::filesystem::exists(tmp / "b/LOCK"));
  write_lock(tmp / "c", {{"host", "node-elsewhere"}, {"pid", 1}, {"started", "x"}, {"heartbeat", now_s() - 1000}});
  {
    std::string note;
    RunLock lock(tmp / "c", {}, &note);
    EXPECT_NE(note.find("heartbeat stopped"), std::string::npos) << note;
  }
  // An unreadable lock (a crash while writing it by hand, say) is taken over too.
  std::filesystem::create_directories(tmp / "d");
  std::ofstream(tmp / "d/LOCK") << "{not json";
  {
    std::string note;
    RunLock lock(tmp / "d", {}, &note);
    EXPECT_NE(note.find("unreadable"), std::string::npos) << note;
  }
}

TEST(RunLock, SecondJobOnTheFolderExitsTwoAndAKilledJobsLockIsTakenOver) {
  TempDir tmp;
  torch::manual_seed(5);
  write_shard(tmp / "d.h5", torch::randint(60, {40000}), 64, 63, "byte");
  const std::string dir = tmp / "run";
  auto cmd = [&](int64_t steps) {
    return fmt::format("{} -np 1 {}/sedd-train --data.train {} --run.dir {} --run.device cpu --data.seq_len 32 "
                       "--model.hidden_size 64 --model.n_heads 2 --model.n_blocks 2 --model.cond_dim 16 "
                       "--train.batch_size 8 --train.log_every 1 --train.steps {}",
                       kMpirun, bin_dir(), tmp / "d.h5", dir, steps);
  };
  // Job 1 runs long; job 2 on the same folder must be refused while it runs.
  std::string first = fmt::format("( {} > {} 2>&1 ) &", cmd(100000), tmp / "first.log");
  ASSERT_EQ(std::system(first.c_str()), 0);
  auto t0 = std::chrono::steady_clock::now();
  while (!std::filesystem::exists(dir + "/metrics.jsonl") && std::chrono::steady_clock::now() - t0 < 60s)
    std::this_thread::sleep_for(50ms);
  ASSERT_TRUE(std::filesystem::exists(dir + "/LOCK"));
  const long holder = nlohmann::json::parse(fs::read_text(dir + "/LOCK"))["pid"].get<long>();

  std::string out;
  EXPECT_EQ(run(cmd(5), &out), 2) << out;
  EXPECT_NE(out.find("in use by another job"), std::string::npos) << out;
  EXPECT_NE(out.find(fmt::format("pid {}", holder)), std::string::npos) << out;

  // kill -9 leaves the lock behind; the next job takes it over and trains.
  ASSERT_EQ(kill(static_cast<pid_t>(holder), SIGKILL), 0);
  t0 = std::chrono::steady_clock::now();
  while (kill(static_cast<pid_t>(holder), 0) == 0 && std::chrono::steady_clock::now() - t0 < 30s)
    std::this_thread::sleep_for(50ms);
  std::this_thread::sleep_for(500ms);  // mpirun reaps its child
  ASSERT_TRUE(std::filesystem::exists(dir + "/LOCK"));
  std::filesystem::remove_all(dir + "/checkpoints");  // the killed job's run is not resumed here
  std::filesystem::remove(dir + "/metrics.jsonl");
  EXPECT_EQ(run(cmd(3), &out), 0) << out;
  EXPECT_NE(out.find("took over a lock left by a job that is gone"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir + "/LOCK")) << "released at the end";
}

// Restarting a run that already reached train.steps is an error (exit 2, saying so), not a
// silent exit 0 that did nothing; raising train.steps continues it.
TEST(RunFolder, ResumingAtOrPastTrainStepsExitsTwoAndSaysSo) {
  TempDir tmp;
  torch::manual_seed(6);
  write_shard(tmp / "d.h5", torch::randint(60, {20000}), 64, 63, "byte");
  auto cmd = [&](int64_t steps) {
    return fmt::format("{} -np 1 {}/sedd-train --data.train {} --run.dir {} --run.device cpu --data.seq_len 32 "
                       "--model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 --model.cond_dim 16 "
                       "--train.batch_size 4 --train.steps {}",
                       kMpirun, bin_dir(), tmp / "d.h5", tmp / "run", steps);
  };
  std::string out;
  ASSERT_EQ(run(cmd(4), &out), 0) << out;
  for (int64_t steps : {4, 2}) {
    EXPECT_EQ(run(cmd(steps), &out), 2) << out;
    EXPECT_NE(out.find(fmt::format("is at step 4 and train.steps = {}: nothing is left to train", steps)),
              std::string::npos)
        << out;
  }
  EXPECT_EQ(run(cmd(6), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  EXPECT_NE(out.find("done: 6 steps"), std::string::npos) << out;
}

// The start-up report says how much data each split has and how many tokens its shard tails
// (shorter than seq_len) leave unused: once, on rank 0.
TEST(RunStart, ShardTailsShorterThanAWindowAreReportedOncePerSplit) {
  TempDir tmp;
  torch::manual_seed(7);
  write_shard(tmp / "t0.h5", torch::randint(60, {1000}), 64, 63, "byte");  // 31 windows of 32, 8 left
  write_shard(tmp / "t1.h5", torch::randint(60, {650}), 64, 63, "byte");   // 20 windows, 10 left
  write_shard(tmp / "v.h5", torch::randint(60, {640}), 64, 63, "byte");    // 20 windows, none left
  std::string out;
  ASSERT_EQ(run(fmt::format("{} -np 2 {}/sedd-train --data.train '{}' --data.valid {} --run.dir {} --run.device cpu "
                            "--data.seq_len 32 --model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 "
                            "--model.cond_dim 16 --train.batch_size 4 --train.steps 1",
                            kMpirun, bin_dir(), tmp / "t*.h5", tmp / "v.h5", tmp / "run"),
                &out),
            0)
      << out;
  const std::string train_line = "data.train: 2 shard(s), 1650 tokens, 51 windows of 32; 18 tokens (1.09%) in shard tails";
  EXPECT_NE(out.find(train_line), std::string::npos) << out;
  EXPECT_EQ(out.find(train_line, out.find(train_line) + 1), std::string::npos) << "printed more than once";
  EXPECT_NE(out.find("data.valid: 1 shard(s), 640 tokens, 20 windows of 32\n"), std::string::npos) << out;
}

// A rank's intra-op threads come from the CPUs it may run on (its affinity mask, narrowed here by
// taskset and by mpirun's own binding), shared by the local ranks that overlap it.
TEST(RunStart, ThreadsFollowTheCpusTheRankMayRunOn) {
  // the CPUs this test may run on (a cluster job or CI's cgroup may hold any of them): never CPU 0 by name
  cpu_set_t mask;
  CPU_ZERO(&mask);
  ASSERT_EQ(sched_getaffinity(0, sizeof(mask), &mask), 0);
  std::vector<int> allowed;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &mask)) allowed.push_back(c);
  if (allowed.size() < 2) GTEST_SKIP() << "needs 2 CPUs in this process's affinity mask";
  const std::string one = std::to_string(allowed[0]), two = one + "," + std::to_string(allowed[1]);
  TempDir tmp;
  torch::manual_seed(8);
  write_shard(tmp / "d.h5", torch::randint(60, {4000}), 64, 63, "byte");
  struct Case {
    std::string launcher;
    int np, threads, cpus;
  };
  const std::string root = "env -u SEDD_CORES OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 ";
  const std::vector<Case> cases = {
      {root + "taskset -c " + one + " mpirun --oversubscribe --bind-to none", 1, 1, 1},
      {root + "taskset -c " + two + " mpirun --oversubscribe --bind-to none", 1, 2, 2},
      {root + "taskset -c " + two + " mpirun --oversubscribe --bind-to none", 2, 1, 2},
      {root + "mpirun --bind-to core", 1, 1, 1},  // Open MPI's own binding: one core, one thread
  };
  int k = 0;
  for (const auto& c : cases) {
    std::string out;
    ASSERT_EQ(run(fmt::format("{} -np {} {}/sedd-train --data.train {} --run.dir {} --run.device cpu --data.seq_len 32 "
                              "--model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 --model.cond_dim 16 "
                              "--train.batch_size 4 --train.steps 1",
                              c.launcher, c.np, bin_dir(), tmp / "d.h5", tmp / fmt::format("run{}", k++)),
                  &out),
              0)
        << out;
    EXPECT_NE(out.find(fmt::format("threads per rank: {} ({} CPU(s) in this rank's affinity, shared by {} local rank(s))",
                                   c.threads, c.cpus, c.np)),
              std::string::npos)
        << c.launcher << " -np " << c.np << "\n"
        << out;
  }
}
