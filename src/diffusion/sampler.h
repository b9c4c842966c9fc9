// Reverse-process samplers (DESIGN.md §3): Euler and analytic (Tweedie tau-leaping) predictors on
// the grid linspace(1, eps, steps + 1), then the final denoising step. Every row (sample) draws
// from its own generator, so a sample depends only on its key, never on how samples are split
// across ranks or batches. Conditioning clamps given positions before every step and at the end.
#pragma once
#include <torch/torch.h>
#include <functional>
#include <string>
#include <vector>

#include "diffusion/graph.h"
#include "diffusion/noise.h"

namespace sedd {

// The network as the sampler sees it: log-score [B, L, dim] of x [B, L] at sigma [B].
class ScoreModel {
 public:
  virtual ~ScoreModel() = default;
  virtual torch::Tensor log_score(const torch::Tensor& x, const torch::Tensor& sigma) = 0;
};

struct SamplerConfig {
  std::string predictor = "analytic";  // euler | analytic
  int64_t steps = 128;
  bool denoise = true;
  bool float64 = false;                // probabilities and draws in float64
  double eps = 1e-5;
  void validate() const;
};

// Positions fixed to given tokens in every row (prefix, suffix, infill).
struct Constraint {
  std::vector<int64_t> positions;
  std::vector<int64_t> tokens;
  void validate(int64_t length, int64_t vocab) const;
  void apply(torch::Tensor& x) const;  // x [B, L]
};

// Draws one sample per generator: returns [gens.size(), length] int64 token ids.
// `progress(step, steps)` is called after every step when given.
torch::Tensor sample(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                     const SamplerConfig& cfg, const Constraint& constraint, std::vector<torch::Generator>& gens,
                     torch::Device device, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace sedd
