// Likelihood bound; see elbo.h.
#include "eval/elbo.h"

#include <cmath>

#include "diffusion/categorical.h"
#include "diffusion/loss.h"
#include "io/error.h"

namespace sedd {

void ElboConfig::validate() const {
  SEDD_CHECK(mc_samples >= 1, "--mc-samples must be at least 1, got {}", mc_samples);
  SEDD_CHECK(sampling == "iid" || sampling == "antithetic" || sampling == "stratified",
             "--sampling must be iid, antithetic or stratified, got '{}'", sampling);
  SEDD_CHECK(sampling != "antithetic" || mc_samples % 2 == 0, "--mc-samples must be even for antithetic sampling, got {}",
             mc_samples);
  SEDD_CHECK(mc_samples >= 2, "--mc-samples must be at least 2 to estimate the standard error");
}

torch::Tensor elbo_times(const ElboConfig& cfg, uint64_t index) {
  auto gen = keyed_generator(cfg.seed, 0x7157ull, index);
  const int64_t K = cfg.mc_samples;
  torch::Tensor u;
  if (cfg.sampling == "antithetic") {
    auto half = torch::rand({K / 2}, gen, torch::kDouble);
    u = torch::cat({half, 1 - half});
  } else if (cfg.sampling == "stratified") {
    u = (torch::arange(K, torch::kDouble) + torch::rand({K}, gen, torch::kDouble)) / static_cast<double>(K);
  } else {
    u = torch::rand({K}, gen, torch::kDouble);
  }
  return u.clamp(1e-6, 1 - 1e-6);
}

double prior_kl_per_token(const Graph& graph, const Noise& noise) {
  const double s1 = noise.total(torch::ones({1}, torch::kDouble)).item<double>();
  const double keep = std::exp(-s1), n = static_cast<double>(graph.tokens());
  if (graph.absorbing()) {
    // p_1(.|x0): keep on x0, (1-keep) on the mask. p_base: keep/n on each token, (1-keep) on the mask.
    return keep > 0 ? keep * std::log(n) : 0.0;
  }
  // p_1(.|x0) = keep onehot + (1-keep)/n; p_base uniform 1/n.
  const double on = keep + (1 - keep) / n, off = (1 - keep) / n;
  return on * std::log(on * n) + (n - 1) * (off > 0 ? off * std::log(off * n) : 0.0);
}

ElboResult elbo_batch(const Graph& graph, const Noise& noise, ScoreModel& model, const torch::Tensor& x0,
                      int64_t first_index, const ElboConfig& cfg, torch::Device device) {
  cfg.validate();
  torch::NoGradGuard ng;
  const int64_t B = x0.size(0), L = x0.size(1), K = cfg.mc_samples;
  torch::Tensor values = torch::empty({B, K}, torch::kDouble);
  std::vector<torch::Tensor> times;
  for (int64_t i = 0; i < B; ++i) times.push_back(elbo_times(cfg, static_cast<uint64_t>(first_index + i)));
  for (int64_t k = 0; k < K; ++k) {
    std::vector<torch::Tensor> ts, xts;
    for (int64_t i = 0; i < B; ++i) {
      uint64_t index = static_cast<uint64_t>(first_index + i);
      auto t = times[i].narrow(0, k, 1);
      auto gen = keyed_generator(cfg.seed, index, static_cast<uint64_t>(k) + 1);
      ts.push_back(t);
      xts.push_back(graph.sample_transition(x0[i], noise.total(t), gen));
    }
    auto t = torch::cat(ts).to(device);
    auto xt = torch::stack(xts).to(device);
    auto log_score = model.log_score(xt, noise.total(t).to(torch::kFloat)).to(torch::kDouble);
    values.select(1, k).copy_(sequence_loss(graph, noise, log_score, t, xt, x0.to(device)).cpu());
  }
  ElboResult r;
  r.prior_nats = prior_kl_per_token(graph, noise) * static_cast<double>(L);
  if (cfg.sampling == "antithetic") {  // the independent units are the pairs
    auto pairs = (values.narrow(1, 0, K / 2) + values.narrow(1, K / 2, K / 2)) / 2;
    r.bound = pairs.mean(1) + r.prior_nats;
    r.mc_variance = pairs.var(1) / static_cast<double>(K / 2);
  } else {  // stratified: the iid formula, which overstates its variance (conservative)
    r.bound = values.mean(1) + r.prior_nats;
    r.mc_variance = values.var(1) / static_cast<double>(K);
  }
  return r;
}

}  // namespace sedd
