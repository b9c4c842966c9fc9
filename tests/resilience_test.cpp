// Pre-emption, resume on another world size, and failures, with real signals and real mpirun.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <thread>
#include <csignal>
#include <sstream>
#include <unistd.h>

#include "data/shard.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "model/weights.h"
#include "recipes.h"
#include "test_util.h"
#include "train/checkpoint.h"

using namespace sedd;
using namespace sedd::test;
using namespace std::chrono_literals;

namespace {

std::string make_random_data(const TempDir& tmp) {
  torch::manual_seed(3);
  for (int i = 0; i < 2; ++i)
    write_shard(tmp / fmt::format("d{}.h5", i), torch::randint(60, {20000}), 64, 63, "byte");
  return tmp / "d*.h5";
}

// A run slow enough (tens of ms per step) to be interrupted mid-way.
std::string slow_train_cmd(int np, const std::string& data, const std::string& dir, int64_t steps, const std::string& extra = "") {
  return slow_steps().set("train.steps", steps).command(np, data, dir, extra);
}

// Starts `cmd` in the background; its exit status lands in <dir>/rc.
void start_background(const std::string& cmd, const std::string& dir) {
  std::filesystem::create_directories(dir);
  std::string full = fmt::format("( {} > {}/log 2>&1; echo $? > {}/rc.tmp; mv {}/rc.tmp {}/rc ) &", cmd, dir, dir, dir, dir);
  ASSERT_EQ(std::system(full.c_str()), 0);
}

int wait_rc(const std::string& dir, std::chrono::seconds limit) {
  auto start = std::chrono::steady_clock::now();
  while (!std::filesystem::exists(dir + "/rc")) {
    if (std::chrono::steady_clock::now() - start > limit) return -999;
    std::this_thread::sleep_for(50ms);
  }
  return std::stoi(fs::read_text(dir + "/rc"));
}

int64_t metric_lines(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  return std::count(std::istreambuf_iterator<char>(in), {}, '\n');
}

std::vector<int> rank_pids(const std::string& run_dir) {
  std::string out;
  run(fmt::format("pgrep -f '^{}/sedd-train .*{}'", bin_dir(), run_dir), &out);
  std::vector<int> pids;
  std::stringstream ss(out);
  int pid;
  while (ss >> pid) pids.push_back(pid);
  return pids;
}

void wait_for_lines(const std::string& run_dir, int64_t n) {
  auto start = std::chrono::steady_clock::now();
  while (metric_lines(run_dir) < n && std::chrono::steady_clock::now() - start < 120s) std::this_thread::sleep_for(10ms);
}

// A 2-rank training (run folder `dir`, background files in `bg`) whose last rank gets `sig` once
// the job logs: the job's exit code (-999: still running after `limit`), the seconds from the
// signal to the end, and the ranks' pids (no signal is sent unless there are exactly two).
struct SignalledJob {
  int rc = -1;
  double secs = 0;
  std::vector<int> pids;
};
SignalledJob signal_last_rank(const std::string& data, const std::string& dir, const std::string& bg,
                              const std::string& extra, int sig, std::chrono::seconds limit) {
  start_background(slow_train_cmd(2, data, dir, 100000, extra), bg);
  wait_for_lines(dir, 3);
  SignalledJob job;
  job.pids = rank_pids(dir);
  if (job.pids.size() != 2) return job;
  auto t0 = std::chrono::steady_clock::now();
  ::kill(job.pids.back(), sig);
  job.rc = wait_rc(bg, limit);
  job.secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return job;
}

}  // namespace

