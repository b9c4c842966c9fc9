// Sampling; see sampling.h.
#include "objectives/sampling.h"

#include <cmath>

#include "io/error.h"
#include "objectives/objective.h"

namespace sedd {

torch::Tensor ScoreModel::log_score(const torch::Tensor& x, const torch::Tensor& sigma) {
  evaluate(x, sigma);
  auto out = rows(torch::arange(x.numel(), torch::TensorOptions().dtype(torch::kLong).device(x.device())));
  return out.view({x.size(0), x.size(1), out.size(-1)});
}

void ScoreModel::evaluate_with_clean(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&) {
  fail("this network does not read a clean sequence beside x_t (block diffusion only)");
}
void ScoreModel::evaluate_point(const torch::Tensor& xt, const torch::Tensor& sigma, const torch::Tensor& x0) {
  if (x0.defined()) {
    evaluate_with_clean(xt, sigma, x0);
  } else {
    evaluate(xt, sigma);
  }
}

void ScoreModel::set_context(const torch::Tensor&) { fail("this network has no block-diffusion context"); }
void ScoreModel::evaluate_block(const torch::Tensor&, const torch::Tensor&) {
  fail("this network has no block-diffusion context");
}

void SamplerConfig::validate() const {
  SEDD_CHECK_OPTION(predictor == "euler" || predictor == "analytic",
                    "--predictor must be euler or analytic, got '{}'", predictor);
  SEDD_CHECK_OPTION(temperature > 0, "--temperature must be positive, got {}", temperature);
  SEDD_CHECK_OPTION(top_p > 0 && top_p <= 1, "--top-p must be in (0, 1], got {}", top_p);
  SEDD_CHECK_OPTION(steps >= 1, "--steps must be at least 1, got {}", steps);
  SEDD_CHECK_OPTION(block_sampler == "first-hitting" || block_sampler == "ddpm",
                    "--block-sampler must be first-hitting or ddpm, got '{}'", block_sampler);
  SEDD_CHECK_OPTION(std::isfinite(stop_entropy) && stop_entropy >= 0,
                    "--stop-entropy must be a finite number >= 0 (0: off), got {}", stop_entropy);
  SEDD_CHECK_OPTION(eps > 0 && eps < 1, "sampling eps must be in (0, 1)");
  SEDD_CHECK_OPTION(chunk_elems > 0, "sampler chunk must be positive");
  SEDD_CHECK_OPTION(std::isfinite(corrector_a) && corrector_a >= 0 && std::isfinite(corrector_b) &&
                        std::isfinite(corrector_c),
                    "--corrector: the coefficient must be finite and >= 0, got {}", corrector_a);
  SEDD_CHECK_OPTION(corrector_a == 0 || corrector_b > 0,
                    "--corrector: c(t) = a t^b (1-t)^c must be 0 at t = 0 (b > 0): the solver divides by kappa_0 = 0 "
                    "there; got b = {}",
                    corrector_b);
  objective_of(model).check_sampler(*this);
}

void Constraint::validate(int64_t length, int64_t vocab) const {
  SEDD_CHECK_OPTION(positions.size() == tokens.size(), "conditioning: {} positions but {} tokens", positions.size(),
                    tokens.size());
  for (size_t i = 0; i < positions.size(); ++i) {
    SEDD_CHECK_OPTION(positions[i] >= 0 && positions[i] < length,
                      "conditioning position {} is outside the sequence (length {})", positions[i], length);
    SEDD_CHECK_OPTION(tokens[i] >= 0 && tokens[i] < vocab,
                      "conditioning token id {} at position {} is not in the vocabulary (size {})", tokens[i],
                      positions[i], vocab);
  }
  SEDD_CHECK_OPTION(context_length() <= length, "conditioning context of {} tokens is longer than the sequence ({})",
                    context_length(), length);
}

void Constraint::apply(torch::Tensor& x) const {
  if (context.defined()) x.narrow(1, 0, context.size(1)).copy_(context);
  if (positions.empty()) return;
  auto pos = torch::tensor(positions, torch::kLong).to(x.device());
  auto tok = torch::tensor(tokens, torch::kLong).to(x.device());
  x.index_copy_(1, pos, tok.unsqueeze(0).expand({x.size(0), -1}).contiguous());
}

torch::Tensor sample(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                     const SamplerConfig& cfg, const Constraint& constraint, const torch::Tensor& sample_ids,
                     torch::Device device, const std::function<void(int64_t, int64_t)>& progress) {
  cfg.validate();
  constraint.validate(length, graph.tokens());
  torch::NoGradGuard no_grad;
  const auto ids = sample_ids.to(device, torch::kLong);
  return objective_of(cfg.model).sample(Process{graph, noise, cfg.model}, model, length, cfg, constraint, ids, device,
                                         progress);
}

torch::Tensor sample_blocks(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t total_length,
                            int64_t window, int64_t block, const SamplerConfig& cfg, const Constraint& constraint,
                            const torch::Tensor& sample_ids, torch::Device device,
                            const std::function<void(int64_t, int64_t)>& progress) {
  SEDD_CHECK(block >= 1 && block < window, "--block-size must be in [1, {}) (the model's window), got {}", window, block);
  SEDD_CHECK(total_length > window, "block generation is for lengths beyond the window ({}), got {}", window,
             total_length);
  for (int64_t p : constraint.positions)
    SEDD_CHECK(p < window, "conditioning position {} lies beyond the first window ({} tokens): with block generation, "
               "only the first window can be conditioned (a prefix)", p, window);
  const int64_t blocks = 1 + (total_length - window + block - 1) / block;
  int64_t done_blocks = 0;
  auto report = [&](int64_t s, int64_t n) {
    if (progress) progress(done_blocks * n + s, blocks * n);
  };
  torch::Tensor out = sample(graph, noise, model, window, cfg, constraint, sample_ids, device, report);
  while (out.size(1) < total_length) {
    ++done_blocks;
    Constraint ctx;  // every sample continues its own text: a per-row context
    ctx.context = out.narrow(1, out.size(1) - (window - block), window - block).contiguous();
    SamplerConfig c = cfg;
    c.seed = cfg.seed ^ (0x9E3779B97F4A7C15ull * static_cast<uint64_t>(done_blocks));
    auto next = sample(graph, noise, model, window, c, ctx, sample_ids, device, report);
    out = torch::cat({out, next.narrow(1, window - block, block)}, 1);
  }
  return out.narrow(1, 0, total_length);
}

}  // namespace sedd
