// D3PM (Austin et al. 2021; docs/DESIGN.md, "Objectives"): the discrete-time chain of T steps on our
// schedules (src/diffusion/discrete.h). Loss: for one step t ~ U{1..T},
//   T KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))   (the t = 1 term is -log p(x0 | x1))
// plus lambda_ce sum_l -log p(x0_l | x_t) (the hybrid loss); the network gives logits of the clean
// token and p(x_{t-1} | x_t) is the x0-parameterised posterior. The bound is the KL part plus
// KL(q(x_T | x0) || p_base). Sampling: ancestral steps over min(steps, T) of the T steps.
#include <cmath>
#include <optional>

#include "diffusion/discrete.h"
#include "io/error.h"
#include "objectives/rows.h"

namespace sedd {

namespace {

class D3pm final : public Objective {
 public:
  std::string name() const override { return "d3pm"; }
  NetworkShape network(const ModelConfig& m) const override { return {false, m.graph == "absorb", false}; }
  void check(const ModelConfig& m) const override {
    refuse_score_scaling(m, name());
    SEDD_CHECK(m.timesteps >= 2 && m.timesteps <= 100000, "diffusion.timesteps must be in [2, 100000] for d3pm, got {}",
               m.timesteps);
    require_time_conditioning_off_absorbing(m);
  }
  std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig&) const override {
    return {{"model.time_conditioning", "true"},
            {"model.scale_by_sigma", "false"},
            {"train.time_sampling", "iid"},
            {"train.warmup_from_zero", "false"},
            {"train.loss_mean", "sequence"}};
  }
  // Only d3pm reads the chain length and the cross-entropy weight (they change its loss).
  void fingerprint(const ModelConfig& m, double lambda_ce, nlohmann::json& f) const override {
    f["diffusion.timesteps"] = m.timesteps;
    f["diffusion.lambda_ce"] = lambda_ce;
  }
  std::string describe(const ModelConfig& m) const override { return "d3pm-" + m.graph; }

  // t: the step in {1..T} (int64); conditioning: its noise level.
  TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws& d) const override {
    const int64_t T = p.model.timesteps;
    auto step = discrete_step(d.u, T);
    auto sigma_t = discrete_sigma(p.noise, step, T);
    return {step, sigma_t, corrupt_keyed(p.graph, x0, sigma_t, d)};
  }
  torch::Tensor loss(DDiT& model, const Process& p, const torch::Tensor& x0, const TrainingDraw& d,
                     const DropoutKey* dropout, const LossOptions& o) const override {
    const Graph& graph = p.graph;
    const auto dtype = model->vocab_embed->embedding.scalar_type();
    const int64_t B = x0.size(0), L = x0.size(1), N = graph.tokens(), T = p.model.timesteps;
    auto flat_x0 = x0.reshape({-1});
    const auto& sigma_t = d.conditioning;
    auto sigma_s = discrete_sigma(p.noise, d.t - 1, T);
    std::optional<PendingMaskedRows> masked;  // before the forward: see PendingMaskedRows
    if (graph.absorbing()) masked.emplace(d.xt, N);
    DDiTHidden hid = model->forward_hidden(d.xt, sigma_t.to(dtype), dropout);
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
    auto xt_r = d.xt.reshape({-1}), ss = sigma_s.index_select(0, batch), st = sigma_t.index_select(0, batch);
    auto q = graph.posterior(xt_r, flat_x0, ss, st);
    auto pm = graph.model_posterior(xt_r, log_p0.exp(), ss, st);
    auto kl = (torch::xlogy(q, q) - q * torch::log(pm.clamp_min(1e-300))).sum(1);
    auto ce = -log_p0.gather(1, flat_x0.unsqueeze(1)).squeeze(1);
    auto per_row = static_cast<double>(T) * kl + o.lambda_ce * ce;
    return torch::zeros({B}, per_row.options()).index_add_(0, batch, per_row).to(dtype);
  }

  BoundPoint bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                         const KeyedCorruption& k) const override {
    const int64_t T = p.model.timesteps;
    BoundPoint pt;
    pt.u = u;
    auto step = discrete_step(u, T);
    pt.sigma = pt.conditioning = discrete_sigma(p.noise, step, T);
    pt.sigma_prev = discrete_sigma(p.noise, step - 1, T);
    pt.xt = corrupt_keyed(p.graph, x0, pt.sigma, k);
    pt.weight = torch::full_like(u, static_cast<double>(T));
    return pt;
  }
  bool bound_on_masked_rows(const Process& p) const override { return p.graph.absorbing(); }
  // KL between the true and the model's posterior over x_{t-1}.
  torch::Tensor bound_terms(const Process& p, const BoundPoint& pt, const torch::Tensor& out,
                            const torch::Tensor& batch, const torch::Tensor& xt_rows,
                            const torch::Tensor& x0_rows) const override {
    auto ss = pt.sigma_prev.index_select(0, batch), st = pt.sigma.index_select(0, batch);
    auto q = p.graph.posterior(xt_rows, x0_rows, ss, st), pm = p.graph.model_posterior(xt_rows, out.exp(), ss, st);
    return (torch::xlogy(q, q) - q * torch::log(pm.clamp_min(1e-300))).sum(1);
  }

  std::string title() const override { return "d3pm (discrete time)"; }
  std::string sampling_manner() const override { return "ancestrally"; }
  std::string sampler_name(const SamplerConfig&) const override { return "ancestral"; }
  int64_t sampler_steps(const SamplerConfig& cfg, int64_t) const override {
    return std::min(cfg.steps, cfg.model.timesteps);
  }
  torch::Tensor sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                       const Constraint& constraint, const torch::Tensor& ids, torch::Device,
                       const std::function<void(int64_t, int64_t)>& progress) const override {
    const int64_t T = p.model.timesteps, S = std::min(cfg.steps, T);
    std::vector<double> sigmas;  // once, on the host
    for (int64_t k = 0; k <= S; ++k) {
      int64_t t = static_cast<int64_t>(std::llround(static_cast<double>(T) * static_cast<double>(S - k) / S));
      sigmas.push_back(discrete_sigma(p.noise, torch::full({1}, t, torch::kLong), T).item<double>());
    }
    return sample_ancestral(p, model, length, cfg, constraint, ids, sigmas, progress);
  }
};

}  // namespace

const Objective& d3pm_objective() {
  static const D3pm o;
  return o;
}

}  // namespace sedd
