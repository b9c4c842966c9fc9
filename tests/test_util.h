// Helpers shared by the test suites: scratch folders, the golden file's path, running tools.
#pragma once
#include <torch/torch.h>
#include <functional>
#include <string>

namespace sedd::test {

// A fresh folder under $TMPDIR, removed when the object goes away.
struct TempDir {
  TempDir();
  ~TempDir();
  std::string path;
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

std::string golden_path();      // $SEDD_GOLDEN or tests/data/sedd_reference.h5
std::string source_dir();
std::string bin_dir();
std::string python();           // the virtualenv's python (may be empty)

// Runs a shell command; returns its exit status and fills `output` with stdout+stderr.
int run(const std::string& cmd, std::string* output = nullptr);

// "mpirun" with root allowed and oversubscription (this machine has 2 cores).
extern const std::string kMpirun;

// The message of the sedd::Error that fn throws, or "<no error>".
std::string error_of(const std::function<void()>& fn);

// A [L, N] table of per-position token marginals (a different one at every position), for exact
// oracles of distributions with independent positions.
torch::Tensor position_marginals(int64_t L, int64_t N);
// Summed chi-square of per-position token counts of samples [n, L] against p [L, N] (L (N-1) dof).
double chi_square(const torch::Tensor& samples, const torch::Tensor& p);

// Largest elementwise |a-b| / (|b| + atol_scale) over two tensors of equal shape.
double max_rel_error(const torch::Tensor& a, const torch::Tensor& b, double atol_scale = 1e-12);

}  // namespace sedd::test
