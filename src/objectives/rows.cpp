// Machinery the objectives share; see rows.h.
#include "objectives/rows.h"

#include "objectives/output_loss.h"
#include "io/error.h"

#ifdef SEDD_HAVE_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace sedd {

#ifdef SEDD_HAVE_CUDA
struct PendingMaskedRows::Event {
  at::cuda::CUDAEvent event;
};
#else
struct PendingMaskedRows::Event {};
#endif

// nonzero() must read the count on the host, which waits for everything queued before it; the
// rows are instead gathered on the device at the count copied behind an event (see rows.h).
PendingMaskedRows::PendingMaskedRows(const torch::Tensor& xt, int64_t mask) : is_mask_(xt.reshape({-1}) == mask) {
#ifdef SEDD_HAVE_CUDA
  if (!is_mask_.is_cuda()) return;
  counted_ = std::make_unique<Event>();
  count_ = torch::empty({}, torch::TensorOptions().dtype(torch::kLong).pinned_memory(true));
  count_.copy_(is_mask_.sum(), /*non_blocking=*/true);
  counted_->event.record(c10::cuda::getCurrentCUDAStream(is_mask_.device().index()));
#endif
}

PendingMaskedRows::~PendingMaskedRows() = default;

torch::Tensor PendingMaskedRows::rows() {
  if (!count_.defined()) return is_mask_.nonzero().squeeze(1);
#ifdef SEDD_HAVE_CUDA
  counted_->event.synchronize();
#endif
  const int64_t k = count_.item<int64_t>();  // host memory: no device read
  // Masked position i goes to slot (masks up to and including i) - 1; the others to spare slot k.
  auto slot = torch::where(is_mask_, is_mask_.cumsum(0) - 1, k);
  auto index = torch::arange(is_mask_.numel(), slot.options());
  return torch::empty({k + 1}, slot.options()).scatter_(0, slot, index).narrow(0, 0, k);
}

torch::Tensor weighted_cross_entropy(DDiT& model, const DDiTHidden& hid, const torch::Tensor& rows,
                                     const torch::Tensor& targets, const torch::Tensor& weights, int64_t B,
                                     const LossOptions& o, int64_t width) {
  const int64_t L = hid.h.size(1), N = width > 0 ? width : model->cfg.tokens;
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

std::vector<std::pair<std::string, std::string>> masked_diffusion_defaults() {
  return {{"model.time_conditioning", "false"},
          {"model.scale_by_sigma", "false"},
          {"train.time_sampling", "stratified"},
          {"train.warmup_from_zero", "true"},
          {"train.loss_mean", "token"}};
}

torch::Tensor clean_token_nll(ScoreModel& model, const torch::Tensor& x0, const torch::Tensor& rows, int64_t chunk) {
  const int64_t B = x0.size(0), L = x0.size(1);
  auto flat_x0 = x0.reshape({-1});
  auto per_seq = torch::zeros({B}, x0.options().dtype(torch::kDouble));
  for (int64_t i = 0; i < rows.size(0); i += chunk) {
    auto r = rows.narrow(0, i, std::min(chunk, rows.size(0) - i));
    auto logp = model.rows(r).to(torch::kDouble);
    per_seq.index_add_(0, torch::div(r, L, "floor"), -logp.gather(1, flat_x0.index_select(0, r).unsqueeze(1)).squeeze(1));
  }
  return per_seq;
}

KeyedCorruption training_corruption(const LossDraws& d) {
  return {RandomStream{d.seed, purpose::kCorrupt, d.step}, RandomStream{d.seed, purpose::kRedraw, d.step}, d.rows,
          torch::Tensor()};
}

void refuse_score_scaling(const ModelConfig& m, const std::string& objective) {
  SEDD_CHECK(!m.scale_by_sigma, "model.scale_by_sigma belongs to the score-entropy objective; set it to false for '{}'",
             objective);
}

void require_time_conditioning_off_absorbing(const ModelConfig& m) {
  SEDD_CHECK(m.time_conditioning || m.graph == "absorb",
             "model.time_conditioning = false needs the absorbing graph (the uniform score depends on sigma)");
}

torch::Tensor corrupt_keyed(const Graph& g, const torch::Tensor& x0, const torch::Tensor& sigma, const LossDraws& d) {
  return corrupt_keyed(g, x0, sigma, training_corruption(d));
}

torch::Tensor corrupt_keyed(const Graph& g, const torch::Tensor& x0, const torch::Tensor& sigma,
                            const KeyedCorruption& k) {
  return g.corrupt(x0, sigma, k.move, k.redraw, k.rows, k.col_offset);
}

BoundPoint continuous_bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                                  const KeyedCorruption& k) {
  BoundPoint pt;
  pt.u = u;
  pt.sigma = pt.conditioning = p.noise.total(u);
  pt.xt = corrupt_keyed(p.graph, x0, pt.sigma, k);
  return pt;
}

