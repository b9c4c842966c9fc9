// Discrete flow matching (Gat et al. 2024; Shaul et al. 2024; docs/DESIGN.md, "Discrete flow
// matching"), equal to Meta's flow_matching (path/mixture.py, loss/generalized_loss.py,
// solver/discrete_solver.py and its text example). On the mixture path x_t = x_0 with probability
// 1 - kappa_t, else the data token x_1, with x_0 from the source (the graph's limit: all masks for
// absorb, uniform tokens for uniform) and kappa_t = t^n, the network gives logits of x_1 over every
// output column (the mask's included, as in their text model). Losses per position:
//   generalized KL  -w (p(x_t) - [x_t = x_1] + [x_t != x_1] log p(x_1)),  w = kappa'/(1 - kappa),
//                   t ~ U[0, 1 - 1e-3) (w diverges at 1); its time integral bounds -log p(x_1);
//   cross entropy   -log p(x_1), t ~ U[0, 1).
// Sampling: their Euler solver on t_0 + h i (h = 1/steps) and t_f; each step draws x_1 ~ p, and
// jumps with probability 1 - exp(-h lambda) to a token drawn from the velocity (lambda its total);
// the last step takes x_1. The bound integrates the generalized KL over kappa in (0, 1) (weight
// 1/(1 - kappa)): with the mask source and a denoiser that obeys SUBS it is MDLM's integrand.
#include "objectives/dfm.h"

#include <cmath>

#include "objectives/output_loss.h"
#include "io/error.h"
#include "objectives/rows.h"

