// DDiTScore; see score.h.
#include "model/score.h"

#include "diffusion/loss.h"
#include "diffusion/output_loss.h"

namespace sedd {

torch::Tensor model_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                  const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                  const LossOptions& options) {
  const auto dtype = model->vocab_embed->embedding.scalar_type();
  const auto td = t.to(torch::kDouble);
  if (!options.fused) {
    auto log_score = model->forward(xt, noise.total(td).to(dtype), dropout);
    return sequence_loss(graph, noise, log_score.to(dtype), td.to(dtype), xt, x0);
  }
  const int64_t B = xt.size(0), L = xt.size(1), N = graph.tokens();
  auto sigma = noise.total(td), dsigma = noise.rate(td);  // [B] float64
  DDiTHidden hid = model->forward_hidden(xt, sigma.to(dtype), dropout);
  auto flat_xt = xt.reshape({-1});
  // Absorbing: only masked positions have a loss; uniform: every position does.
  torch::Tensor rows = graph.absorbing() ? (flat_xt == N).nonzero().squeeze(1)
                                         : torch::arange(B * L, flat_xt.options());
  auto batch = torch::div(rows, L, "floor");
  auto feats = model->output_features(hid, rows);
  auto sig = sigma.index_select(0, batch), e = exp_minus_one(sig);
  OutputLossRows r;
  r.target = x0.reshape({-1}).index_select(0, rows);
  RowLoss kind = RowLoss::SeddAbsorb;
  if (graph.absorbing()) {
    r.a = model->score_shift(sig);
    r.b = 1 / e;
  } else {
    kind = RowLoss::SeddUniform;
    r.current = flat_xt.index_select(0, rows);
    r.a = 1 / e;
    r.b = e / (e + static_cast<double>(N));
  }
  auto& out = model->output_layer->linear;
  auto loss_rows = fused_output_loss(kind, feats, out->weight, out->bias, r, N, model->bf16, options.chunk_elems);
  auto per_seq = torch::zeros({B}, loss_rows.options()).index_add_(0, batch, loss_rows);
  return (per_seq * dsigma.to(per_seq.scalar_type())).to(dtype);
}

void DDiTScore::evaluate(const torch::Tensor& x, const torch::Tensor& sigma) {
  torch::NoGradGuard ng;
  sigma_ = sigma.to(torch::kFloat);
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
  auto batch = torch::div(rows, L, "floor");
  if (model_->cfg.scale_by_sigma) raw = raw + model_->score_shift(sigma_.index_select(0, batch)).unsqueeze(1);
  auto current = last_x_.view({-1}).index_select(0, rows).unsqueeze(1);
  return raw.scatter(1, current, 0.0f);
}

}  // namespace sedd
