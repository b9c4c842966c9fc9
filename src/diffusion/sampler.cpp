// Samplers; see sampler.h.
#include "diffusion/sampler.h"

#include "diffusion/keyed_random.h"
#include "io/error.h"

namespace sedd {

torch::Tensor ScoreModel::log_score(const torch::Tensor& x, const torch::Tensor& sigma) {
  evaluate(x, sigma);
  auto out = rows(torch::arange(x.numel(), torch::TensorOptions().dtype(torch::kLong).device(x.device())));
  return out.view({x.size(0), x.size(1), out.size(-1)});
}

void SamplerConfig::validate() const {
  SEDD_CHECK(predictor == "euler" || predictor == "analytic", "--predictor must be euler or analytic, got '{}'",
             predictor);
  SEDD_CHECK(steps >= 1, "--steps must be at least 1, got {}", steps);
  SEDD_CHECK(eps > 0 && eps < 1, "sampling eps must be in (0, 1)");
  SEDD_CHECK(chunk_elems > 0, "sampler chunk must be positive");
}

void Constraint::validate(int64_t length, int64_t vocab) const {
  SEDD_CHECK(positions.size() == tokens.size(), "conditioning: {} positions but {} tokens", positions.size(),
             tokens.size());
  for (size_t i = 0; i < positions.size(); ++i) {
    SEDD_CHECK(positions[i] >= 0 && positions[i] < length, "conditioning position {} is outside the sequence (length {})",
               positions[i], length);
    SEDD_CHECK(tokens[i] >= 0 && tokens[i] < vocab, "conditioning token id {} at position {} is not in the vocabulary (size {})",
               tokens[i], positions[i], vocab);
  }
}

void Constraint::apply(torch::Tensor& x) const {
  if (positions.empty()) return;
  auto pos = torch::tensor(positions, torch::kLong).to(x.device());
  auto tok = torch::tensor(tokens, torch::kLong).to(x.device());
  x.index_copy_(1, pos, tok.unsqueeze(0).expand({x.size(0), -1}).contiguous());
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

}  // namespace

torch::Tensor sample(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                     const SamplerConfig& cfg, const Constraint& constraint, const torch::Tensor& sample_ids,
                     torch::Device device, const std::function<void(int64_t, int64_t)>& progress) {
  cfg.validate();
  constraint.validate(length, graph.tokens());
  torch::NoGradGuard no_grad;
  const int64_t B = sample_ids.size(0), L = length, dim = graph.dim();
  const auto ids = sample_ids.to(device, torch::kLong);
  const auto lopts = torch::TensorOptions().dtype(torch::kLong).device(device);
  const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(device);

  torch::Tensor x;
  if (graph.absorbing()) {
    x = torch::full({B, L}, graph.tokens(), lopts);
  } else {
    auto u = keyed_uniform(RandomStream{cfg.seed, purpose::kSampleStart, 0}, ids, L, torch::kDouble);
    x = (u * static_cast<double>(dim)).floor().clamp_max(static_cast<double>(dim - 1)).to(torch::kLong);
  }
  // The time grid, once, on the host: no device read inside the loop.
  std::vector<double> grid(cfg.steps + 1);
  for (int64_t i = 0; i <= cfg.steps; ++i)
    grid[i] = 1.0 + (cfg.eps - 1.0) * static_cast<double>(i) / static_cast<double>(cfg.steps);
  const double dt = (1 - cfg.eps) / static_cast<double>(cfg.steps);
  const int64_t chunk = std::max<int64_t>(1, cfg.chunk_elems / dim);

  auto one_step = [&](int64_t key, double t, double t_next, bool final_step) {
    auto tt = torch::full({B}, t, dopts);
    auto sigma = noise.total(tt);
    model.evaluate(x, sigma);
    StepRule rule{graph, cfg, cfg.predictor == "euler" && !final_step, final_step && graph.absorbing()};
    torch::Tensor rate_scale, dsigma;  // per sample [B]
    if (rule.euler) rate_scale = dt * noise.rate(tt);
    else dsigma = final_step ? sigma : sigma - noise.total(torch::full({B}, t_next, dopts));
    auto flat = x.view({-1});
    // Rows that can change: masked positions (absorbing), every position (uniform).
    torch::Tensor rows = graph.absorbing() ? (flat == graph.tokens()).nonzero().squeeze(1)
                                           : torch::arange(B * L, lopts);
    RandomStream stream{cfg.seed, purpose::kSample, static_cast<uint64_t>(key)};
    for (int64_t i = 0; i < rows.size(0); i += chunk) {
      auto r = rows.narrow(0, i, std::min(chunk, rows.size(0) - i));
      auto batch = torch::div(r, L, "floor"), pos = r - batch * L;
      auto x_rows = flat.index_select(0, r);
      auto w = next_token_weights(rule, model.rows(r), x_rows,
                                  rule.euler ? rate_scale.index_select(0, batch) : torch::Tensor(),
                                  rule.euler ? torch::Tensor() : dsigma.index_select(0, batch));
      auto drawn = keyed_categorical(w, stream, ids.index_select(0, batch), pos * dim);
      flat.index_copy_(0, r, drawn);
    }
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

}  // namespace sedd
