// Helpers shared by the test suites: scratch folders, the golden file's path, running tools.
#pragma once
#include <torch/torch.h>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "model/weights.h"

namespace sedd {
struct Runtime;
}

namespace sedd::test {

// A fresh folder under $TMPDIR, removed when the object goes away.
struct TempDir {
  TempDir();
  ~TempDir();
  std::string path;
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// The config samplers and bounds read of a model of `objective` (its chain length and first token).
inline ModelConfig objective_config(const std::string& objective, int64_t timesteps = 1000, int64_t bos = -1) {
  ModelConfig m;
  m.objective = objective;
  m.timesteps = timesteps;
  m.bos = bos;
  return m;
}

std::string golden_path();      // $SEDD_GOLDEN or tests/data/sedd_reference.h5
std::string source_dir();
std::string bin_dir();
// The python for interop tests: $SEDD_PYTHON, else the configured virtualenv's (when it exists),
// else python3 on PATH (a relocated build, e.g. on a GPU node, has no virtualenv).
std::string python();
// Empty when python() imports every module; else why not ("python3 lacks h5py").
std::string python_lacks(const std::vector<std::string>& modules);
// Skips the test, saying why, unless python() imports every named module.
#define SEDD_REQUIRE_PYTHON(...)                                                         \
  do {                                                                                   \
    const std::string sedd_python_why = ::sedd::test::python_lacks({__VA_ARGS__});       \
    if (!sedd_python_why.empty()) GTEST_SKIP() << sedd_python_why;                       \
  } while (0)

// Why a test that starts GPU work in child processes cannot run here, or empty: no CUDA device,
// or a GPU in exclusive-process compute mode (a second process on it fails with "busy").
std::string gpu_children_unavailable();
// The exclusive-process part of that: nvidia-smi's compute mode, or empty when it is not exclusive
// (or there is no nvidia-smi).
std::string exclusive_compute_mode();

// Runs a shell command; returns its exit status and fills `output` with stdout+stderr.
int run(const std::string& cmd, std::string* output = nullptr);
// Runs independent commands `parallel` at a time (an mpirun start mostly waits, so short runs
// overlap well); returns each one's exit status and output, in order.
struct RunResult {
  int rc;
  std::string output;
};
std::vector<RunResult> run_all(const std::vector<std::string>& cmds, int parallel = 4);
// One JSON value per line of a JSONL file (metrics.jsonl, sample and score outputs).
std::vector<nlohmann::json> read_jsonl(const std::string& file);

// Runtime::init for a test's own child process (a GPU test that re-runs itself as one MPI rank).
Runtime& child_runtime(const std::string& device);

// "mpirun" with root allowed and oversubscription (this machine has 2 cores).
extern const std::string kMpirun;

// The message of the sedd::Error that fn throws, or "<no error>".
std::string error_of(const std::function<void()>& fn);

// A [L, N] table of per-position token marginals (a different one at every position), for exact
// oracles of distributions with independent positions.
torch::Tensor position_marginals(int64_t L, int64_t N);
// Summed chi-square of per-position token counts of samples [n, L] against p [L, N] (L (N-1) dof).
double chi_square(const torch::Tensor& samples, const torch::Tensor& p);

// A run folder's metrics.jsonl rows.
std::vector<nlohmann::json> run_metrics(const std::string& run_dir);
// The loss of every step by step number (a resumed run's rows replace the earlier ones; NaN where
// no row was logged).
std::vector<double> run_losses(const std::string& run_dir);
// The weights of a run folder's latest model file: group "/model" (raw) or "/ema".
StateDict run_weights(const std::string& run_dir, const std::string& group = "/model");
// Largest |a - b| over every tensor of two state dicts with the same keys.
double max_abs_diff(const StateDict& a, const StateDict& b);

// Largest elementwise |a-b| / (|b| + atol_scale) over two tensors of equal shape.
double max_rel_error(const torch::Tensor& a, const torch::Tensor& b, double atol_scale = 1e-12);

// The Adam moments of a run folder's latest checkpoint, put together from every rank's
// optim/rank_K.h5 pieces: [2, numel] (exp_avg, exp_avg_sq) in parameter order, in the dtype they
// were saved in (float64 for train.precision fp64, where model.h5 holds float32 weights only).
torch::Tensor checkpoint_moments(const std::string& run_dir);
// Largest |a - b| of each row of two checkpoint_moments() relative to that row's largest |a|.
double moments_rel_diff(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace sedd::test
