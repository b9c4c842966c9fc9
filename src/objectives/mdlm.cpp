// Masked diffusion (Sahoo et al. 2024, MDLM; docs/DESIGN.md, "Objectives"): on the absorbing graph,
// the network's output read as logits of the clean token with the mask excluded (SUBS), and
//   -log p(x0) <= int_0^1 sigma'(t) / (e^sigma(t) - 1) sum_{masked l} -log p(x0_l | x_t) dt
// (-alpha'/(1 - alpha) with alpha = e^-sigma), plus the prior term. Sampling: ancestral steps
// x_t -> x_s through the x0-parameterised posterior on `steps` equal steps of [0, 1].
#include "objectives/mdlm.h"

#include "diffusion/times.h"
#include "io/error.h"
#include "objectives/rows.h"

namespace sedd {

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

namespace {

class Mdlm final : public Objective {
 public:
  std::string name() const override { return "mdlm"; }
  NetworkShape network(const ModelConfig&) const override { return {false, true, false}; }
  void check(const ModelConfig& m) const override {
    SEDD_CHECK(m.graph == "absorb", "diffusion.objective = mdlm is masked diffusion: it needs diffusion.graph = absorb");
    refuse_score_scaling(m, name());
  }
  // MDLM's recipe (its config.yaml and diffusion.py).
  std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig&) const override {
    return masked_diffusion_defaults();
  }

  TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws& d) const override {
    auto t = training_time(d.u);
    auto sigma = p.noise.total(t);
    return {t, sigma, corrupt_keyed(p.graph, x0, sigma, d)};
  }
  torch::Tensor loss(DDiT& model, const Process& p, const torch::Tensor& x0, const TrainingDraw& d,
                     const DropoutKey* dropout, const LossOptions& o) const override {
    return mdlm_sequence_loss(model, p.graph, p.noise, d.xt, x0, d.t, dropout, o);
  }
  bool loss_on_masked_rows(const ModelConfig&) const override { return true; }

  BoundPoint bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                         const KeyedCorruption& k) const override {
    BoundPoint pt = continuous_bound_point(p, u, x0, k);
    pt.weight = p.noise.rate(u) / torch::expm1(pt.sigma);
    return pt;
  }
  bool bound_on_masked_rows(const Process&) const override { return true; }
  torch::Tensor bound_terms(const Process&, const BoundPoint&, const torch::Tensor& out, const torch::Tensor&,
                            const torch::Tensor&, const torch::Tensor& x0_rows) const override {
    return -out.gather(1, x0_rows.unsqueeze(1)).squeeze(1);
  }

  std::string title() const override { return "mdlm (masked diffusion)"; }
  std::string sampling_manner() const override { return "ancestrally"; }
  std::string sampler_name(const SamplerConfig&) const override { return "ancestral"; }
  torch::Tensor sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                       const Constraint& constraint, const torch::Tensor& ids, torch::Device,
                       const std::function<void(int64_t, int64_t)>& progress) const override {
    std::vector<double> sigmas;  // once, on the host
    for (int64_t k = 0; k <= cfg.steps; ++k) {
      double t = 1.0 - static_cast<double>(k) / static_cast<double>(cfg.steps);
      sigmas.push_back(k == cfg.steps ? 0.0 : p.noise.total(torch::full({1}, t, torch::kDouble)).item<double>());
    }
    return sample_ancestral(p, model, length, cfg, constraint, ids, sigmas, progress);
  }
};

}  // namespace

const Objective& mdlm_objective() {
  static const Mdlm o;
  return o;
}

}  // namespace sedd
