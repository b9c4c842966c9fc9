// Likelihood bound; see elbo.h.
#include "eval/elbo.h"

#include <cmath>

#include "diffusion/keyed_random.h"
#include "io/error.h"
#include "objectives/objective.h"

namespace sedd {

void ElboConfig::validate() const {
  SEDD_CHECK_OPTION(mc_samples >= 1, "--mc-samples must be at least 1, got {}", mc_samples);
  SEDD_CHECK_OPTION(sampling == "iid" || sampling == "antithetic" || sampling == "stratified",
                    "--sampling must be iid, antithetic or stratified, got '{}'", sampling);
  SEDD_CHECK_OPTION(sampling != "antithetic" || mc_samples % 2 == 0,
                    "--mc-samples must be even for antithetic sampling, got {}", mc_samples);
  SEDD_CHECK_OPTION(mc_samples >= 2, "--mc-samples must be at least 2 to estimate the standard error");
}

torch::Tensor elbo_times(const ElboConfig& cfg, const torch::Tensor& indices) {
  const int64_t K = cfg.mc_samples;
  RandomStream s{cfg.seed, purpose::kEvalTime, 0};
  torch::Tensor u;
  if (cfg.sampling == "antithetic") {
    auto half = keyed_uniform(s, indices, K / 2, torch::kDouble);
    u = torch::cat({half, 1 - half}, 1);
  } else if (cfg.sampling == "stratified") {
    auto k = torch::arange(K, indices.options().dtype(torch::kDouble));
    u = (k + keyed_uniform(s, indices, K, torch::kDouble)) / static_cast<double>(K);
  } else {
    u = keyed_uniform(s, indices, K, torch::kDouble);
  }
  return u.clamp(1e-6, 1 - 1e-6);
}

namespace {

// The bound of elbo_batch; with `scored_in` defined, the conditional one (conditional_elbo_batch).
// With `loss_mask_in` defined, only its positions are scored (elbo_batch's loss_mask).
ElboResult elbo_keyed_rows(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0_in,
                           const torch::Tensor& indices_in, const torch::Tensor& scored_in,
                           const torch::Tensor& loss_mask_in, const ElboConfig& cfg, torch::Device device) {
  cfg.validate();
  torch::NoGradGuard ng;
  auto x0 = x0_in.to(device);
  const int64_t B = x0.size(0), L = x0.size(1), K = cfg.mc_samples, dim = graph.dim();
  const auto lopts = torch::TensorOptions().dtype(torch::kLong).device(device);
  auto indices = indices_in.to(lopts);
  const bool conditional = scored_in.defined();
  torch::Tensor scored = conditional ? scored_in.to(device).to(torch::kBool) : torch::Tensor();
  const bool masked = loss_mask_in.defined();
  torch::Tensor loss_mask = masked ? loss_mask_in.to(device).to(torch::kBool) : torch::Tensor();
  torch::Tensor flat_loss_mask = masked ? loss_mask.reshape({-1}) : torch::Tensor();
  auto times = elbo_times(cfg, indices);  // [B, K]
  torch::Tensor values = torch::empty({B, K}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  const int64_t chunk = std::max<int64_t>(1, cfg.chunk_elems / dim);
  const Objective& obj = objective_of(cfg.model);
  const Process proc{graph, noise, cfg.model};
  // An exact likelihood replaces the bound's points (a conditional one keeps them: bd3 with blocks
  // of one token draws t = 1 at every point, so they agree without Monte Carlo error).
  const bool exact = obj.exact(cfg.model) && !conditional;
  auto flat_x0 = x0.reshape({-1});
  auto dopts = torch::TensorOptions().dtype(torch::kDouble).device(device);
  if (exact) {  // one pass, the same value in every column (no Monte Carlo error)
    auto all = masked ? flat_loss_mask.nonzero().squeeze(1) : torch::arange(B * L, lopts);
    values.copy_(obj.exact_nll(proc, model, x0, all, chunk).unsqueeze(1).expand({B, K}));
  }
  const bool masked_rows_only = obj.bound_on_masked_rows(proc);
  for (int64_t k = 0; k < K && !exact; ++k) {
    auto u = times.select(1, k).contiguous();
    auto offset = torch::full({B}, k * L, lopts);
    KeyedCorruption keys{RandomStream{cfg.seed, purpose::kEvalCorrupt, 0}, RandomStream{cfg.seed, purpose::kEvalRedraw, 0},
                         indices, offset};
    BoundPoint pt = obj.bound_point(proc, u, x0, keys);
    if (conditional) pt.xt = torch::where(scored, pt.xt, x0);  // the condition stays clean at every time
    model.evaluate_point(pt.xt, pt.conditioning, pt.clean);
    auto flat_xt = pt.xt.view({-1});
    auto flat_weight = pt.position_weight.defined() ? pt.position_weight.reshape({-1}) : torch::Tensor();
    // Unscored positions (loss_mask false) are corrupted and seen like the others, never scored.
    torch::Tensor rows = masked_rows_only ? (masked ? (flat_xt == graph.tokens()).logical_and(flat_loss_mask)
                                                    : (flat_xt == graph.tokens())).nonzero().squeeze(1)
                         : conditional ? scored.reshape({-1}).nonzero().squeeze(1)
                         : masked      ? flat_loss_mask.nonzero().squeeze(1)
                                       : torch::arange(B * L, lopts);
    auto per_seq = torch::zeros({B}, dopts);
    for (int64_t i = 0; i < rows.size(0); i += chunk) {
      auto r = rows.narrow(0, i, std::min(chunk, rows.size(0) - i));
      auto batch = torch::div(r, L, "floor");
      auto out = model.rows(r).to(torch::kDouble);
      auto terms = obj.bound_terms(proc, pt, out, batch, flat_xt.index_select(0, r), flat_x0.index_select(0, r));
      if (flat_weight.defined()) terms = terms * flat_weight.index_select(0, r);
      per_seq.index_add_(0, batch, terms);
    }
    values.select(1, k).copy_(pt.weight * per_seq);
  }
  values = values.cpu();
  ElboResult r;
  const double prior_per_token = obj.prior_nats_per_token(proc);
  r.prior_nats = prior_per_token * static_cast<double>(L);
  const bool per_row_prior = conditional || (masked && !exact);
  if (per_row_prior) {  // each row's own prior term, in its draws, so the results below include it
    r.prior_nats = prior_per_token;
    const auto& counted = conditional ? scored : loss_mask;
    values += (counted.sum(1).to(torch::kDouble).cpu() * r.prior_nats).unsqueeze(1);
  }
  const double prior_added = per_row_prior ? 0.0 : r.prior_nats;
  if (exact) {  // no Monte Carlo error
    r.bound = values.select(1, 0).clone();
    r.mc_variance = torch::zeros_like(r.bound);
  } else if (cfg.sampling == "antithetic" && K > 2) {  // the independent units are the pairs
    auto pairs = (values.narrow(1, 0, K / 2) + values.narrow(1, K / 2, K / 2)) / 2;
    r.bound = pairs.mean(1) + prior_added;
    r.mc_variance = pairs.var(1) / static_cast<double>(K / 2);
  } else if (cfg.sampling == "antithetic") {
    // One pair: no spread of pairs to estimate from. The iid formula over its two draws, Var/2 with
    // Var = (a - b)^2 / 2, has mean Var_t (1 - rho) / 2 against the pair mean's true variance
    // Var_t (1 + rho) / 2: an upper bound whenever the pair's draws are negatively correlated,
    // which is what antithetic draws are for (and never NaN).
    r.bound = values.mean(1) + prior_added;
    r.mc_variance = values.var(1) / static_cast<double>(K);
  } else {  // stratified: the iid formula, which overstates its variance (conservative)
    r.bound = values.mean(1) + prior_added;
    r.mc_variance = values.var(1) / static_cast<double>(K);
  }
  return r;
}

}  // namespace

ElboResult elbo_batch(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0,
                      int64_t first_index, const ElboConfig& cfg, torch::Device device, const torch::Tensor& loss_mask) {
  SEDD_CHECK(!loss_mask.defined() || loss_mask.sizes() == x0.sizes(), "elbo_batch: loss_mask must be shaped like x0");
  auto indices = torch::arange(first_index, first_index + x0.size(0), torch::kLong);
  return elbo_keyed_rows(graph, noise, model, x0, indices, torch::Tensor(), loss_mask, cfg, device);
}

ElboResult conditional_elbo_batch(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0,
                                  const torch::Tensor& scored, const torch::Tensor& indices, const ElboConfig& cfg,
                                  torch::Device device) {
  SEDD_CHECK(!cfg.model.causal(), "conditional_elbo_batch: the {} likelihood is exact; no bound",
             cfg.model.objective);
  SEDD_CHECK(scored.sizes() == x0.sizes() && indices.size(0) == x0.size(0),
             "conditional_elbo_batch: scored must be shaped like x0 and indices hold one key per row");
  return elbo_keyed_rows(graph, noise, model, x0, indices, scored, torch::Tensor(), cfg, device);
}

}  // namespace sedd
