// Training losses of the objectives; see objective.h.
#include "model/objective.h"

#include "diffusion/discrete.h"
#include "diffusion/loss.h"
#include "diffusion/output_loss.h"
#include "io/error.h"

#include <optional>

#ifdef SEDD_HAVE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sedd {

namespace {

// sum over rows of weight * -log softmax(logits[:N])[target], per sequence [B].
torch::Tensor weighted_cross_entropy(DDiT& model, const DDiTHidden& hid, const torch::Tensor& rows,
                                     const torch::Tensor& targets, const torch::Tensor& weights, int64_t B,
                                     const LossOptions& o) {
  const int64_t L = hid.h.size(1), N = model->cfg.tokens;
  auto feats = model->output_features(hid, rows);
  OutputLossRows r;
  r.target = targets;
  auto& out = model->output_layer->linear;
  torch::Tensor loss_rows =
      o.fused ? fused_output_loss(RowLoss::CrossEntropy, feats, out->weight, out->bias, r, N, model->bf16, o.chunk_elems)
              : row_loss_from_logits(RowLoss::CrossEntropy, model->output_logits(feats), r, N);
  auto per_seq = torch::zeros({B}, loss_rows.options());
  return per_seq.index_add_(0, torch::div(rows, L, "floor"), loss_rows * weights.to(loss_rows.scalar_type()));
}

// The flat indices of the positions of x_t that hold the mask, ascending (what nonzero() gives),
// found without making the host wait for the forward pass. nonzero() must read the count on the
// host, which waits for everything queued before it; so the count is queued as soon as x_t is,
// copied to pinned host memory behind an event, and rows() (called once the forward is queued)
// waits on that event only: for the corruption and the work queued before it, never for the
// forward. The rows are then gathered on the device at that size, with no further host read.
// On the CPU the values are on the host anyway: nonzero(), as always.
class PendingMaskedRows {
 public:
  PendingMaskedRows(const torch::Tensor& xt, int64_t mask) : is_mask_(xt.reshape({-1}) == mask) {
#ifdef SEDD_HAVE_CUDA
    if (!is_mask_.is_cuda()) return;
    count_ = torch::empty({}, torch::TensorOptions().dtype(torch::kLong).pinned_memory(true));
    count_.copy_(is_mask_.sum(), /*non_blocking=*/true);
    counted_.record(c10::cuda::getCurrentCUDAStream(is_mask_.device().index()));
#endif
  }

  torch::Tensor rows() {
    if (!count_.defined()) return is_mask_.nonzero().squeeze(1);
#ifdef SEDD_HAVE_CUDA
    counted_.synchronize();
#endif
    const int64_t k = count_.item<int64_t>();  // host memory: no device read
    // Masked position i goes to slot (masks up to and including i) - 1; the others to spare slot k.
    auto slot = torch::where(is_mask_, is_mask_.cumsum(0) - 1, k);
    auto index = torch::arange(is_mask_.numel(), slot.options());
    return torch::empty({k + 1}, slot.options()).scatter_(0, slot, index).narrow(0, 0, k);
  }

 private:
  torch::Tensor is_mask_, count_;
#ifdef SEDD_HAVE_CUDA
  at::cuda::CUDAEvent counted_;
#endif
};

torch::Tensor corrupt(const Graph& g, const torch::Tensor& x0, const torch::Tensor& sigma, const LossDraws& d) {
  return g.corrupt(x0, sigma, RandomStream{d.seed, purpose::kCorrupt, d.step}, RandomStream{d.seed, purpose::kRedraw, d.step},
                   d.rows);
}

}  // namespace

torch::Tensor autoregressive_input(const torch::Tensor& x0, int64_t bos) {
  SEDD_CHECK(bos >= 0, "autoregressive model: no first input token (bos) is set");
  return torch::cat({torch::full({x0.size(0), 1}, bos, x0.options()), x0.narrow(1, 0, x0.size(1) - 1)}, 1);
}

torch::Tensor sedd_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
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
  // Absorbing: only masked positions have a loss (counted before the forward is queued); uniform:
  // every position does.
  std::optional<PendingMaskedRows> masked;
  if (graph.absorbing()) masked.emplace(xt, N);
  DDiTHidden hid = model->forward_hidden(xt, sigma.to(dtype), dropout);
  auto flat_xt = xt.reshape({-1});
  torch::Tensor rows = masked ? masked->rows() : torch::arange(B * L, flat_xt.options());
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