TEST(Resilience, SigtermThenResumeLogsTheSameLossCurve) {
  TempDir tmp;
  std::string data = make_random_data(tmp), out;
  const int64_t steps = 60;
  std::string straight = tmp / "straight", cut = tmp / "cut";
  ASSERT_EQ(run(slow_train_cmd(2, data, straight, steps), &out), 0) << out;
  std::mt19937 rng(std::random_device{}());
  int64_t at = 10 + rng() % 35;
  start_background(slow_train_cmd(2, data, cut, steps), tmp / "bg");
  wait_for_lines(cut, at);
  auto pids = rank_pids(cut);
  ASSERT_EQ(pids.size(), 2u);
  ::kill(pids.back(), SIGTERM);  // one rank only: the others learn of it at the next step boundary
  int rc = wait_rc(tmp / "bg", 60s);
  EXPECT_EQ(rc, 3) << fs::read_text(tmp / "bg/log");
  EXPECT_NE(fs::read_text(tmp / "bg/log").find("exit 3"), std::string::npos);
  auto latest = Checkpointer(cut, 3).latest();
  ASSERT_TRUE(latest.has_value());
  std::cout << "SIGTERM after " << at << " logged steps; checkpoint " << *latest << "\n";
  ASSERT_EQ(run(slow_train_cmd(2, data, cut, steps), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  auto a = run_losses(straight), b = run_losses(cut);
  ASSERT_EQ(a.size(), static_cast<size_t>(steps));
  ASSERT_EQ(b.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_LE(std::abs(a[i] - b[i]), 1e-6 * std::abs(a[i])) << "step " << i + 1 << ": " << a[i] << " vs " << b[i];
}

TEST(Resilience, ResumeOnOneAndThreeRanksMatchesTwo) {
  TempDir tmp;
  std::string data = make_random_data(tmp), out;
  std::string straight = tmp / "straight";
  ASSERT_EQ(run(slow_train_cmd(2, data, straight, 14), &out), 0) << out;
  std::string half = tmp / "half";
  ASSERT_EQ(run(slow_train_cmd(2, data, half, 8), &out), 0) << out;
  h5::File ref_file(resolve_model_file(straight), h5::Mode::Read);
  auto ref = read_state_dict(ref_file, "/model"), ref_ema = read_state_dict(ref_file, "/ema");
  for (int np : {1, 3}) {
    std::string dir = tmp / fmt::format("resumed{}", np);
    std::filesystem::copy(half, dir, std::filesystem::copy_options::recursive);
    ASSERT_EQ(run(slow_train_cmd(np, data, dir, 14), &out), 0) << out;
    EXPECT_NE(out.find("saved by 2 ranks, now " + std::to_string(np)), std::string::npos) << out;
    h5::File f(resolve_model_file(dir), h5::Mode::Read);
    auto got = read_state_dict(f, "/model"), got_ema = read_state_dict(f, "/ema");
    double worst = 0, worst_ema = 0;
    for (auto& [k, v] : ref) worst = std::max(worst, (v - got.at(k)).abs().max().item<double>());
    for (auto& [k, v] : ref_ema) worst_ema = std::max(worst_ema, (v - got_ema.at(k)).abs().max().item<double>());
    std::cout << "W=2 -> W=" << np << ": max |dw| " << worst << ", EMA " << worst_ema << "\n";
    EXPECT_LE(worst, 1e-5);
    EXPECT_LE(worst_ema, 1e-5);
  }
}

TEST(Resilience, KillNineOfOneRankEndsTheJobQuickly) {
  TempDir tmp;
  std::string data = make_random_data(tmp), dir = tmp / "run";
  auto [rc, secs, pids] = signal_last_rank(data, dir, tmp / "bg", "", SIGKILL, 30s);
  ASSERT_EQ(pids.size(), 2u);
  std::cout << "job gone " << secs << " s after kill -9 of one rank, exit " << rc << "\n";
  EXPECT_NE(rc, 0);
  EXPECT_NE(rc, -999) << "the job hung";
  EXPECT_LT(secs, 15.0);
  EXPECT_TRUE(rank_pids(dir).empty()) << "a rank survived";
}

TEST(Resilience, KillNineDuringCheckpointWritesNeverBreaksLatest) {
  TempDir tmp;
  std::string data = make_random_data(tmp), dir = tmp / "run", out;
  std::mt19937 rng(std::random_device{}());
  for (int trial = 0; trial < 5; ++trial) {
    std::string bg = tmp / fmt::format("bg{}", trial);
    // A checkpoint every step: a kill at any moment lands in or near a save.
    start_background(slow_train_cmd(2, data, dir, 100000, "--train.ckpt_every 1 --train.keep_ckpts 2"), bg);
    wait_for_lines(dir, metric_lines(dir) + 2);
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 200));
    auto pids = rank_pids(dir);
    if (!pids.empty()) ::kill(pids[rng() % pids.size()], SIGKILL);
    wait_rc(bg, 30s);
    run(fmt::format("pkill -9 -f '^{}/sedd-train .*{}'", bin_dir(), dir));
    for (int i = 0; i < 100 && !rank_pids(dir).empty(); ++i) std::this_thread::sleep_for(100ms);
    // `latest` must name a complete checkpoint that loads.
    auto latest = Checkpointer(dir, 2).latest();
    ASSERT_TRUE(latest.has_value()) << "trial " << trial;
    EXPECT_NO_THROW(load_model_file(*latest + "/model.h5", true)) << *latest;
    EXPECT_NO_THROW(nlohmann::json::parse(fs::read_text(*latest + "/state.json"))) << *latest;
  }
  // ... and training resumes from it.
  ASSERT_EQ(run(slow_train_cmd(2, data, dir, run_losses(dir).size() + 2), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos);
}

// A rank that stops answering (SIGSTOP: alive but hung) makes its peer's watchdog end the job
// within dist.timeout_s, with a message naming rank, host and the collective it waited in.
TEST(Resilience, WatchdogEndsTheJobWhenAPeerHangs) {
  TempDir tmp;
  std::string data = make_random_data(tmp), dir = tmp / "run";
  auto [rc, secs, pids] = signal_last_rank(data, dir, tmp / "bg", "--dist.timeout_s 4", SIGSTOP, 60s);
  ASSERT_EQ(pids.size(), 2u);
  for (int pid : pids) ::kill(pid, SIGKILL);  // in case the stopped rank outlived the job
  std::string log = fs::read_text(tmp / "bg/log");
  std::cout << "job ended " << secs << " s after one rank hung (timeout 4 s), exit " << rc << "\n";
  EXPECT_NE(rc, -999) << "the job hung\n" << log;
  EXPECT_NE(rc, 0);
  EXPECT_LT(secs, 30.0);
  EXPECT_GT(secs, 3.0) << "ended before the timeout";
  EXPECT_NE(log.find("] watchdog: collective '"), std::string::npos) << log;
  EXPECT_NE(log.find("made no progress for"), std::string::npos) << log;
  EXPECT_NE(log.find("on " + [] {
    char h[256] = {0};
    gethostname(h, sizeof(h) - 1);
    return std::string(h);
  }()), std::string::npos) << log;
}

// SIGTERM to mpirun itself (what `scancel` or a node shutdown does): Open MPI passes it on to the
// ranks, which checkpoint, but mpirun reports its own exit code (and SIGKILLs the ranks waiting in
// MPI_Finalize); the REQUEUE marker is what tells the launcher that the run stopped after a
// committed checkpoint.
TEST(Resilience, SigtermToMpirunLeavesARequeueMarkerThatTheResumeRemoves) {
  TempDir tmp;
  std::string data = make_random_data(tmp), out, cut = tmp / "cut";
  // Open MPI's mpirun, sent TERM, sends the ranks SIGCONT, waits odls_base_sigkill_timeout seconds
  // (default 1), sends SIGTERM, waits as long again, then SIGKILL: the ranks have that long to save,
  // which a loaded machine may need. While it waits it forwards no output, so a rank that prints a
  // lot blocks on its terminal: log every 10th step. The run is open-ended (constant learning rate,
  // so the total step count changes no step's loss): it is still training when the ranks get TERM.
  std::string cmd = "OMPI_MCA_odls_base_sigkill_timeout=2 " + slow_train_cmd(2, data, cut, 100000);
  cmd.replace(cmd.find("--train.log_every 1 "), 20, "--train.log_every 10 ");
  auto mpirun_pid = [&] {
    std::string pid_text;
    run(fmt::format("pgrep -f '^mpirun .*--run.dir {} '", cut), &pid_text);
    return pid_text.empty() ? -1 : std::stoi(pid_text);
  };
  start_background(cmd, tmp / "bg");
  std::mt19937 rng(std::random_device{}());
  wait_for_lines(cut, 1 + rng() % 3);
  const int pid = mpirun_pid();
  ASSERT_GT(pid, 0) << "mpirun is not running";
  ::kill(pid, SIGTERM);
  int rc = wait_rc(tmp / "bg", 90s);
  std::string log = fs::read_text(tmp / "bg/log");
  std::cout << "mpirun (Open MPI) exit code after SIGTERM to mpirun itself: " << rc << "\n";
  ASSERT_NE(rc, -999) << "mpirun hung after SIGTERM";
  EXPECT_TRUE(rank_pids(cut).empty()) << "a rank survived";

  // The marker names the checkpoint that `latest` points to, and that checkpoint says why it exists.
  ASSERT_TRUE(std::filesystem::exists(cut + "/REQUEUE")) << log;
  auto marker = nlohmann::json::parse(fs::read_text(cut + "/REQUEUE"));
  std::cout << "REQUEUE: " << marker.dump() << "\n";
  auto latest = Checkpointer(cut, 3).latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(marker.at("checkpoint").get<std::string>(), std::filesystem::path(*latest).filename().string());
  auto state = nlohmann::json::parse(fs::read_text(*latest + "/state.json"));
  const int64_t stopped_at = state.at("step").get<int64_t>();
  EXPECT_EQ(marker.at("step").get<int64_t>(), stopped_at);
  EXPECT_EQ(marker.at("checkpoint").get<std::string>(), fmt::format("step_{}", stopped_at));
  EXPECT_EQ(marker.at("signal").get<int>(), SIGTERM);
  EXPECT_TRUE(std::regex_match(marker.at("time").get<std::string>(),
                               std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")))
      << marker.dump();
  EXPECT_TRUE(state.value("stopped_for_requeue", false)) << state.dump();

  // The same command resumes and removes the marker; USR1 to mpirun then ends it (mpirun exits 3).
  start_background(cmd, tmp / "bg2");
  wait_for_lines(cut, metric_lines(cut) + 3);
  log = fs::read_text(tmp / "bg2/log");
  EXPECT_NE(log.find(fmt::format("pre-empted at step {} (signal {})", stopped_at, SIGTERM)), std::string::npos) << log;
  EXPECT_FALSE(std::filesystem::exists(cut + "/REQUEUE")) << "the resumed run kept the marker";
  const int resumed_pid = mpirun_pid();
  ASSERT_GT(resumed_pid, 0) << "the resumed mpirun is not running";
  ::kill(resumed_pid, SIGUSR1);
  EXPECT_EQ(wait_rc(tmp / "bg2", 90s), 3) << fs::read_text(tmp / "bg2/log");

  // Every step logged before and after the interruption matches an uninterrupted run.
  auto b = run_losses(cut);
  const int64_t steps = static_cast<int64_t>(b.size());
  ASSERT_GT(steps, stopped_at);
  std::string straight = tmp / "straight";
  ASSERT_EQ(run(slow_train_cmd(2, data, straight, steps), &out), 0) << out;  // logs every step
  auto a = run_losses(straight);
  ASSERT_EQ(a.size(), b.size());
  int compared = 0, after_resume = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(b[i])) continue;  // not logged by the interrupted run
    EXPECT_LE(std::abs(a[i] - b[i]), 1e-6 * std::abs(a[i])) << "step " << i + 1 << ": " << a[i] << " vs " << b[i];
    ++compared;
    after_resume += static_cast<int64_t>(i) >= stopped_at;
  }
  EXPECT_GE(after_resume, 3);
  std::cout << "stopped at step " << stopped_at << ", resumed, logged up to step " << steps << "; " << compared
            << " logged losses (" << after_resume << " after the resume) match an uninterrupted run\n";
}

// USR1 to mpirun is forwarded to every rank and mpirun exits 3. With a checkpoint every step the
// stop finds the current step already saved: that checkpoint is marked instead of saved again.
TEST(Resilience, Usr1ToMpirunRightAfterAScheduledCheckpointMarksThatCheckpoint) {
  TempDir tmp;
  std::string data = make_random_data(tmp), dir = tmp / "run";
  start_background(slow_train_cmd(2, data, dir, 100000, "--train.ckpt_every 1 --train.keep_ckpts 2"), tmp / "bg");
  wait_for_lines(dir, 4);
  std::string pid_text;
  run(fmt::format("pgrep -f '^mpirun .*--run.dir {} '", dir), &pid_text);
  ASSERT_FALSE(pid_text.empty()) << "mpirun is not running";
  ::kill(std::stoi(pid_text), SIGUSR1);
  int rc = wait_rc(tmp / "bg", 60s);
  std::string log = fs::read_text(tmp / "bg/log");
  EXPECT_EQ(rc, 3) << log;
  ASSERT_TRUE(std::filesystem::exists(dir + "/REQUEUE")) << log;
  auto marker = nlohmann::json::parse(fs::read_text(dir + "/REQUEUE"));
  auto latest = Checkpointer(dir, 2).latest();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(marker.at("checkpoint").get<std::string>(), std::filesystem::path(*latest).filename().string());
  EXPECT_EQ(marker.at("signal").get<int>(), SIGUSR1);
  EXPECT_EQ(log.find("[train] checkpoint " + *latest + "\n"), log.rfind("[train] checkpoint " + *latest + "\n"))
      << "the stop saved step " << marker.at("step") << " a second time";
  auto state = nlohmann::json::parse(fs::read_text(*latest + "/state.json"));
  EXPECT_TRUE(state.value("stopped_for_requeue", false)) << state.dump();
  EXPECT_EQ(state.at("step").get<int64_t>(), marker.at("step").get<int64_t>());
}
