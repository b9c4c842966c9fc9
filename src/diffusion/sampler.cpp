// Samplers; see sampler.h.
#include "diffusion/sampler.h"

#include "diffusion/discrete.h"
#include "diffusion/keyed_random.h"
#include "io/error.h"

namespace sedd {

torch::Tensor ScoreModel::log_score(const torch::Tensor& x, const torch::Tensor& sigma) {
  evaluate(x, sigma);
  auto out = rows(torch::arange(x.numel(), torch::TensorOptions().dtype(torch::kLong).device(x.device())));
  return out.view({x.size(0), x.size(1), out.size(-1)});
}

void SamplerConfig::validate() const {
  SEDD_CHECK_OPTION(predictor == "euler" || predictor == "analytic",
                    "--predictor must be euler or analytic, got '{}'", predictor);
  SEDD_CHECK_OPTION(temperature > 0, "--temperature must be positive, got {}", temperature);
  SEDD_CHECK_OPTION(top_p > 0 && top_p <= 1, "--top-p must be in (0, 1], got {}", top_p);
  SEDD_CHECK_OPTION(steps >= 1, "--steps must be at least 1, got {}", steps);
  SEDD_CHECK_OPTION(eps > 0 && eps < 1, "sampling eps must be in (0, 1)");
  SEDD_CHECK_OPTION(chunk_elems > 0, "sampler chunk must be positive");
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

// The rows of x [B, L] (flattened) that can change this step: the masked positions for the
// absorbing graph, every position for the uniform graph.
torch::Tensor changeable_rows(const Graph& graph, const torch::Tensor& flat) {
  if (graph.absorbing()) return (flat == graph.tokens()).nonzero().squeeze(1);
  return torch::arange(flat.numel(), flat.options());
}

// Redraws `rows` of `flat` chunk by chunk from weights(r, batch) [R, dim] (r: flat row ids, batch: their
// samples). Draw (sample id, position * dim) of `stream`: a sample's tokens never depend on the batch.
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

// The start of the reverse process: all masks (absorbing) or keyed uniform tokens.
torch::Tensor start_tokens(const Graph& graph, const SamplerConfig& cfg, const torch::Tensor& ids, int64_t L) {
  if (graph.absorbing()) return torch::full({ids.size(0), L}, graph.tokens(), ids.options());
  auto u = keyed_uniform(RandomStream{cfg.seed, purpose::kSampleStart, 0}, ids, L, torch::kDouble);
  return (u * static_cast<double>(graph.dim())).floor().clamp_max(static_cast<double>(graph.dim() - 1)).to(torch::kLong);
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

// Masked diffusion and D3PM: x_t -> x_s through the x0-parameterised posterior, on a grid of
// noise levels from sigma(1) down to 0 (clean), drawing only the rows that can change.
torch::Tensor sample_ancestral(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t L,
                               const SamplerConfig& cfg, const Constraint& constraint, const torch::Tensor& ids,
                               const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t B = ids.size(0), dim = graph.dim();
  const auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(ids.device());
  // Noise levels of the grid, once, on the host.
  std::vector<double> sigmas;
  if (cfg.objective.name == "d3pm") {
    const int64_t T = cfg.objective.timesteps, S = std::min(cfg.steps, T);
    for (int64_t k = 0; k <= S; ++k) {
      int64_t t = static_cast<int64_t>(std::llround(static_cast<double>(T) * static_cast<double>(S - k) / S));
      sigmas.push_back(discrete_sigma(noise, torch::full({1}, t, torch::kLong), T).item<double>());
    }
  } else {
    for (int64_t k = 0; k <= cfg.steps; ++k) {
      double t = 1.0 - static_cast<double>(k) / static_cast<double>(cfg.steps);
      sigmas.push_back(k == cfg.steps ? 0.0 : noise.total(torch::full({1}, t, torch::kDouble)).item<double>());
    }
  }
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
    auto input = torch::cat({torch::full({B, 1}, cfg.objective.bos, x.options()), x.narrow(1, 0, j)}, 1);  // [B, j + 1]
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

}  // namespace

torch::Tensor sample(const Graph& graph, const Noise& noise, ScoreModel& model, int64_t length,
                     const SamplerConfig& cfg, const Constraint& constraint, const torch::Tensor& sample_ids,
                     torch::Device device, const std::function<void(int64_t, int64_t)>& progress) {
  cfg.validate();
  constraint.validate(length, graph.tokens());
  torch::NoGradGuard no_grad;
  const auto ids = sample_ids.to(device, torch::kLong);
  const auto& name = cfg.objective.name;
  if (name == "sedd") return sample_sedd(graph, noise, model, length, cfg, constraint, ids, device, progress);
  if (name == "mdlm" || name == "d3pm") return sample_ancestral(graph, noise, model, length, cfg, constraint, ids, progress);
  SEDD_CHECK(name == "ar", "sampler: unknown objective '{}'", name);
  return sample_autoregressive(model, graph.tokens(), length, cfg, constraint, ids, progress);
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
