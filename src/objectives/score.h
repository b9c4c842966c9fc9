// The DDiT as a ScoreModel for samplers and the likelihood bound, with exact caching. rows()
// returns what the objective's sampler and bound read: log-scores [R, dim] (sedd), or
// log-probabilities of the clean token (mdlm, d3pm: [R, N], the mask excluded; dfm: [R, dim], the
// mask included as in its authors' text model) or of the next token (ar).
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
#include "objectives/sampling.h"
#include "model/ddit.h"

namespace sedd {

class DDiTScore final : public ScoreModel {
 public:
  // `cache`: reuse the body's output of samples whose tokens did not change (only for models
  // without time conditioning, where it is exact; ignored otherwise).
  DDiTScore(DDiT model, bool cache);
  void evaluate(const torch::Tensor& x, const torch::Tensor& sigma) override;
  torch::Tensor rows(const torch::Tensor& rows) override;
  void evaluate_with_clean(const torch::Tensor& xt, const torch::Tensor& sigma, const torch::Tensor& x0) override;
  // With caching the context's keys and values stay cached and grow by whole blocks; without,
  // every evaluate_block() builds them again (the same computation, block by block).
  void set_context(const torch::Tensor& clean) override;
  void evaluate_block(const torch::Tensor& block, const torch::Tensor& sigma) override;
  int64_t context_tokens_computed() const { return context_tokens_; }  // tokens pushed through for contexts
  bool caching() const { return cache_; }
  int64_t forwards() const { return forwards_; }          // evaluate() calls that ran the body
  int64_t rows_evaluated() const { return rows_evaluated_; }  // samples pushed through the body
  int64_t rows_reused() const { return rows_reused_; }

 private:
  DDiT model_;
  bool cache_;
  bool log_score_;  // the network gives log-scores (else logits, softmaxed over width_ columns)
  int64_t width_;
  torch::Tensor last_x_, sigma_;
  DDiTHidden hidden_;
  int64_t pair_length_ = 0;  // > 0: hidden_ holds x_t and x_0 of this length each (rows() maps into x_t)
  // Block diffusion's context: its tokens and (caching) their keys and values.
  torch::Tensor context_;
  BlockContext kv_;
  int64_t kv_tokens_ = 0;  // context tokens kv_ covers
  int64_t context_tokens_ = 0;
  void build_context(BlockContext& kv, int64_t from, const torch::Tensor& sigma);
  void set_sigma(const torch::Tensor& sigma);  // sigma_ in the model's conditioning dtype
  int64_t forwards_ = 0, rows_evaluated_ = 0, rows_reused_ = 0;
};

}  // namespace sedd
