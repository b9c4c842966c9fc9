// DDiTScore; see score.h.
#include "objectives/score.h"


namespace sedd {

DDiTScore::DDiTScore(DDiT model, bool cache)
    : model_(std::move(model)), cache_(cache && !model_->cfg.time_conditioning) {
  const NetworkShape shape = model_->cfg.network();
  log_score_ = shape.log_score;
  // The clean-token distribution's columns: the vocabulary, or (dfm) everything the network outputs.
  width_ = shape.log_score ? model_->cfg.vocab_dim() : model_->cfg.tokens + (shape.mask_in_softmax ? 1 : 0);
}

void DDiTScore::evaluate(const torch::Tensor& x, const torch::Tensor& sigma) {
  torch::NoGradGuard ng;
  // A float64 model is conditioned on the float64 sigma (float32 rounding moved its log-probabilities by 3e-9).
  const bool f64 = model_->vocab_embed->embedding.scalar_type() == torch::kDouble;
  sigma_ = sigma.to(f64 ? torch::kDouble : torch::kFloat);
  const int64_t B = x.size(0);
  if (!cache_ || !last_x_.defined() || last_x_.sizes() != x.sizes()) {
    hidden_ = model_->forward_hidden(x, sigma_);
    forwards_++;
    rows_evaluated_ += B;
  } else {
    // Only the samples whose tokens moved need the body again (exact: no time conditioning).
    auto changed = (x != last_x_).any(1).nonzero().squeeze(1);
    if (changed.numel() > 0) {
      auto fresh = model_->forward_hidden(x.index_select(0, changed), sigma_.index_select(0, changed));
      hidden_.h = hidden_.h.index_copy(0, changed, fresh.h);
      hidden_.c = hidden_.c.index_copy(0, changed, fresh.c);
      forwards_++;
    }
    rows_evaluated_ += changed.numel();
    rows_reused_ += B - changed.numel();
  }
  last_x_ = x.clone();
}

torch::Tensor DDiTScore::rows(const torch::Tensor& rows) {
  torch::NoGradGuard ng;
  const int64_t L = last_x_.size(1);
  auto raw = model_->output_logits(model_->output_features(hidden_, rows));  // [R, dim] float32
  if (!log_score_) return torch::log_softmax(raw.narrow(1, 0, width_), 1);
  auto batch = torch::div(rows, L, "floor");
  if (model_->cfg.scale_by_sigma) raw = raw + model_->score_shift(sigma_.index_select(0, batch)).unsqueeze(1);
  auto current = last_x_.view({-1}).index_select(0, rows).unsqueeze(1);
  return raw.scatter(1, current, 0.0f);
}

}  // namespace sedd
