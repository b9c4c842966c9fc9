// DDiTScore; see score.h.
#include "objectives/score.h"

#include "io/error.h"


namespace sedd {

DDiTScore::DDiTScore(DDiT model, bool cache)
    : model_(std::move(model)), cache_(cache && !model_->cfg.time_conditioning) {
  const NetworkShape shape = model_->cfg.network();
  log_score_ = shape.log_score;
  // The clean-token distribution's columns: the vocabulary, or (dfm) everything the network outputs.
  width_ = shape.log_score ? model_->cfg.vocab_dim() : model_->cfg.tokens + (shape.mask_in_softmax ? 1 : 0);
}

void DDiTScore::set_sigma(const torch::Tensor& sigma) {
  // A float64 model is conditioned on the float64 sigma (float32 rounding moved its log-probabilities by 3e-9).
  const bool f64 = model_->vocab_embed->embedding.scalar_type() == torch::kDouble;
  sigma_ = sigma.to(f64 ? torch::kDouble : torch::kFloat);
}

void DDiTScore::evaluate(const torch::Tensor& x, const torch::Tensor& sigma) {
  torch::NoGradGuard ng;
  SEDD_CHECK(model_->cfg.network().block_size == 0,
             "a block-diffusion network reads x_t beside the clean sequence (evaluate_with_clean, evaluate_block)");
  set_sigma(sigma);
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
  pair_length_ = 0;
}

void DDiTScore::evaluate_with_clean(const torch::Tensor& xt, const torch::Tensor& sigma, const torch::Tensor& x0) {
  torch::NoGradGuard ng;
  set_sigma(sigma);
  hidden_ = model_->forward_hidden(torch::cat({xt, x0}, 1), sigma_);
  forwards_++;
  rows_evaluated_ += xt.size(0);
  last_x_ = xt.clone();
  pair_length_ = xt.size(1);
}

void DDiTScore::build_context(BlockContext& kv, int64_t from, const torch::Tensor& sigma) {
  const int64_t C = context_.size(1), b = model_->cfg.network().block_size;
  for (int64_t s = from; s < C; s += b) {
    model_->forward_on_context(context_.narrow(1, s, std::min(b, C - s)), sigma, kv, /*extend=*/true);
    context_tokens_ += context_.size(0) * std::min(b, C - s);
  }
}

void DDiTScore::set_context(const torch::Tensor& clean) {
  torch::NoGradGuard ng;
  const bool extends = cache_ && context_.defined() && clean.size(0) == context_.size(0) &&
                       clean.size(1) >= kv_tokens_ &&
                       context_.narrow(1, 0, kv_tokens_).equal(clean.narrow(1, 0, kv_tokens_));
  context_ = clean.clone();
  if (!cache_) return;
  if (!extends) kv_ = BlockContext{}, kv_tokens_ = 0;
  auto sigma = torch::zeros({clean.size(0)}, torch::TensorOptions().dtype(torch::kFloat).device(clean.device()));
  build_context(kv_, kv_tokens_, sigma);
  kv_tokens_ = clean.size(1);
}

void DDiTScore::evaluate_block(const torch::Tensor& block, const torch::Tensor& sigma) {
  torch::NoGradGuard ng;
  set_sigma(sigma);
  SEDD_CHECK(context_.defined(), "evaluate_block: no context was set");
  if (cache_) {
    hidden_ = model_->forward_on_context(block, sigma_, kv_, /*extend=*/false);
  } else {  // the context's keys and values again, the same block-by-block computation
    BlockContext kv;
    build_context(kv, 0, sigma_);
    hidden_ = model_->forward_on_context(block, sigma_, kv, /*extend=*/false);
  }
  forwards_++;
  rows_evaluated_ += block.size(0);
  last_x_ = block.clone();
  pair_length_ = 0;
}

torch::Tensor DDiTScore::rows(const torch::Tensor& rows) {
  torch::NoGradGuard ng;
  const int64_t L = last_x_.size(1);
  const torch::Tensor net_rows = pair_length_ > 0 ? block_diffusion_xt_rows(rows, L) : rows;  // x_t beside x_0
  auto raw = model_->output_logits(model_->output_features(hidden_, net_rows));  // [R, dim] float32
  if (!log_score_) return torch::log_softmax(raw.narrow(1, 0, width_), 1);
  auto batch = torch::div(rows, L, "floor");
  if (model_->cfg.scale_by_sigma) raw = raw + model_->score_shift(sigma_.index_select(0, batch)).unsqueeze(1);
  auto current = last_x_.view({-1}).index_select(0, rows).unsqueeze(1);
  return raw.scatter(1, current, 0.0f);
}

}  // namespace sedd
