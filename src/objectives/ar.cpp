// The autoregressive baseline (docs/DESIGN.md, "Objectives"): a causal network reads the
// end-of-text id followed by x0[:-1] and gives logits of the next token; the loss is the next-token
// cross entropy and the likelihood is exact (no bound, no Monte Carlo). Sampling: left to right with
// temperature and top-p, conditioned on a prefix only.
#include "io/error.h"
#include "objectives/rows.h"

namespace sedd {

namespace {

// Left to right: position j draws from p(x_j | bos, x_<j), with temperature and top-p.
torch::Tensor sample_autoregressive(ScoreModel& model, int64_t N, int64_t L, const SamplerConfig& cfg,
                                    const Constraint& constraint, const torch::Tensor& ids,
                                    const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t B = ids.size(0);
  std::vector<int64_t> fixed(L, -1);
  for (size_t i = 0; i < constraint.positions.size(); ++i) fixed[constraint.positions[i]] = constraint.tokens[i];
  int64_t prefix = 0;
  for (int64_t j = 0; j < constraint.context_length(); ++j) fixed[j] = std::max<int64_t>(fixed[j], 0);
  while (prefix < L && fixed[prefix] >= 0) ++prefix;
  for (int64_t j = prefix; j < L; ++j)
    SEDD_CHECK(fixed[j] < 0,
               "an autoregressive model conditions on a prefix only: position {} is fixed after free positions (--suffix "
               "and --fix beyond the prefix need a diffusion model)",
               j);
  const auto dtype = cfg.float64 ? torch::kDouble : torch::kFloat;
  auto x = torch::zeros({B, L}, ids.options());
  constraint.apply(x);
  auto zeros = torch::zeros({B}, torch::TensorOptions().dtype(torch::kDouble).device(ids.device()));
  for (int64_t j = prefix; j < L; ++j) {
    auto input = torch::cat({torch::full({B, 1}, cfg.model.bos, x.options()), x.narrow(1, 0, j)}, 1);  // [B, j + 1]
    model.evaluate(input, zeros);
    auto last = torch::arange(B, x.options()) * (j + 1) + j;
    auto logp = model.rows(last).to(dtype) / cfg.temperature;
    auto w = torch::softmax(logp, 1);
    if (cfg.top_p < 1) {  // the smallest set of most likely tokens holding top_p of the mass
      auto sorted = w.sort(1, /*descending=*/true);
      auto probs = std::get<0>(sorted), order = std::get<1>(sorted);
      auto before = probs.cumsum(1) - probs;
      w = torch::zeros_like(w).scatter(1, order, torch::where(before < cfg.top_p, probs, torch::zeros_like(probs)));
    }
    RandomStream stream{cfg.seed, purpose::kSample, static_cast<uint64_t>(j)};
    x.select(1, j).copy_(keyed_categorical(w, stream, ids, torch::full({B}, j * N, x.options())));
    if (progress) progress(j - prefix + 1, L - prefix);
  }
  return x;
}

class Ar final : public Objective {
 public:
  std::string name() const override { return "ar"; }
  NetworkShape network(const ModelConfig&) const override { return {true, false, false}; }
  void check(const ModelConfig& m) const override {
    refuse_score_scaling(m, name());
    SEDD_CHECK(!m.time_conditioning, "diffusion.objective = ar has no diffusion time: set model.time_conditioning = false");
  }
  std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig&) const override {
    return {{"model.time_conditioning", "false"},
            {"model.scale_by_sigma", "false"},
            {"train.time_sampling", "iid"},
            {"train.warmup_from_zero", "false"},
            {"train.loss_mean", "sequence"}};
  }

  // No time and no noise: the conditioning is 0 and the input the shifted sequence.
  TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws&) const override {
    return {torch::Tensor(), torch::zeros({x0.size(0)}, x0.options().dtype(torch::kDouble)),
            autoregressive_input(x0, p.model.bos)};
  }
  torch::Tensor loss(DDiT& model, const Process&, const torch::Tensor& x0, const TrainingDraw& d,
                     const DropoutKey* dropout, const LossOptions& o) const override {
    const auto dtype = model->vocab_embed->embedding.scalar_type();
    const int64_t B = x0.size(0), L = x0.size(1);
    auto flat_x0 = x0.reshape({-1});
    DDiTHidden hid = model->forward_hidden(d.xt, d.conditioning.to(dtype), dropout);
    auto rows = torch::arange(B * L, flat_x0.options());
    return weighted_cross_entropy(model, hid, rows, flat_x0, torch::ones({B * L}, x0.options().dtype(torch::kDouble)),
                                  B, o)
        .to(dtype);
  }

  bool exact(const ModelConfig&) const override { return true; }
  torch::Tensor exact_nll(const Process& p, ScoreModel& model, const torch::Tensor& x0, const torch::Tensor& rows,
                          int64_t chunk) const override {
    const int64_t B = x0.size(0);
    auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(x0.device());
    model.evaluate(autoregressive_input(x0, p.model.bos), torch::zeros({B}, dopts));
    return clean_token_nll(model, x0, rows, chunk);
  }
  BoundPoint bound_point(const Process&, const torch::Tensor&, const torch::Tensor&,
                         const KeyedCorruption&) const override {
    fail("the autoregressive likelihood is exact; no bound");
  }
  bool bound_on_masked_rows(const Process&) const override { return false; }
  torch::Tensor bound_terms(const Process&, const BoundPoint&, const torch::Tensor&, const torch::Tensor&,
                            const torch::Tensor&, const torch::Tensor&) const override {
    fail("the autoregressive likelihood is exact; no bound");
  }
  double prior_nats_per_token(const Process&) const override { return 0.0; }

  std::string title() const override { return "autoregressive"; }
  std::string sampling_manner() const override { return "left to right"; }
  std::vector<std::string> sampler_options() const override { return {"temperature", "top-p"}; }
  std::string sampler_name(const SamplerConfig&) const override { return "autoregressive"; }
  int64_t sampler_steps(const SamplerConfig&, int64_t length) const override { return length; }
  torch::Tensor sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                       const Constraint& constraint, const torch::Tensor& ids, torch::Device,
                       const std::function<void(int64_t, int64_t)>& progress) const override {
    return sample_autoregressive(model, p.graph.tokens(), length, cfg, constraint, ids, progress);
  }
};

}  // namespace

const Objective& ar_objective() {
  static const Ar o;
  return o;
}

}  // namespace sedd
