#include "test_util.h"

#include "distributed/runtime.h"

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <set>
#include <cstring>
#include <unistd.h>
#include <random>

#include <nlohmann/json.hpp>

#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "train/checkpoint.h"

namespace sedd::test {

namespace fs = std::filesystem;

TempDir::TempDir() {
  std::random_device rd;
  fs::path base = fs::temp_directory_path();
  for (;;) {
    fs::path p = base / ("sedd-test-" + std::to_string(rd()));
    if (fs::create_directory(p)) {
      path = p.string();
      break;
    }
  }
}

TempDir::~TempDir() {
  std::error_code ec;
  if (!std::getenv("SEDD_KEEP_TMP")) fs::remove_all(path, ec);
}

const std::string kMpirun =
    "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 mpirun --oversubscribe --bind-to none";

std::string golden_path() {
  if (const char* p = std::getenv("SEDD_GOLDEN")) return p;
  return SEDD_GOLDEN_DEFAULT;
}
namespace {
std::string variable_name(const char* entry) {
  const char* eq = std::strchr(entry, '=');
  return eq ? std::string(entry, eq) : std::string(entry);
}
// The variables this process started with, read at static initialisation (before any MPI_Init).
const std::set<std::string> g_start_environment = [] {
  std::set<std::string> names;
  for (char** e = environ; *e; ++e) names.insert(variable_name(*e));
  return names;
}();
// Removes the MPI/PMIx variables an MPI_Init in this process added (a test that trains in process
// is an MPI singleton): a child mpirun that inherited them would try to join this process's job and
// hang. The connection they described is made by then.
void forget_added_mpi_environment() {
  std::vector<std::string> added;
  for (char** e = environ; *e; ++e) {
    const std::string name = variable_name(*e);
    if (g_start_environment.count(name)) continue;
    for (const char* prefix : {"PMIX_", "OMPI_", "ORTE_", "OPAL_"})
      if (name.rfind(prefix, 0) == 0) added.push_back(name);
  }
  for (const auto& name : added) unsetenv(name.c_str());
}
}  // namespace

Runtime& child_runtime(const std::string& device) {
  int argc = 1;
  static char arg0[] = "child";
  static char* args[] = {arg0, nullptr};
  char** argv = args;
  Runtime& rt = Runtime::init(&argc, &argv, device);
  forget_added_mpi_environment();
  return rt;
}

std::string source_dir() { return SEDD_SOURCE_DIR; }
std::string bin_dir() { return SEDD_BIN_DIR; }
std::string python() {
  if (const char* p = std::getenv("SEDD_PYTHON"); p && *p) return p;
  std::error_code ec;
  if (std::string configured = SEDD_PYTHON; !configured.empty() && fs::exists(configured, ec)) return configured;
  return "python3";
}

std::string python_lacks(const std::vector<std::string>& modules) {
  // one answer per module set: each check starts a python
  static std::map<std::vector<std::string>, std::string> known;
  if (auto it = known.find(modules); it != known.end()) return it->second;
  std::string why;
  for (const auto& m : modules) {
    std::string out;
    if (run(fmt::format("{} -c 'import {}'", python(), m), &out) != 0) {
      why += (why.empty() ? fmt::format("{} lacks ", python()) : ", ") + m;
    }
  }
  return known[modules] = why;
}

std::string exclusive_compute_mode() {
  std::string mode;
  if (run("nvidia-smi --query-gpu=compute_mode --format=csv,noheader", &mode) != 0) return "";
  if (mode.find("Exclusive_Process") == std::string::npos) return "";
  return "the GPU is in exclusive-process compute mode: the tools this test starts cannot share it (nvidia-smi: " +
         mode.substr(0, mode.find('\n')) + ")";
}

std::string gpu_children_unavailable() {
  if (!torch::cuda::is_available()) return "no CUDA device";
  return exclusive_compute_mode();
}

std::vector<nlohmann::json> read_jsonl(const std::string& file) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(file);
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}


