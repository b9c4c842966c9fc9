// Score entropy (Lou et al. 2024, SEDD; docs/DESIGN.md, "Objectives"): the network gives log
// concrete scores s(x_t, sigma)_y ~ log p_t(y)/p_t(x_t) and the loss is the denoising score entropy
//   sigma'(t) sum_l sum_{y != x_t^l} Q(x_t^l, y) [s_y - (p(y|x0)/p(x_t^l|x0)) log s_y + K(.)],
// whose time integral plus the prior term bounds -log p(x0). Sampling: Euler or analytic
// (Tweedie tau-leaping) predictors on linspace(1, eps, steps + 1), then a final denoising step.
#include "objectives/sedd.h"

#include <optional>

#include "diffusion/times.h"
#include "objectives/output_loss.h"
#include "io/error.h"
#include "objectives/rows.h"

namespace sedd {

torch::Tensor sequence_loss(const Graph& graph, const Noise& noise, const torch::Tensor& log_score,
                            const torch::Tensor& t, const torch::Tensor& xt, const torch::Tensor& x0) {
  auto tt = t.to(log_score.scalar_type());
  auto sigma = noise.total(tt), dsigma = noise.rate(tt);                       // [B]
  auto per_pos = graph.score_entropy(log_score, sigma.unsqueeze(-1), xt, x0);  // [B, L]
  return dsigma * per_pos.sum(-1);
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

SeddDraws sedd_training_draws(const Graph& graph, const Noise& noise, const torch::Tensor& x0, const LossDraws& d) {
  auto t = training_time(d.u);
  return {t, corrupt_keyed(graph, x0, noise.total(t), d)};
}

namespace {

// One reverse step (or the final denoising) for the rows that can change.
struct StepRule {
  const Graph& graph;
  const SamplerConfig& cfg;
  bool euler;
  bool drop_mask;  // final step of the absorbing graph: never end on a mask
};

// Weights [R, dim'] of the next token of rows with current tokens x_rows [R], from their
// log-scores; `rate_scale` [R] = dt * sigma'(t) (Euler), `dsigma` [R] (analytic/denoise).
torch::Tensor next_token_weights(const StepRule& rule, const torch::Tensor& log_score, const torch::Tensor& x_rows,
                                 const torch::Tensor& rate_scale, const torch::Tensor& dsigma) {
  const auto dtype = rule.cfg.float64 ? torch::kDouble : torch::kFloat;
  auto score = log_score.to(dtype).exp();
  torch::Tensor w;
  if (rule.euler) {
    auto rate = rate_scale.to(dtype).unsqueeze(-1) * rule.graph.reverse_rate(x_rows, score);
    w = torch::nn::functional::one_hot(x_rows, rule.graph.dim()).to(dtype) + rate;
  } else {
    auto ds = dsigma.to(dtype);
    w = rule.graph.staggered_score(score, ds) * rule.graph.transp_transition(x_rows, ds);
  }
  if (rule.drop_mask) w = w.narrow(-1, 0, rule.graph.tokens());
  return w.clamp_min(0);
}

torch::Tensor sample_sedd(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                          const SamplerConfig& cfg, const Constraint& constraint, const torch::Tensor& sample_ids,
                          torch::Device device, const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t B = sample_ids.size(0), L = length, dim = graph.dim();
  const auto ids = sample_ids.to(device, torch::kLong);
  const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(device);

  torch::Tensor x = start_tokens(graph, cfg, ids, L);
  // The time grid, once, on the host: no device read inside the loop.
  std::vector<double> grid(cfg.steps + 1);
  for (int64_t i = 0; i <= cfg.steps; ++i)
    grid[i] = 1.0 + (cfg.eps - 1.0) * static_cast<double>(i) / static_cast<double>(cfg.steps);
  const double dt = (1 - cfg.eps) / static_cast<double>(cfg.steps);

  auto one_step = [&](int64_t key, double t, double t_next, bool final_step) {
    auto tt = torch::full({B}, t, dopts);
    auto sigma = noise.total(tt);
    model.evaluate(x, sigma);
    StepRule rule{graph, cfg, cfg.predictor == "euler" && !final_step, final_step && graph.absorbing()};
    torch::Tensor rate_scale, dsigma;  // per sample [B]
    if (rule.euler) rate_scale = dt * noise.rate(tt);
    else dsigma = final_step ? sigma : sigma - noise.total(torch::full({B}, t_next, dopts));
    auto flat = x.view({-1});
    RandomStream stream{cfg.seed, purpose::kSample, static_cast<uint64_t>(key)};
    redraw_rows(flat, changeable_rows(graph, flat), L, dim, cfg.chunk_elems, stream, ids,
                [&](const torch::Tensor& r, const torch::Tensor& batch) {
                  return next_token_weights(rule, model.rows(r), flat.index_select(0, r),
                                            rule.euler ? rate_scale.index_select(0, batch) : torch::Tensor(),
                                            rule.euler ? torch::Tensor() : dsigma.index_select(0, batch));
                });
  };

  for (int64_t i = 0; i < cfg.steps; ++i) {
    constraint.apply(x);
    one_step(i, grid[i], grid[i + 1], false);
    if (progress) progress(i + 1, cfg.steps);
  }
  constraint.apply(x);
  if (cfg.denoise) {
    one_step(cfg.steps, cfg.eps, 0, true);
    constraint.apply(x);
  }
  return x;
}

class Sedd final : public Objective {
 public:
  std::string name() const override { return "sedd"; }
  NetworkShape network(const ModelConfig& m) const override { return {false, m.graph == "absorb", true}; }
  void check(const ModelConfig& m) const override {
    require_time_conditioning_off_absorbing(m);
    SEDD_CHECK(!m.scale_by_sigma || m.graph == "absorb",
               "model.scale_by_sigma is only defined for the absorbing graph; set it to false for '{}'", m.graph);
  }
  std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig& m) const override {
    return {{"model.time_conditioning", "true"},
            {"model.scale_by_sigma", m.graph == "absorb" ? "true" : "false"},
            {"train.time_sampling", "iid"},
            {"train.warmup_from_zero", "false"},
            {"train.loss_mean", "sequence"}};
  }
  std::string describe(const ModelConfig& m) const override { return "sedd-" + m.graph; }

  TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws& d) const override {
    auto s = sedd_training_draws(p.graph, p.noise, x0, d);
    return {s.t, p.noise.total(s.t), s.xt};
  }
  torch::Tensor loss(DDiT& model, const Process& p, const torch::Tensor& x0, const TrainingDraw& d,
                     const DropoutKey* dropout, const LossOptions& o) const override {
    return sedd_sequence_loss(model, p.graph, p.noise, d.xt, x0, d.t, dropout, o);
  }
  bool loss_on_masked_rows(const ModelConfig& m) const override { return m.graph == "absorb"; }

  BoundPoint bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                         const KeyedCorruption& k) const override {
    BoundPoint pt = continuous_bound_point(p, u, x0, k);
    pt.weight = p.noise.rate(u);
    return pt;
  }
  bool bound_on_masked_rows(const Process& p) const override { return p.graph.absorbing(); }
  torch::Tensor bound_terms(const Process& p, const BoundPoint& pt, const torch::Tensor& out,
                            const torch::Tensor& batch, const torch::Tensor& xt_rows,
                            const torch::Tensor& x0_rows) const override {
    return p.graph.score_entropy(out, pt.sigma.index_select(0, batch), xt_rows, x0_rows);
  }

  std::string title() const override { return "sedd (score entropy)"; }
  std::string sampling_manner() const override { return "with a predictor"; }
  std::vector<std::string> sampler_options() const override { return {"predictor"}; }
  std::string sampler_name(const SamplerConfig& cfg) const override { return cfg.predictor; }
  torch::Tensor sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                       const Constraint& constraint, const torch::Tensor& ids, torch::Device device,
                       const std::function<void(int64_t, int64_t)>& progress) const override {
    return sample_sedd(p.graph, p.noise, model, length, cfg, constraint, ids, device, progress);
  }
};

}  // namespace

const Objective& sedd_objective() {
  static const Sedd o;
  return o;
}

}  // namespace sedd
