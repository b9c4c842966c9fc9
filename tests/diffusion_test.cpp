// Property tests of the diffusion core: identities that a wrong formula would break.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "diffusion/categorical.h"
#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "io/error.h"
#include "test_util.h"

using namespace sedd;

namespace {

torch::Generator gen_with(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

std::vector<std::unique_ptr<Graph>> both_graphs(int64_t n) {
  std::vector<std::unique_ptr<Graph>> v;
  v.push_back(make_graph("absorb", n));
  v.push_back(make_graph("uniform", n));
  return v;
}

// All states 0..dim-1 as x, σ per state: [dim]
torch::Tensor all_states(const Graph& g) { return torch::arange(g.dim(), torch::kLong); }

}  // namespace

TEST(Noise, RateIsTheDerivativeOfTotal) {
  for (auto cfg : {NoiseConfig{"loglinear"}, NoiseConfig{"geometric"}, NoiseConfig{"cosine"}}) {
    auto noise = make_noise(cfg);
    auto t = torch::linspace(0.01, 0.99, 99, torch::kDouble);
    double h = 1e-6;
    auto fd = (noise->total(t + h) - noise->total(t - h)) / (2 * h);
    EXPECT_LT(((fd - noise->rate(t)).abs() / noise->rate(t)).max().item<double>(), 1e-6) << cfg.kind;
    EXPECT_TRUE((noise->total(t).diff() > 0).all().item<bool>()) << cfg.kind << " must increase";
  }
  auto ll = make_noise(NoiseConfig{"loglinear"});
  EXPECT_NEAR(ll->total(torch::tensor({0.0}, torch::kDouble)).item<double>(), 0.0, 1e-15);
  EXPECT_NEAR(make_noise(NoiseConfig{"cosine"})->total(torch::tensor({0.0}, torch::kDouble)).item<double>(), 0.0, 1e-15);
  EXPECT_THROW(make_noise(NoiseConfig{"linear"}), sedd::Error);
}

TEST(Graph, TransitionColumnsAreDistributions) {
  for (auto& g : both_graphs(7)) {
    for (auto dtype : {torch::kFloat, torch::kDouble}) {
      auto x = all_states(*g);
      auto sigma = torch::full({g->dim()}, 0.37, dtype);
      auto cols = g->transition(x, sigma);  // [dim, dim]: column x as row x
      double tol = dtype == torch::kFloat ? 1e-6 : 1e-13;
      EXPECT_LT((cols.sum(-1) - 1).abs().max().item<double>(), tol) << g->name();
      EXPECT_TRUE((cols >= 0).all().item<bool>());
      // transp_transition(x) is row x of exp(σQ): the transpose of the stacked columns.
      auto rows = g->transp_transition(x, sigma);
      EXPECT_LT((rows - cols.t()).abs().max().item<double>(), tol) << g->name();
      if (!g->absorbing())  // symmetric Q: rows are distributions too
        EXPECT_LT((rows.sum(-1) - 1).abs().max().item<double>(), tol);
    }
  }
}

TEST(Graph, RateMatchesTransitionForSmallSigma) {
  // exp(σQ) = I + σQ + O(σ²): column x of Q from the transition.
  for (auto& g : both_graphs(5)) {
    auto x = all_states(*g);
    double s = 1e-6;
    auto approx = (g->transition(x, torch::full({g->dim()}, s, torch::kDouble)) -
                   torch::nn::functional::one_hot(x, g->dim()).to(torch::kDouble)) / s;
    EXPECT_LT((approx - g->rate(x, torch::kDouble)).abs().max().item<double>(), 1e-5) << g->name();
    EXPECT_LT((g->transp_rate(x, torch::kDouble) - g->rate(x, torch::kDouble).t()).abs().max().item<double>(),
              1e-15) << g->name();
  }
}

TEST(Graph, ReverseRateRowsSumToZero) {
  auto gen = gen_with(3);
  for (auto& g : both_graphs(9)) {
    auto x = torch::randint(g->dim(), {4, 6}, gen, torch::kLong);
    auto score = torch::rand({4, 6, g->dim()}, gen, torch::kDouble) * 3;
    auto rr = g->reverse_rate(x, score);
    EXPECT_LT(rr.sum(-1).abs().max().item<double>(), 1e-12) << g->name();
    // Off-diagonal entries are rates: non-negative.
    auto off = rr.scatter(-1, x.unsqueeze(-1), 0.0);
    EXPECT_TRUE((off >= 0).all().item<bool>()) << g->name();
  }
}

TEST(Graph, SampleTransitionMatchesTransition) {
  // Chi-square goodness of fit with a fixed seed; critical values at p = 0.001.
  for (auto& g : both_graphs(8)) {
    const int64_t n = 200000, x0_id = 3;
    const double sigma = 0.7;
    auto gen = gen_with(11);
    auto x0 = torch::full({n}, x0_id, torch::kLong);
    auto xt = g->sample_transition(x0, torch::full({n}, sigma, torch::kDouble), gen);
    auto counts = torch::bincount(xt, {}, g->dim()).to(torch::kDouble);
    auto p = g->transition(torch::tensor({x0_id}), torch::tensor({sigma}, torch::kDouble))[0];
    auto expected = p * n;
    auto support = expected > 0;
    EXPECT_EQ(counts.masked_select(~support).sum().item<double>(), 0) << "draws outside the support";
    auto e = expected.masked_select(support), o = counts.masked_select(support);
    double chi2 = ((o - e).pow(2) / e).sum().item<double>();
    int dof = static_cast<int>(e.numel()) - 1;
    double crit = dof == 1 ? 10.83 : 24.32;  // dof 1 (absorbing) or 7 (uniform, N = 8)
    ASSERT_TRUE(dof == 1 || dof == 7);
    EXPECT_LT(chi2, crit) << g->name() << " chi2 " << chi2 << " dof " << dof;
  }
}

TEST(Graph, SampleLimitAndStaggered) {
  auto gen = gen_with(1);
  auto ab = make_graph("absorb", 6);
  EXPECT_TRUE((ab->sample_limit({3, 4}, gen) == 6).all().item<bool>());
  auto un = make_graph("uniform", 6);
  auto lim = un->sample_limit({1000}, gen);
  EXPECT_GE(lim.min().item<int64_t>(), 0);
  EXPECT_LT(lim.max().item<int64_t>(), 6);
  // staggered with dsigma = 0 is the identity
  for (auto* g : {ab.get(), un.get()}) {
    auto score = torch::rand({2, 3, g->dim()}, gen, torch::kDouble);
    auto st = g->staggered_score(score, torch::zeros({2, 1}, torch::kDouble));
    EXPECT_LT((st - score).abs().max().item<double>(), 1e-15) << g->name();
  }
}

TEST(ScoreEntropy, NonNegativeAndZeroAtTrueRatios) {
  auto gen = gen_with(5);
  for (auto& g : both_graphs(10)) {
    const int64_t B = 8, L = 16;
    auto x0 = torch::randint(g->tokens(), {B, L}, gen, torch::kLong);
    auto sigma = torch::rand({B, 1}, gen, torch::kDouble) * 3 + 0.05;
    auto x = g->sample_transition(x0, sigma, gen);
    // Random scores: the loss is a Bregman divergence, so >= 0.
    auto s = torch::randn({B, L, g->dim()}, gen, torch::kDouble);
    auto loss = g->score_entropy(s, sigma, x, x0);
    EXPECT_GE(loss.min().item<double>(), -1e-12) << g->name();
    // True conditional ratios p(y|x0)/p(x|x0): the loss vanishes.
    auto p = g->transition(x0, sigma);                                  // [B, L, dim]
    auto px = p.gather(-1, x.unsqueeze(-1));
    auto ratio = p / px;
    auto true_log = torch::where(ratio > 0, ratio.log(), torch::full_like(ratio, -1e4));
    auto at_truth = g->score_entropy(true_log, sigma, x, x0);
    EXPECT_LT(at_truth.abs().max().item<double>(), 1e-9) << g->name();
    if (g->absorbing()) {  // zero wherever the token is not masked
      auto unmasked = x != g->dim() - 1;
      EXPECT_EQ(loss.masked_select(unmasked).abs().sum().item<double>(), 0.0);
    }
  }
}

TEST(ScoreEntropy, FiniteAtSigmaEdgesInBothPrecisions) {
  auto gen = gen_with(9);
  for (auto& g : both_graphs(50)) {
    for (auto dtype : {torch::kFloat, torch::kDouble}) {
      for (double sv : {1e-5, 1e-3, 0.5, 10.0, 50.0}) {
        auto x0 = torch::randint(g->tokens(), {4, 32}, gen, torch::kLong);
        auto sigma = torch::full({4, 1}, sv, dtype);
        auto x = g->sample_transition(x0, sigma, gen);
        auto s = (torch::randn({4, 32, g->dim()}, gen, torch::kDouble) * 2).to(dtype).requires_grad_(true);
        auto loss = g->score_entropy(s, sigma, x, x0);
        loss.sum().backward();
        std::string where = g->name() + " " + c10::toString(dtype) + " sigma=" + std::to_string(sv);
        EXPECT_TRUE(torch::isfinite(loss).all().item<bool>()) << where;
        EXPECT_TRUE(torch::isfinite(s.grad()).all().item<bool>()) << where;
        EXPECT_GE(loss.min().item<double>(), dtype == torch::kFloat ? -1e-2 : -1e-9) << where;
        auto tt = g->transp_transition(x, sigma);
        auto st = g->staggered_score(s.detach().exp(), sigma);
        EXPECT_TRUE(torch::isfinite(tt).all().item<bool>()) << where;
        EXPECT_TRUE(torch::isfinite(st).all().item<bool>()) << where;
        EXPECT_TRUE(torch::isfinite(g->transition(x, sigma)).all().item<bool>()) << where;
      }
    }
  }
}

TEST(Categorical, MatchesWeightsAndIsReproducible) {
  auto w = torch::tensor({0.0, 1.0, 2.0, 5.0}, torch::kDouble);
  const int64_t n = 100000;
  auto gen = gen_with(21);
  auto draws = sample_categorical(w.expand({n, 4}), gen);
  auto freq = torch::bincount(draws, {}, 4).to(torch::kDouble) / n;
  auto p = w / w.sum();
  EXPECT_EQ(freq[0].item<double>(), 0.0);
  EXPECT_LT((freq - p).abs().max().item<double>(), 0.01);
  auto g1 = gen_with(4), g2 = gen_with(4);
  EXPECT_TRUE(torch::equal(sample_categorical(w.expand({50, 4}), g1), sample_categorical(w.expand({50, 4}), g2)));
}

// argmax over a row of zeros returns 0 (and over a NaN, the NaN's index): a token from no
// distribution. Such a row is an error naming it.
TEST(Categorical, RowsWithNothingToDrawAreAnErrorNamingTheRow) {
  auto gen = gen_with(5);
  for (double poison : {0.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    auto w = torch::rand({3, 4, 6}, torch::kDouble) + 0.1;
    w[2][1].zero_();
    w[2][1][5] = poison;
    std::string msg = test::error_of([&] { sample_categorical(w, gen); });
    EXPECT_NE(msg.find(fmt::format("the weights of row [2, 1] (of the 12 rows shaped [3, 4]) sum to {}", poison)),
              std::string::npos)
        << msg;
    EXPECT_NE(test::error_of([&] { sample_categorical(w.to(torch::kFloat), gen); }).find("row [2, 1]"), std::string::npos);
  }
  EXPECT_EQ(sample_categorical(torch::zeros({0, 4}, torch::kDouble), gen).numel(), 0);
}