int run(const std::string& cmd, std::string* output) {
  std::string full = cmd + " 2>&1";
  FILE* pipe = popen(full.c_str(), "r");
  if (!pipe) return -1;
  std::array<char, 4096> buf;
  std::string out;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) out.append(buf.data(), n);
  int status = pclose(pipe);
  if (output) *output = out;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::vector<RunResult> run_all(const std::vector<std::string>& cmds, int parallel) {
  std::vector<RunResult> results(cmds.size());
  for (size_t first = 0; first < cmds.size(); first += parallel) {
    std::vector<std::future<void>> wave;
    for (size_t i = first; i < std::min(cmds.size(), first + parallel); ++i)
      wave.push_back(std::async(std::launch::async, [&, i] { results[i].rc = run(cmds[i], &results[i].output); }));
    for (auto& f : wave) f.get();
  }
  return results;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const sedd::Error& e) {
    return e.what();
  }
  return "<no error>";
}

torch::Tensor position_marginals(int64_t L, int64_t N) {
  auto base = torch::tensor({0.4, 0.25, 0.15, 0.12, 0.08}, torch::kDouble).narrow(0, 0, N);
  std::vector<torch::Tensor> rows;
  for (int64_t l = 0; l < L; ++l) rows.push_back(base.roll(l));
  auto p = torch::stack(rows);
  return p / p.sum(-1, true);
}

double chi_square(const torch::Tensor& samples, const torch::Tensor& p) {
  double chi2 = 0;
  for (int64_t l = 0; l < p.size(0); ++l) {
    auto counts = torch::bincount(samples.select(1, l), {}, p.size(1)).to(torch::kDouble);
    auto e = p[l] * static_cast<double>(samples.size(0));
    chi2 += ((counts - e).pow(2) / e).sum().item<double>();
  }
  return chi2;
}

std::vector<nlohmann::json> run_metrics(const std::string& run_dir) { return read_jsonl(run_dir + "/metrics.jsonl"); }

std::vector<double> run_losses(const std::string& run_dir) {
  std::vector<double> v;
  for (const auto& j : run_metrics(run_dir)) {
    const int64_t step = j["step"].get<int64_t>();
    if (static_cast<int64_t>(v.size()) < step) v.resize(step, std::nan(""));
    v[step - 1] = j["loss"].get<double>();
  }
  return v;
}

StateDict run_weights(const std::string& run_dir, const std::string& group) {
  h5::File f(resolve_model_file(run_dir), h5::Mode::Read);
  return read_state_dict(f, group);
}

double max_abs_diff(const StateDict& a, const StateDict& b) {
  double worst = 0;
  for (const auto& [k, v] : a) worst = std::max(worst, (v - b.at(k)).abs().max().item<double>());
  return worst;
}

double max_rel_error(const torch::Tensor& a, const torch::Tensor& b, double atol_scale) {
  auto ad = a.to(torch::kDouble), bd = b.to(torch::kDouble);
  return ((ad - bd).abs() / (bd.abs() + atol_scale)).max().item<double>();
}

torch::Tensor checkpoint_moments(const std::string& run_dir) {
  auto dir = Checkpointer(run_dir, 1).latest();
  SEDD_CHECK(dir.has_value(), "{}: no checkpoint", run_dir);
  auto state = nlohmann::json::parse(sedd::fs::read_text(*dir + "/state.json"));
  const int64_t numel = state.at("numel").get<int64_t>(), world = state.at("world_size").get<int64_t>();
  torch::Tensor out;
  int64_t covered = 0;
  for (int64_t k = 0; k < world; ++k) {
    h5::File f(fmt::format("{}/optim/rank_{}.h5", *dir, k), h5::Mode::Read);
    auto m = f.read("/exp_avg"), v = f.read("/exp_avg_sq");
    if (!out.defined()) out = torch::full({2, numel}, std::nan(""), torch::TensorOptions().dtype(m.scalar_type()));
    auto pieces = f.read("/pieces", torch::kLong).view({-1, 3});
    auto p = pieces.accessor<int64_t, 2>();
    for (int64_t i = 0; i < pieces.size(0); ++i) {
      out[0].narrow(0, p[i][0], p[i][1]).copy_(m.narrow(0, p[i][2], p[i][1]));
      out[1].narrow(0, p[i][0], p[i][1]).copy_(v.narrow(0, p[i][2], p[i][1]));
      covered += p[i][1];
    }
  }
  SEDD_CHECK(covered == numel, "{}: the optimizer pieces cover {} of {} parameters", *dir, covered, numel);
  return out;
}

double moments_rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  double worst = 0;
  for (int64_t r = 0; r < a.size(0); ++r)
    worst = std::max(worst, ((a[r] - b[r]).abs().max() / a[r].abs().max()).item<double>());
  return worst;
}

}  // namespace sedd::test
