// The DDiT as a ScoreModel for samplers and the likelihood bound, with exact caching.
//
// For a model trained without time conditioning the raw network output depends only on the
// tokens, so a row whose tokens did not change since the last call reuses its raw output; the
// sigma-dependent scale_by_sigma shift is applied afresh, exactly as forward() does. The result
// is the same tensor the network would have produced; absorbing samplers with many steps skip
// most evaluations (few positions unmask per step).
#pragma once
#include <torch/torch.h>

#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "diffusion/sampler.h"
#include "model/ddit.h"

namespace sedd {

struct LossOptions {
  // Project only the rows with a non-zero loss (absorbing graph: the masked positions) and fuse the
  // projection with the loss chunk by chunk; off = full logits, then the loss (the reference).
  bool fused = true;
  int64_t chunk_elems = int64_t{1} << 26;  // logits per chunk of the fused loss
};

// Per-sequence training loss [B] = sigma'(t) * sum_l l_l of the network at (xt, sigma(t)).
// xt, x0 [B, L] int64; t [B] (float64). In the model's dtype (float32, or float64 for checks).
torch::Tensor model_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                  const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                  const LossOptions& options);

class DDiTScore final : public ScoreModel {
 public:
  // `cache`: reuse the body's output of samples whose tokens did not change (only for models
  // without time conditioning, where it is exact; ignored otherwise).
  DDiTScore(DDiT model, bool cache) : model_(std::move(model)), cache_(cache && !model_->cfg.time_conditioning) {}
  void evaluate(const torch::Tensor& x, const torch::Tensor& sigma) override;
  torch::Tensor rows(const torch::Tensor& rows) override;
  bool caching() const { return cache_; }
  int64_t forwards() const { return forwards_; }          // evaluate() calls that ran the body
  int64_t rows_evaluated() const { return rows_evaluated_; }  // samples pushed through the body
  int64_t rows_reused() const { return rows_reused_; }

 private:
  DDiT model_;
  bool cache_;
  torch::Tensor last_x_, sigma_;
  DDiTHidden hidden_;
  int64_t forwards_ = 0, rows_evaluated_ = 0, rows_reused_ = 0;
};

}  // namespace sedd