torch::Tensor autoregressive_input(const torch::Tensor& x0, int64_t bos) {
  SEDD_CHECK(bos >= 0, "autoregressive model: no first input token (bos) is set");
  return torch::cat({torch::full({x0.size(0), 1}, bos, x0.options()), x0.narrow(1, 0, x0.size(1) - 1)}, 1);
}

torch::Tensor changeable_rows(const Graph& graph, const torch::Tensor& flat) {
  if (graph.absorbing()) return (flat == graph.tokens()).nonzero().squeeze(1);
  return torch::arange(flat.numel(), flat.options());
}

void redraw_rows(torch::Tensor& flat, const torch::Tensor& rows, int64_t L, int64_t dim, int64_t chunk_elems,
                 const RandomStream& stream, const torch::Tensor& ids,
                 const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>& weights) {
  const int64_t chunk = std::max<int64_t>(1, chunk_elems / dim);
  for (int64_t i = 0; i < rows.size(0); i += chunk) {
    auto r = rows.narrow(0, i, std::min(chunk, rows.size(0) - i));
    auto batch = torch::div(r, L, "floor"), pos = r - batch * L;
    flat.index_copy_(0, r, keyed_categorical(weights(r, batch), stream, ids.index_select(0, batch), pos * dim));
  }
}

torch::Tensor start_tokens(const Graph& graph, const SamplerConfig& cfg, const torch::Tensor& ids, int64_t L) {
  if (graph.absorbing()) return torch::full({ids.size(0), L}, graph.tokens(), ids.options());
  auto u = keyed_uniform(RandomStream{cfg.seed, purpose::kSampleStart, 0}, ids, L, torch::kDouble);
  return (u * static_cast<double>(graph.dim())).floor().clamp_max(static_cast<double>(graph.dim() - 1)).to(torch::kLong);
}

torch::Tensor sample_ancestral(const Process& p, ScoreModel& model, int64_t L, const SamplerConfig& cfg,
                               const Constraint& constraint, const torch::Tensor& ids,
                               const std::vector<double>& sigmas,
                               const std::function<void(int64_t, int64_t)>& progress) {
  const Graph& graph = p.graph;
  const int64_t B = ids.size(0), dim = graph.dim();
  const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(ids.device());
  const int64_t steps = static_cast<int64_t>(sigmas.size()) - 1;
  const auto dtype = cfg.float64 ? torch::kDouble : torch::kFloat;
  torch::Tensor x = start_tokens(graph, cfg, ids, L);
  for (int64_t k = 0; k < steps; ++k) {
    constraint.apply(x);
    auto sigma_t = torch::full({B}, sigmas[k], dopts);
    model.evaluate(x, sigma_t);
    auto flat = x.view({-1});
    RandomStream stream{cfg.seed, purpose::kSample, static_cast<uint64_t>(k)};
    redraw_rows(flat, changeable_rows(graph, flat), L, dim, cfg.chunk_elems, stream, ids,
                [&](const torch::Tensor& r, const torch::Tensor&) {
                  const auto n = r.size(0);
                  auto p0 = model.rows(r).to(dtype).exp();
                  return graph
                      .model_posterior(flat.index_select(0, r), p0, torch::full({n}, sigmas[k + 1], dopts).to(dtype),
                                       torch::full({n}, sigmas[k], dopts).to(dtype))
                      .clamp_min(0);
                });
    if (progress) progress(k + 1, steps);
  }
  constraint.apply(x);
  return x;
}

}  // namespace sedd
