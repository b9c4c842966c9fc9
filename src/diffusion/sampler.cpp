// Samplers; see sampler.h.
#include "diffusion/sampler.h"

#include "diffusion/categorical.h"
#include "io/error.h"

namespace sedd {

void SamplerConfig::validate() const {
  SEDD_CHECK(predictor == "euler" || predictor == "analytic", "--predictor must be euler or analytic, got '{}'",
             predictor);
  SEDD_CHECK(steps >= 1, "--steps must be at least 1, got {}", steps);
  SEDD_CHECK(eps > 0 && eps < 1, "sampling eps must be in (0, 1)");
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

torch::Tensor sample(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                     const SamplerConfig& cfg, const Constraint& constraint, std::vector<torch::Generator>& gens,
                     torch::Device device, const std::function<void(int64_t, int64_t)>& progress) {
  cfg.validate();
  constraint.validate(length, graph.tokens());
  torch::NoGradGuard no_grad;
  const int64_t B = static_cast<int64_t>(gens.size());
  const auto dtype = cfg.float64 ? torch::kDouble : torch::kFloat;
  auto time_opts = torch::TensorOptions().dtype(torch::kDouble).device(device);

  std::vector<torch::Tensor> starts;
  for (auto& g : gens) starts.push_back(graph.sample_limit({length}, g, device));
  torch::Tensor x = torch::stack(starts);
  auto grid = torch::linspace(1.0, cfg.eps, cfg.steps + 1, torch::kDouble);
  const double dt = (1 - cfg.eps) / static_cast<double>(cfg.steps);
  auto score_at = [&](const torch::Tensor& sigma_b) {  // sigma_b [B] double
    return model.log_score(x, sigma_b.to(torch::kFloat)).to(dtype).exp();
  };

  for (int64_t i = 0; i < cfg.steps; ++i) {
    constraint.apply(x);
    auto t = torch::full({B}, grid[i].item<double>(), time_opts);
    auto sigma = noise.total(t);
    if (cfg.predictor == "euler") {
      auto score = score_at(sigma);
      auto rate = (dt * noise.rate(t)).to(dtype).view({B, 1, 1}) * graph.reverse_rate(x, score);
      x = sample_categorical_rows(torch::nn::functional::one_hot(x, graph.dim()).to(dtype) + rate, gens);
    } else {
      auto dsigma = (sigma - noise.total(t - dt)).to(dtype).unsqueeze(-1);  // [B, 1]
      auto score = score_at(sigma);
      auto probs = graph.staggered_score(score, dsigma) * graph.transp_transition(x, dsigma);
      x = sample_categorical_rows(probs.clamp_min(0), gens);
    }
    if (progress) progress(i + 1, cfg.steps);
  }
  constraint.apply(x);
  if (cfg.denoise) {
    auto t = torch::full({B}, cfg.eps, time_opts);
    auto sigma = noise.total(t);
    auto s = sigma.to(dtype).unsqueeze(-1);
    auto probs = graph.staggered_score(score_at(sigma), s) * graph.transp_transition(x, s);
    if (graph.absorbing()) probs = probs.narrow(-1, 0, graph.tokens());  // never end on a mask
    x = sample_categorical_rows(probs.clamp_min(0), gens);
    constraint.apply(x);
  }
  return x;
}

}  // namespace sedd