torch::Tensor mdlm_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                 const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                 const LossOptions& options) {
  const auto dtype = model->vocab_embed->embedding.scalar_type();
  SEDD_CHECK(graph.absorbing(), "mdlm loss: the masked-diffusion objective needs the absorbing graph");
  const int64_t B = xt.size(0), L = xt.size(1), N = graph.tokens();
  const auto td = t.to(torch::kDouble);
  auto sigma = noise.total(td), weight = noise.rate(td) / torch::expm1(sigma);  // -alpha'/(1 - alpha)
  PendingMaskedRows masked(xt, N);  // before the forward: see PendingMaskedRows
  DDiTHidden hid = model->forward_hidden(xt, sigma.to(dtype), dropout);
  auto rows = masked.rows();
  auto batch = torch::div(rows, L, "floor");
  return weighted_cross_entropy(model, hid, rows, x0.reshape({-1}).index_select(0, rows), weight.index_select(0, batch),
                                B, options)
      .to(dtype);
}

SeddDraws sedd_training_draws(const Graph& graph, const Noise& noise, const torch::Tensor& x0, const LossDraws& d) {
  auto t = training_time(d.u);
  return {t, corrupt(graph, x0, noise.total(t), d)};
}

torch::Tensor training_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& x0,
                            const LossDraws& d, const DropoutKey* dropout, const LossOptions& o) {
  const auto& cfg = model->cfg;
  const auto dtype = model->vocab_embed->embedding.scalar_type();
  const int64_t B = x0.size(0), L = x0.size(1), N = cfg.tokens;
  auto flat_x0 = x0.reshape({-1});
  if (cfg.objective == "sedd") {
    auto draws = sedd_training_draws(graph, noise, x0, d);
    return sedd_sequence_loss(model, graph, noise, draws.xt, x0, draws.t, dropout, o);
  }
  if (cfg.objective == "ar") {
    auto input = autoregressive_input(x0, cfg.bos);
    DDiTHidden hid = model->forward_hidden(input, torch::zeros({B}, x0.options().dtype(dtype)), dropout);
    auto rows = torch::arange(B * L, flat_x0.options());
    return weighted_cross_entropy(model, hid, rows, flat_x0, torch::ones({B * L}, x0.options().dtype(torch::kDouble)),
                                  B, o)
        .to(dtype);
  }
  if (cfg.objective == "mdlm") {
    auto t = training_time(d.u);
    return mdlm_sequence_loss(model, graph, noise, corrupt(graph, x0, noise.total(t), d), x0, t, dropout, o);
  }
  SEDD_CHECK(cfg.objective == "d3pm", "training_loss: unknown objective '{}'", cfg.objective);
  const int64_t T = cfg.timesteps;
  auto step = discrete_step(d.u, T);
  auto sigma_t = discrete_sigma(noise, step, T), sigma_s = discrete_sigma(noise, step - 1, T);
  auto xt = corrupt(graph, x0, sigma_t, d);
  std::optional<PendingMaskedRows> masked;  // before the forward: see PendingMaskedRows
  if (graph.absorbing()) masked.emplace(xt, N);
  DDiTHidden hid = model->forward_hidden(xt, sigma_t.to(dtype), dropout);
  if (graph.absorbing()) {
    // KL(q || p) of a masked position is a (-log p(x0)) with a = (alpha_{t-1} - alpha_t) / (1 - alpha_t).
    auto a = -torch::expm1(sigma_s - sigma_t) / -torch::expm1(-sigma_t) * torch::exp(-sigma_s);
    auto rows = masked->rows();
    auto batch = torch::div(rows, L, "floor");
    auto w = (static_cast<double>(T) * a + o.lambda_ce).index_select(0, batch);
    return weighted_cross_entropy(model, hid, rows, flat_x0.index_select(0, rows), w, B, o).to(dtype);
  }
  // Uniform graph: every position, the full KL between the posteriors over the vocabulary.
  auto rows = torch::arange(B * L, flat_x0.options());
  auto batch = torch::div(rows, L, "floor");
  auto logits = model->output_logits(model->output_features(hid, rows)).narrow(1, 0, N);
  auto log_p0 = torch::log_softmax(logits.to(torch::kDouble), 1);
  auto xt_r = xt.reshape({-1}), ss = sigma_s.index_select(0, batch), st = sigma_t.index_select(0, batch);
  auto q = graph.posterior(xt_r, flat_x0, ss, st);
  auto p = graph.model_posterior(xt_r, log_p0.exp(), ss, st);
  auto kl = (torch::xlogy(q, q) - q * torch::log(p.clamp_min(1e-300))).sum(1);
  auto ce = -log_p0.gather(1, flat_x0.unsqueeze(1)).squeeze(1);
  auto per_row = static_cast<double>(T) * kl + o.lambda_ce * ce;
  return torch::zeros({B}, per_row.options()).index_add_(0, batch, per_row).to(dtype);
}

}  // namespace sedd
