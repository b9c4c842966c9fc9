// The autoregressive baseline: its exact likelihood and sampler against a Markov chain, and the
// tiny run.
#include <gtest/gtest.h>

#include <cmath>

#include "diffusion/discrete.h"
#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "eval/elbo.h"
#include "io/error.h"
#include "objectives/oracles.h"
#include "objectives/sampling.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// The exact next-token distribution of a first-order Markov chain (transition P, first token pi).
class MarkovOracle final : public ScoreModel {
 public:
  MarkovOracle(torch::Tensor P, torch::Tensor pi, int64_t bos) : P_(std::move(P)), pi_(std::move(pi)), bos_(bos) {}
  void evaluate(const torch::Tensor& x, const torch::Tensor&) override {
    // Position 0 holds bos: the first token follows pi; later ones follow P[previous].
    auto prev = x.clamp_max(P_.size(0) - 1);
    auto rows = P_.index_select(0, prev.reshape({-1})).view({x.size(0), x.size(1), -1});
    rows.select(1, 0).copy_(pi_.unsqueeze(0).expand({x.size(0), -1}));
    last_ = rows.clamp_min(1e-300).log();
  }
  torch::Tensor rows(const torch::Tensor& r) override { return last_.view({-1, last_.size(-1)}).index_select(0, r); }

 private:
  torch::Tensor P_, pi_, last_;
  int64_t bos_;
};



}  // namespace

// The autoregressive bound is the exact negative log-likelihood, and its sampler reproduces the
// chain's transition frequencies; top-p drops the unlikely continuation.
TEST(ObjectiveAutoregressive, ExactLikelihoodAndSamplerOfAMarkovChain) {
  const int64_t N = 4, L = 12, bos = 3;
  auto P = torch::tensor({{0.7, 0.2, 0.1, 0.0}, {0.1, 0.6, 0.3, 0.0}, {0.3, 0.3, 0.4, 0.0}, {0.0, 0.0, 0.0, 1.0}},
                         torch::kDouble);
  auto pi = torch::tensor({0.5, 0.3, 0.2, 0.0}, torch::kDouble);
  MarkovOracle oracle(P, pi, bos);
  auto g = make_graph("absorb", N);  // unused by the autoregressive paths but for the vocabulary
  auto noise = make_noise(NoiseConfig{});
  SamplerConfig sc;
  sc.model = test::objective_config("ar", 0, bos);
  sc.seed = 5;
  sc.float64 = true;
  auto x = sample(*g, *noise, oracle, L, sc, Constraint{}, torch::arange(3000, torch::kLong), torch::kCPU);
  // Transition frequencies from state 0 and the first-token frequencies against P and pi.
  auto from = x.narrow(1, 0, L - 1).reshape({-1}), to = x.narrow(1, 1, L - 1).reshape({-1});
  auto next0 = to.masked_select(from == 0);
  auto freq = torch::bincount(next0, {}, N).to(torch::kDouble) / static_cast<double>(next0.numel());
  EXPECT_LT((freq - P[0]).abs().max().item<double>(), 0.03) << freq;
  auto first = torch::bincount(x.select(1, 0), {}, N).to(torch::kDouble) / 3000.0;
  EXPECT_LT((first - pi).abs().max().item<double>(), 0.03) << first;
  // The bound is the exact log-likelihood of each sequence, with no Monte Carlo error.
  ElboConfig ec{2, "antithetic", 0};
  ec.model = sc.model;
  auto r = elbo_batch(*g, *noise, oracle, x.narrow(0, 0, 50), 0, ec, torch::kCPU);
  for (int64_t i = 0; i < 50; ++i) {
    double nll = -std::log(pi[x[i][0].item<int64_t>()].item<double>());
    for (int64_t l = 1; l < L; ++l) nll -= std::log(P[x[i][l - 1].item<int64_t>()][x[i][l].item<int64_t>()].item<double>());
    EXPECT_NEAR(r.bound[i].item<double>(), nll, 1e-9) << "sequence " << i;
  }
  EXPECT_EQ(r.mc_variance.abs().max().item<double>(), 0.0);
  // top-p 0.75 after state 0 keeps tokens 0 and 1 (0.7 + 0.2 covers 0.75): token 2 never follows 0.
  sc.top_p = 0.75;
  auto y = sample(*g, *noise, oracle, L, sc, Constraint{}, torch::arange(500, torch::kLong), torch::kCPU);
  auto f = y.narrow(1, 0, L - 1).reshape({-1}), n = y.narrow(1, 1, L - 1).reshape({-1});
  EXPECT_EQ((n.masked_select(f == 0) == 2).sum().item<int64_t>(), 0);
  // Only a prefix can condition an autoregressive model.
  Constraint suffix;
  suffix.positions = {L - 1};
  suffix.tokens = {1};
  EXPECT_THROW(sample(*g, *noise, oracle, L, sc, suffix, torch::arange(2, torch::kLong), torch::kCPU), sedd::Error);
}

TEST(ObjectiveTraining, Autoregressive) {
  expect_objective_learns("--diffusion.objective ar --model.time_conditioning false");
}