namespace sedd {

torch::Tensor dfm_kappa(const torch::Tensor& t, double n) { return t.to(torch::kDouble).pow(n); }

torch::Tensor dfm_kappa_rate(const torch::Tensor& t, double n) { return n * t.to(torch::kDouble).pow(n - 1); }

torch::Tensor dfm_path(const torch::Tensor& x0, const torch::Tensor& x1, const torch::Tensor& kappa,
                       const torch::Tensor& u) {
  return torch::where(u < (1 - kappa.to(torch::kDouble)).unsqueeze(1), x0, x1);
}

torch::Tensor dfm_generalized_kl(const torch::Tensor& log_p, const torch::Tensor& x1, const torch::Tensor& xt,
                                 const torch::Tensor& w) {
  auto log_p_x1 = log_p.gather(1, x1.unsqueeze(1)).squeeze(1);
  auto p_xt = log_p.gather(1, xt.unsqueeze(1)).squeeze(1).exp();
  auto same = (xt == x1).to(log_p.scalar_type());
  return -w.to(log_p.scalar_type()) * (p_xt - same + (1 - same) * log_p_x1);
}

std::vector<double> dfm_time_grid(double step_size, double t0, double t_final) {
  const auto n = static_cast<int64_t>(std::ceil((t_final - t0) / step_size));
  std::vector<double> grid;
  for (int64_t i = 0; i < n; ++i) grid.push_back(t0 + step_size * static_cast<double>(i));
  grid.push_back(t_final);
  return grid;
}

torch::Tensor dfm_velocity(const torch::Tensor& x1, const torch::Tensor& xt, double kappa, double kappa_rate,
                           double corrector, const torch::Tensor& p0, int64_t width) {
  const auto dtype = p0.scalar_type();
  auto delta1 = torch::nn::functional::one_hot(x1, width).to(dtype);
  auto u = kappa_rate / (1 - kappa) * delta1;
  if (corrector > 0)
    u = u + corrector * kappa_rate / (kappa * (1 - kappa)) * ((1 - kappa) * p0.unsqueeze(0) + kappa * delta1);
  return u.scatter(1, xt.unsqueeze(1), 0.0);
}

double dfm_corrector(const SamplerConfig& cfg, double t) {
  if (cfg.corrector_a <= 0) return 0.0;
  return cfg.corrector_a * std::pow(t, cfg.corrector_b) * std::pow(1 - t, cfg.corrector_c);
}

namespace {

constexpr double kGeneralizedKlTimeEps = 1e-3;  // their time_epsilon (examples/text/train.py)

bool generalized_kl(const ModelConfig& m) { return m.dfm_loss == "generalized_kl"; }
// The end of the training times and of the sampler's grid.
double final_time(const ModelConfig& m) { return generalized_kl(m) ? 1 - kGeneralizedKlTimeEps : 1.0; }

// The path's source tokens and the move uniforms of x1 [B, L] under keyed streams.
torch::Tensor keyed_path(const Graph& g, const torch::Tensor& x1, const torch::Tensor& kappa, const KeyedCorruption& k) {
  const int64_t L = x1.size(1);
  auto u = keyed_uniform(k.move, k.rows, L, torch::kDouble, k.col_offset);
  torch::Tensor x0;
  if (g.absorbing()) {
    x0 = torch::full_like(x1, g.tokens());
  } else {
    auto r = keyed_uniform(k.redraw, k.rows, L, torch::kDouble, k.col_offset);
    x0 = (r * static_cast<double>(g.tokens())).floor().clamp_max(static_cast<double>(g.tokens() - 1)).to(torch::kLong);
  }
  return dfm_path(x0, x1, kappa, u);
}

class Dfm final : public Objective {
 public:
  std::string name() const override { return "dfm"; }
  NetworkShape network(const ModelConfig& m) const override {
    const bool mask = m.graph == "absorb";
    return {false, mask, false, mask, /*embedding_std=*/1.0};  // their text model's nn.Embedding
  }
  void check(const ModelConfig& m) const override {
    SEDD_CHECK(m.source == "mask" || m.source == "uniform", "diffusion.source must be mask or uniform, got '{}'",
               m.source);
    const std::string graph = m.source == "mask" ? "absorb" : "uniform";
    SEDD_CHECK(m.graph == graph,
               "diffusion.source = {} needs diffusion.graph = {} (the source is the graph's limit); got graph {}",
               m.source, graph, m.graph);
    SEDD_CHECK(std::isfinite(m.kappa_power) && m.kappa_power > 0,
               "diffusion.kappa_power must be a positive number (kappa_t = t^n), got {}", m.kappa_power);
    SEDD_CHECK(m.dfm_loss == "generalized_kl" || m.dfm_loss == "cross_entropy",
               "diffusion.dfm_loss must be generalized_kl or cross_entropy, got '{}'", m.dfm_loss);
    refuse_score_scaling(m, name());
    require_time_conditioning_off_absorbing(m);
  }
  void refuse_own_settings(const ModelConfig& m) const override {
    SEDD_CHECK(m.source.empty(), "diffusion.source belongs to diffusion.objective = dfm, not '{}'", m.objective);
    SEDD_CHECK(m.kappa_power == 0, "diffusion.kappa_power belongs to diffusion.objective = dfm, not '{}'", m.objective);
    SEDD_CHECK(m.dfm_loss.empty(), "diffusion.dfm_loss belongs to diffusion.objective = dfm, not '{}'", m.objective);
  }
  // Their text example (examples/text/configs/config.yaml, train.py, logic/training.py):
  // time-conditioned, the token mean of the loss, no EMA, Adam beta2 0.95, a cosine to 0.1 lr.
  std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig& m) const override {
    return {{"diffusion.source", "mask"},
            {"diffusion.graph", m.source == "uniform" ? "uniform" : "absorb"},
            {"diffusion.kappa_power", "1"},
            {"diffusion.dfm_loss", "generalized_kl"},
            {"model.time_conditioning", "true"},
            {"model.scale_by_sigma", "false"},
            {"train.time_sampling", "iid"},
            {"train.warmup_from_zero", "false"},
            {"train.loss_mean", "token"},
            {"train.ema", "0"},
            {"train.beta2", "0.95"},
            {"train.schedule", "cosine"},
            {"train.min_lr_ratio", "0.1"}};
  }
  void fingerprint(const ModelConfig& m, double, nlohmann::json& f) const override {
    f["diffusion.source"] = m.source;
    f["diffusion.kappa_power"] = m.kappa_power;
    f["diffusion.dfm_loss"] = m.dfm_loss;
  }
  std::string describe(const ModelConfig& m) const override { return "dfm-" + m.source; }

  TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws& d) const override {
    auto t = d.u.to(torch::kDouble) * final_time(p.model);
    auto xt = keyed_path(p.graph, x0, dfm_kappa(t, p.model.kappa_power), training_corruption(d));
    return {t, t, xt};
  }
  torch::Tensor loss(DDiT& model, const Process& p, const torch::Tensor& x1, const TrainingDraw& d,
                     const DropoutKey* dropout, const LossOptions& o) const override {
    const auto dtype = model->vocab_embed->embedding.scalar_type();
    const int64_t B = x1.size(0), L = x1.size(1), V = p.model.vocab_dim();
    DDiTHidden hid = model->forward_hidden(d.xt, d.conditioning.to(dtype), dropout);
    auto flat_x1 = x1.reshape({-1}), flat_xt = d.xt.reshape({-1});
    auto rows = torch::arange(B * L, flat_x1.options());
    if (!generalized_kl(p.model))
      return weighted_cross_entropy(model, hid, rows, flat_x1, torch::ones({B * L}, x1.options().dtype(torch::kDouble)),
                                    B, o, V)
          .to(dtype);
    auto batch = torch::div(rows, L, "floor");
    auto w = (dfm_kappa_rate(d.t, p.model.kappa_power) / (1 - dfm_kappa(d.t, p.model.kappa_power))).index_select(0, batch);
    auto feats = model->output_features(hid, rows);
    torch::Tensor per_row;
    if (!o.fused) {
      auto log_p = torch::log_softmax(model->output_logits(feats), 1);
      per_row = dfm_generalized_kl(log_p, flat_x1, flat_xt, w);
    } else {
      // Every position carries a term (the mask's probability is not forced to 0), so every row is
      // projected: the chunked cross entropy gives -log p(x_1) = lse - z(x_1); the logits at x_1
      // and x_t (two dot products per row) give lse and so p(x_t).
      auto& out = model->output_layer->linear;
      OutputLossRows r;
      r.target = flat_x1;
      auto ce = fused_output_loss(RowLoss::CrossEntropy, feats, out->weight, out->bias, r, V, model->bf16,
                                  o.chunk_elems);
      auto logit_at = [&](const torch::Tensor& ids) {
        auto z = (feats.to(out->weight.scalar_type()) * out->weight.index_select(0, ids)).sum(1);
        if (out->bias.defined()) z = z + out->bias.index_select(0, ids);
        return z.to(ce.scalar_type());
      };
      auto same = flat_xt == flat_x1;
      auto p_xt = torch::exp(logit_at(flat_xt) - (ce + logit_at(flat_x1)));
      auto wd = w.to(ce.scalar_type());
      per_row = torch::where(same, wd * (1 - torch::exp(-ce)), wd * (ce - p_xt));
    }
    return torch::zeros({B}, per_row.options()).index_add_(0, batch, per_row).to(dtype);
  }

