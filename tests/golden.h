// Golden-file checks: walks any file of the reference schema (docs/DESIGN.md, "Golden reference") and compares every
// stored output with ours. Returns one line per mismatch (empty = all good) so a test can also
// check that a damaged copy of the file is caught.
#pragma once
#include <torch/torch.h>
#include <set>
#include <string>
#include <vector>

namespace sedd::test {

struct GoldenReport {
  std::vector<std::string> mismatches;  // "<dataset>: max rel err X > tol"
  int compared = 0;                     // datasets compared
  double worst = 0;                     // largest relative error seen
  std::set<std::string> used;           // every dataset read: compared outputs and the inputs they need
};

// Every dataset of the file, by full path ("/graph/absorb/rate"), found by walking its groups.
std::vector<std::string> list_datasets(const std::string& path);

// /noise/* and /graph/*; float64, relative tolerance `rtol`.
GoldenReport check_golden_diffusion(const std::string& path, double rtol = 1e-9);

// /model/*: builds each network from the group's attributes, loads params/, and compares
// output/log_score and the full training loss loss/loss (float32, relative tolerance `rtol`).
GoldenReport check_golden_models(const std::string& path, double rtol = 1e-4);

// Relative error used for float32 model outputs: |a - b| / (|b| + 1e-2 * max|b|): float32 rounding of
// near-zero entries does not count, a 2% error on any entry above 1% of the largest does.
double model_rel_error(const torch::Tensor& ours, const torch::Tensor& ref);

}  // namespace sedd::test
