// Sampling from a model: what every objective's sampler shares (the network as samplers see it,
// the options, conditioning, block generation). Each objective's reverse process is its own
// (Objective::sample; docs/DESIGN.md, "Sampling").
//
// Keyed draws: the categorical draw of position l of sample i at step k is element
// (i, l * dim + token) of the stream (seed, purpose::kSample, k), so a sample depends only on its
// index and the seed, never on the batch it ran in, the rank or the world size.
// Only rows that can change are computed: for the absorbing graph a position that is no longer
// masked keeps its token in both predictors, so each step asks the model for the scores of the
// masked positions alone (chunked, so [rows, dim] never exceeds a bound) and draws only those.
// Conditioning (prefix, suffix, infill) clamps the given positions before every step and at the end.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "model/config.h"

namespace sedd {

// The network as samplers and the likelihood bound see it.
class ScoreModel {
 public:
  virtual ~ScoreModel() = default;
  // Runs the network on x [B, L] (int64) at sigma [B]; rows() then serves its log-scores.
  virtual void evaluate(const torch::Tensor& x, const torch::Tensor& sigma) = 0;
  // For positions `rows` (int64 [R], flat indices into [B * L]) of the last evaluate(): log-scores
  // [R, dim] (sedd; the current token's entry is 0), or log-probabilities of the clean token
  // (mdlm, d3pm: [R, N]; dfm: [R, dim], its mask column included) or of the next token (ar).
  virtual torch::Tensor rows(const torch::Tensor& rows) = 0;
  // The whole log-score [B, L, dim].
  torch::Tensor log_score(const torch::Tensor& x, const torch::Tensor& sigma);

  // Block diffusion (bd3), whose network reads x_t with the clean x_0 beside it:
  // evaluate_with_clean runs x_t [B, L] with x0 [B, L]; rows() then indexes x_t's [B * L] positions.
  virtual void evaluate_with_clean(const torch::Tensor& xt, const torch::Tensor& sigma, const torch::Tensor& x0);
  // evaluate_with_clean when x0 is defined, else evaluate.
  void evaluate_point(const torch::Tensor& xt, const torch::Tensor& sigma, const torch::Tensor& x0);
  // The sampler's clean context [B, C] (its blocks, oldest first); evaluate_block then runs a
  // block [B, T] after it, and rows() indexes the block's [B * T] positions.
  virtual void set_context(const torch::Tensor& clean);
  virtual void evaluate_block(const torch::Tensor& block, const torch::Tensor& sigma);
};

struct SamplerConfig {
  ModelConfig model;                   // the sampled model's config: its objective and settings
  std::string predictor = "analytic";  // sedd: euler | analytic (mdlm and d3pm sample ancestrally)
  int64_t steps = 128;
  bool denoise = true;
  bool float64 = false;                // probabilities and draws in float64 (else float32 weights)
  double eps = 1e-5;
  uint64_t seed = 0;
  int64_t chunk_elems = int64_t{1} << 27;  // bound on rows x dim per model call
  double temperature = 1.0;            // ar: logits / temperature
  double top_p = 1.0;                  // ar, bd3: nucleus sampling (1: off)
  // dfm: the divergence-free corrector coefficient c(t) = a t^b (1 - t)^c (a = 0: none; b > 0, as
  // the solver divides by kappa_0 = 0 where c(0) > 0), and float32 categorical draws (float64 by
  // default, as in the authors' text example).
  double corrector_a = 0, corrector_b = 0, corrector_c = 0;
  bool float32_draws = false;
  // bd3: first-hitting (one position unmasked per network call, exact) or ddpm (`steps` ancestral
  // steps per block); stop a sample at its first end-of-text after position 0, or when the entropy
  // of its last 256 tokens falls below stop_entropy (> 0; the authors use 4), the rest end-of-text.
  std::string block_sampler = "first-hitting";
  bool stop_at_eot = false;
  double stop_entropy = 0;
  void validate() const;
};

// Positions fixed to given tokens in every row (prefix, suffix, infill), and optionally a context
// of its own for every row: its first C positions (block generation).
struct Constraint {
  std::vector<int64_t> positions;
  std::vector<int64_t> tokens;
  torch::Tensor context;  // int64 [B, C] or undefined
  void validate(int64_t length, int64_t vocab) const;
  void apply(torch::Tensor& x) const;  // x [B, L]
  int64_t context_length() const { return context.defined() ? context.size(1) : 0; }
};

// Draws the samples whose global indices are `sample_ids` (int64 [B]) with the reverse process of
// cfg.model's objective: returns [B, length] int64 token ids on `device`. `progress(step, steps)`
// is called after every step when given.
torch::Tensor sample(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                     const SamplerConfig& cfg, const Constraint& constraint, const torch::Tensor& sample_ids,
                     torch::Device device, const std::function<void(int64_t, int64_t)>& progress = {});

// Generation past the model's window (semi-autoregressive): the first `window` tokens are sampled
// as usual (with `constraint`, which must lie inside them); then, until `total_length`, each step
// samples a window whose first window - block tokens are the last ones generated so far (fixed)
// and keeps its last `block` tokens. Block k draws from the seed mixed with k, so sample i still
// depends only on (seed, i). Returns [B, total_length].
torch::Tensor sample_blocks(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t total_length,
                            int64_t window, int64_t block, const SamplerConfig& cfg, const Constraint& constraint,
                            const torch::Tensor& sample_ids, torch::Device device,
                            const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace sedd
