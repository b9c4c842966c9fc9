// The likelihood bound (docs/DESIGN.md, "Likelihood bound") of a model for a sequence x0:
//   -log p(x0) <= E_t[w(t) sum_l term_l(x_t)] + KL(p_1(.|x0) || p_base)
// with the weight, terms and prior of the model's objective (src/objectives; the autoregressive
// model's likelihood is exact: one pass, no Monte Carlo),
// the integral estimated by Monte Carlo over t (iid, antithetic pairs or stratified), with the
// times and corruptions of sequence i keyed by (seed, i, draw): a sequence's estimate never
// depends on the batch, rank or device that computed it. Only positions with a non-zero loss are
// scored (absorbing graph: the masked ones), in chunks of bounded size. p_base is the forward process
// at t = 1 started from uniformly random tokens: for the uniform graph that is the uniform
// distribution the sampler starts from; for the absorbing graph it puts e^-sigma(1) of its mass
// on random tokens (e.g. 1e-3 for the log-linear schedule), and the KL term is what that costs.
#pragma once
#include <torch/torch.h>
#include <string>

#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "model/config.h"
#include "objectives/sampling.h"

namespace sedd {

struct ElboConfig {
  int64_t mc_samples = 32;
  std::string sampling = "antithetic";  // iid | antithetic | stratified
  uint64_t seed = 0;
  int64_t chunk_elems = int64_t{1} << 27;  // bound on rows x dim per model call
  ModelConfig model;                       // the model's config: its objective and settings
  void validate() const;
};

struct ElboResult {            // per sequence of the batch
  torch::Tensor bound;         // [B] nats: mean over draws of the integrand + prior term
  torch::Tensor mc_variance;   // [B] variance of that mean (from the draws; antithetic: from the pairs, or
                               // for a single pair the iid formula over its two draws, see elbo.cpp)
  double prior_nats = 0;       // KL term per sequence (the same for every sequence)
};

// Times t in (0, 1) [B, K] for the sequences `indices` [B] (antithetic: u and 1-u; stratified:
// (k + u_k)/K), on indices' device.
torch::Tensor elbo_times(const ElboConfig& cfg, const torch::Tensor& indices);
// x0 [B, L]; first_index: global index of row 0 (keys the draws). Results on the CPU.
// loss_mask [B, L] bool (optional; MDLM's attention_mask of padded windows): only its positions are
// scored, by every objective; the others (padding) are still fed to the network and corrupted like
// any token (as MDLM's q_xt does), never scored. With it, bound [B] includes each row's prior term
// over its scored positions and prior_nats is the prior term per scored position.
ElboResult elbo_batch(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0,
                      int64_t first_index, const ElboConfig& cfg, torch::Device device,
                      const torch::Tensor& loss_mask = {});

// The conditional bound (docs/DESIGN.md, "Conditional likelihood"): -log p(x0[scored] | x0[rest])
// of a diffusion model (not ar) for x0 [B, L] and scored [B, L] bool. Only the scored positions are
// corrupted; the others stay clamped to x0 at every time, so the network sees them, and the
// integrand and the prior term sum over the scored positions only. bound [B] includes each row's
// own prior term; prior_nats is then the prior term per scored position. indices [B]: the keys of
// the rows' draws (any order). Results on the CPU.
ElboResult conditional_elbo_batch(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0,
                                  const torch::Tensor& scored, const torch::Tensor& indices, const ElboConfig& cfg,
                                  torch::Device device);

}  // namespace sedd