  // kappa = u: the integral over t with weight kappa'/(1 - kappa) is the one over kappa with 1/(1 - kappa).
  BoundPoint bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                         const KeyedCorruption& k) const override {
    BoundPoint pt;
    pt.u = u;
    auto kappa = u.to(torch::kDouble);
    pt.conditioning = kappa.pow(1.0 / p.model.kappa_power);
    pt.xt = keyed_path(p.graph, x0, kappa, k);
    pt.weight = 1 / (1 - kappa);
    return pt;
  }
  bool bound_on_masked_rows(const Process&) const override { return false; }
  torch::Tensor bound_terms(const Process&, const BoundPoint&, const torch::Tensor& out, const torch::Tensor&,
                            const torch::Tensor& xt_rows, const torch::Tensor& x0_rows) const override {
    return dfm_generalized_kl(out, x0_rows, xt_rows, torch::ones({out.size(0)}, out.options()));
  }
  // The source does not depend on the data: the sampler starts from it exactly.
  double prior_nats_per_token(const Process&) const override { return 0.0; }

  std::string title() const override { return "dfm (flow matching)"; }
  std::string sampling_manner() const override { return "with the Euler solver"; }
  std::vector<std::string> sampler_options() const override { return {"corrector", "float32-draws"}; }
  void check_sampler(const SamplerConfig& cfg) const override {
    const double tf = final_time(cfg.model);
    SEDD_CHECK_OPTION(tf > 1.0 / static_cast<double>(cfg.steps),
                      "--steps {}: the step 1/{} leaves no step in the solver's interval [0, {}]", cfg.steps, cfg.steps,
                      tf);
  }
  std::string sampler_name(const SamplerConfig&) const override { return "euler"; }
  int64_t sampler_steps(const SamplerConfig& cfg, int64_t) const override {
    return static_cast<int64_t>(dfm_time_grid(1.0 / static_cast<double>(cfg.steps), 0, final_time(cfg.model)).size()) - 1;
  }
  torch::Tensor sample(const Process& p, ScoreModel& model, int64_t L, const SamplerConfig& cfg,
                       const Constraint& constraint, const torch::Tensor& ids, torch::Device,
                       const std::function<void(int64_t, int64_t)>& progress) const override {
    const Graph& graph = p.graph;
    const int64_t B = ids.size(0), V = p.model.vocab_dim();
    const double n = p.model.kappa_power;
    const auto dtype = cfg.float32_draws ? torch::kFloat : torch::kDouble;
    const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(ids.device());
    // The source distribution p_0 over the output columns (the corrector's).
    torch::Tensor p0 = graph.absorbing()
                           ? torch::nn::functional::one_hot(torch::full({1}, graph.tokens(), torch::kLong), V)
                                 .squeeze(0)
                                 .to(dtype)
                           : torch::full({V}, 1.0 / static_cast<double>(V), torch::kDouble).to(dtype);
    p0 = p0.to(ids.device());
    const auto grid = dfm_time_grid(1.0 / static_cast<double>(cfg.steps), 0.0, final_time(p.model));
    const int64_t steps = static_cast<int64_t>(grid.size()) - 1;
    torch::Tensor x = start_tokens(graph, cfg, ids, L);
    const int64_t chunk = std::max<int64_t>(1, cfg.chunk_elems / V);
    for (int64_t i = 0; i < steps; ++i) {
      constraint.apply(x);
      const double t = grid[i], h = grid[i + 1] - grid[i];
      const double kappa = std::pow(t, n), rate = n * std::pow(t, n - 1), c = dfm_corrector(cfg, t);
      model.evaluate(x, torch::full({B}, t, dopts));
      auto flat = x.view({-1});
      auto next = flat.clone();  // every row reads the step's x_t
      RandomStream draw_x1{cfg.seed, purpose::kSample, static_cast<uint64_t>(3 * i)},
          draw_jump{cfg.seed, purpose::kSample, static_cast<uint64_t>(3 * i + 1)},
          draw_token{cfg.seed, purpose::kSample, static_cast<uint64_t>(3 * i + 2)};
      for (int64_t s = 0; s < B * L; s += chunk) {
        auto r = torch::arange(s, std::min(B * L, s + chunk), flat.options());
        auto batch = torch::div(r, L, "floor"), pos = r - batch * L, sample = ids.index_select(0, batch);
        auto x1 = keyed_categorical(model.rows(r).to(dtype).exp(), draw_x1, sample, pos * V);
        if (i == steps - 1) {
          next.index_copy_(0, r, x1);
          continue;
        }
        auto u = dfm_velocity(x1, flat.index_select(0, r), kappa, rate, c, p0, V);
        auto jump_u = keyed_uniform(draw_jump, sample, 1, torch::kDouble, pos).squeeze(1);
        auto jumps = (jump_u < 1 - torch::exp(-h * u.sum(1).to(torch::kDouble))).nonzero().squeeze(1);
        if (jumps.numel() == 0) continue;
        auto jr = r.index_select(0, jumps);
        next.index_copy_(0, jr,
                         keyed_categorical(u.index_select(0, jumps), draw_token, sample.index_select(0, jumps),
                                           pos.index_select(0, jumps) * V));
      }
      x = next.view({B, L});
      if (progress) progress(i + 1, steps);
    }
    constraint.apply(x);
    return x;
  }
};

}  // namespace

const Objective& dfm_objective() {
  static const Dfm o;
  return o;
}

}  // namespace sedd
