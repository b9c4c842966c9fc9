// Samplers and the likelihood bound against distributions whose truth is known exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "diffusion/categorical.h"
#include "diffusion/sampler.h"
#include "eval/elbo.h"
#include "io/fs.h"
#include "model/score.h"
#include "io/error.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// The exact score of a distribution with independent positions, position l having marginal
// p[l] (a [L, N] table): the concrete score ratio p_sigma(x with x_l = y) / p_sigma(x).
class IndependentOracle final : public ScoreModel {
 public:
  IndependentOracle(const Graph& g, torch::Tensor p) : g_(g), p_(std::move(p)) {}
  torch::Tensor log_score(const torch::Tensor& x, const torch::Tensor& sigma_f) override {
    auto sigma = sigma_f.to(torch::kDouble).view({-1, 1, 1});                 // [B,1,1]
    const int64_t B = x.size(0), L = x.size(1), N = g_.tokens();
    auto keep = torch::exp(-sigma);
    auto p = p_.unsqueeze(0).expand({B, L, N});
    torch::Tensor out;
    if (g_.absorbing()) {  // from the mask to y: p(y) e^-sigma / (1 - e^-sigma)
      auto to_token = p.log() - torch::log(torch::expm1(sigma));
      out = torch::cat({to_token, torch::zeros({B, L, 1}, torch::kDouble)}, -1);
      auto masked = (x == N).unsqueeze(-1);
      out = torch::where(masked, out, torch::zeros_like(out));
    } else {               // p_sigma(y) = keep p(y) + (1 - keep) / N
      auto ps = keep * p + (1 - keep) / static_cast<double>(N);
      out = ps.log() - ps.log().gather(-1, x.unsqueeze(-1));
    }
    return out.to(torch::kFloat);
  }

 private:
  const Graph& g_;
  torch::Tensor p_;
};

torch::Tensor marginals(int64_t L, int64_t N) {
  auto base = torch::tensor({0.4, 0.25, 0.15, 0.12, 0.08}, torch::kDouble).narrow(0, 0, N);
  std::vector<torch::Tensor> rows;
  for (int64_t l = 0; l < L; ++l) rows.push_back(base.roll(l));  // a different marginal per position
  auto p = torch::stack(rows);
  return p / p.sum(-1, true);
}

// Summed chi-square of per-position token counts against p; dof = L (N - 1).
double chi_square(const torch::Tensor& samples, const torch::Tensor& p) {
  const int64_t L = p.size(0), N = p.size(1), n = samples.size(0);
  double chi2 = 0;
  for (int64_t l = 0; l < L; ++l) {
    auto counts = torch::bincount(samples.select(1, l), {}, N).to(torch::kDouble);
    auto e = p[l] * n;
    chi2 += ((counts - e).pow(2) / e).sum().item<double>();
  }
  return chi2;
}

std::vector<torch::Generator> generators(int64_t n, uint64_t seed) {
  std::vector<torch::Generator> g;
  for (int64_t i = 0; i < n; ++i) g.push_back(keyed_generator(seed, 1, i));
  return g;
}

}  // namespace

TEST(Sampler, MarginalsConvergeToTheTruth) {
  const int64_t L = 4, N = 5, n = 4000;
  auto p = marginals(L, N);
  const double crit = 39.25;  // chi-square, 16 dof, p = 0.001
  for (const char* kind : {"absorb", "uniform"}) {
    auto g = make_graph(kind, N);
    auto noise = make_noise(NoiseConfig{"loglinear"});
    IndependentOracle oracle(*g, p);
    for (const char* pred : {"euler", "analytic"}) {
      std::map<int64_t, double> chi;
      for (int64_t steps : {2, 16, 256}) {
        SamplerConfig sc;
        sc.predictor = pred;
        sc.steps = steps;
        sc.float64 = true;
        auto gens = generators(n, 42);
        auto x = sample(*g, *noise, oracle, L, sc, Constraint{}, gens, torch::kCPU);
        ASSERT_TRUE((x >= 0).all().item<bool>() && (x < N).all().item<bool>()) << "a mask or bad id survived";
        chi[steps] = chi_square(x, p);
      }
      std::cout << kind << "/" << pred << ": chi2 at 2, 16, 256 steps = " << chi[2] << ", " << chi[16] << ", "
                << chi[256] << " (critical " << crit << ")\n";
      EXPECT_LT(chi[256], crit) << kind << " " << pred;
      EXPECT_LT(chi[256], chi[2] + crit) << kind << " " << pred;
    }
  }
}

TEST(Sampler, PrefixSuffixAndInfillAreAlwaysHonoured) {
  const int64_t L = 12, N = 5;
  auto p = marginals(L, N);
  for (const char* kind : {"absorb", "uniform"}) {
    auto g = make_graph(kind, N);
    auto noise = make_noise(NoiseConfig{"loglinear"});
    IndependentOracle oracle(*g, p);
    Constraint c;
    c.positions = {0, 1, 5, 10, 11};  // prefix of 2, one infill, suffix of 2
    c.tokens = {4, 3, 4, 4, 2};       // unlikely tokens, so honouring them is not luck
    for (const char* pred : {"euler", "analytic"}) {
      SamplerConfig sc;
      sc.predictor = pred;
      sc.steps = 20;
      auto gens = generators(200, 3);
      auto x = sample(*g, *noise, oracle, L, sc, c, gens, torch::kCPU);
      for (size_t i = 0; i < c.positions.size(); ++i)
        EXPECT_TRUE((x.select(1, c.positions[i]) == c.tokens[i]).all().item<bool>()) << kind << " " << pred;
      EXPECT_FALSE((x.select(1, 3) == 4).all().item<bool>());  // free positions still vary
    }
    Constraint bad;
    bad.positions = {L};
    bad.tokens = {0};
    EXPECT_THROW(bad.validate(L, N), sedd::Error);
  }
}

TEST(Sampler, ExactCacheGivesIdenticalSamplesWithFewerEvaluations) {
  ModelConfig cfg;
  cfg.tokens = 20;
  cfg.hidden_size = 32;
  cfg.n_heads = 2;
  cfg.n_blocks = 2;
  cfg.cond_dim = 16;
  cfg.length = 24;
  cfg.time_conditioning = false;
  torch::manual_seed(1);
  DDiT m(cfg);
  {
    torch::NoGradGuard ng;
    for (auto& t : m->parameters()) t.normal_(0, 0.2);
  }
  m->eval();
  auto g = make_graph("absorb", cfg.tokens);
  auto noise = make_noise(cfg.noise);
  for (int64_t steps : {16, 128}) {
    SamplerConfig sc;
    sc.steps = steps;
    DDiTScore cached(m, true), plain(m, false);
    ASSERT_TRUE(cached.caching());
    auto g1 = generators(6, 9), g2 = generators(6, 9);
    auto a = sample(*g, *noise, cached, cfg.length, sc, Constraint{}, g1, torch::kCPU);
    auto b = sample(*g, *noise, plain, cfg.length, sc, Constraint{}, g2, torch::kCPU);
    EXPECT_TRUE(torch::equal(a, b)) << steps << " steps";
    std::cout << steps << " steps: cached model rows evaluated " << cached.rows_evaluated() << ", reused "
              << cached.rows_reused() << "; uncached " << plain.rows_evaluated() << "\n";
    EXPECT_EQ(plain.rows_evaluated(), 6 * (steps + 1));
    EXPECT_LT(cached.rows_evaluated(), plain.rows_evaluated());
    if (steps == 128) EXPECT_GT(cached.rows_reused(), cached.rows_evaluated());
  }
  // With time conditioning the cache must switch itself off.
  cfg.time_conditioning = true;
  EXPECT_FALSE(DDiTScore(DDiT(cfg), true).caching());
}

TEST(Elbo, ExactScoreGivesATightBound) {
  const int64_t L = 6, N = 5;
  auto p = marginals(L, N);
  double entropy = -(p * p.log()).sum().item<double>();  // nats per sequence
  for (const char* kind : {"absorb", "uniform"}) {
    auto g = make_graph(kind, N);
    NoiseConfig nc{"loglinear"};
    if (std::string(kind) == "uniform") nc = NoiseConfig{"geometric", 1e-3, 1e-4, 20.0};
    auto noise = make_noise(nc);
    IndependentOracle oracle(*g, p);
    // Sequences drawn from the truth.
    auto gen = keyed_generator(5, 0, 0);
    const int64_t n = 600;
    auto x0 = sample_categorical(p.unsqueeze(0).expand({n, L, N}).contiguous(), gen);
    ElboConfig ec{16, "antithetic", 0};
    auto r = elbo_batch(*g, *noise, oracle, x0, 0, ec, torch::kCPU);
    double mean = r.bound.mean().item<double>();
    double se = r.bound.std().item<double>() / std::sqrt(static_cast<double>(n));  // data + MC spread
    std::cout << kind << ": bound " << mean << " +- " << se << " nats/sequence, entropy " << entropy
              << ", prior " << r.prior_nats << "\n";
    EXPECT_NEAR(mean, entropy, 4 * se + 0.01 * entropy) << kind;
  }
}

TEST(Elbo, StandardErrorShrinksAsOneOverSqrtK) {
  const int64_t L = 8, N = 5;
  auto p = marginals(L, N);
  auto g = make_graph("absorb", N);
  auto noise = make_noise(NoiseConfig{"loglinear"});
  IndependentOracle oracle(*g, p);
  auto gen = keyed_generator(6, 0, 0);
  auto x0 = sample_categorical(p.unsqueeze(0).expand({40, L, N}).contiguous(), gen);
  // The real Monte Carlo error: the spread of the estimate over independent seeds.
  auto spread_at = [&](int64_t K, const char* mode, double* reported) {
    std::vector<double> means;
    double reported_sum = 0;
    for (uint64_t seed = 0; seed < 60; ++seed) {
      auto r = elbo_batch(*g, *noise, oracle, x0, 0, ElboConfig{K, mode, seed}, torch::kCPU);
      means.push_back(r.bound.sum().item<double>());
      reported_sum += std::sqrt(r.mc_variance.sum().item<double>());
    }
    *reported = reported_sum / 60;
    return torch::tensor(means, torch::kDouble).std().item<double>();
  };
  for (const char* mode : {"iid", "antithetic"}) {
    double rep16 = 0, rep256 = 0;
    double s16 = spread_at(16, mode, &rep16), s256 = spread_at(256, mode, &rep256);
    std::cout << mode << ": spread over seeds K=16 " << s16 << ", K=256 " << s256 << ", ratio " << s16 / s256
              << " (expect 4); reported s.e. at K=256 " << rep256 << "\n";
    EXPECT_GT(s16 / s256, 4 * 0.75) << mode;
    EXPECT_LT(s16 / s256, 4 * 1.25) << mode;
    EXPECT_NEAR(rep256, s256, 0.3 * s256) << "the reported standard error does not match the real spread";
  }
}

// A tiny model trained on a Markov chain whose entropy is known: the bound holds and is close.
TEST(Elbo, TrainedModelBoundsTheTrueEntropyOfAMarkovChain) {
  TempDir tmp;
  const int64_t N = 6, L = 32;
  // Each state moves to its successor (p 0.75) or the one after (p 0.25).
  auto P = torch::zeros({N, N}, torch::kDouble);
  for (int64_t i = 0; i < N; ++i) {
    P[i][(i + 1) % N] = 0.75;
    P[i][(i + 2) % N] = 0.25;
  }
  auto pi = torch::full({N}, 1.0 / N, torch::kDouble);  // doubly stochastic: uniform stationary law
  double rate = -(pi.unsqueeze(1) * P * torch::where(P > 0, P.log(), torch::zeros_like(P))).sum().item<double>();
  double exact = (std::log(static_cast<double>(N)) + (L - 1) * rate) / L;  // nats/token of a window
  auto gen = keyed_generator(11, 0, 0);
  const int64_t total = 400000;
  std::vector<int64_t> chain(total);
  chain[0] = torch::randint(N, {1}, gen).item<int64_t>();
  auto u = torch::rand({total}, gen, torch::kDouble);
  auto ua = u.accessor<double, 1>();
  for (int64_t i = 1; i < total; ++i) chain[i] = (chain[i - 1] + (ua[i] < 0.75 ? 1 : 2)) % N;
  write_shard(tmp / "train.h5", torch::tensor(chain).narrow(0, 0, total - 20000), N + 1, N, "byte");
  write_shard(tmp / "test.h5", torch::tensor(chain).narrow(0, total - 20000, 20000), N + 1, N, "byte");
  std::string out;
  std::string train = fmt::format(
      "{} -np 2 {}/sedd-train --data.train {} --run.dir {} --run.device cpu --data.seq_len {} --model.hidden_size 64 "
      "--model.n_heads 4 --model.n_blocks 2 --model.cond_dim 32 --train.batch_size 32 --train.steps 700 "
      "--train.lr 3e-3 --train.warmup 50 --train.schedule cosine --train.ema 0.99 --train.log_every 100",
      kMpirun, bin_dir(), tmp / "train.h5", tmp / "run", L);
  ASSERT_EQ(run(train, &out), 0) << out;
  std::string eval = fmt::format("{} -np 2 {}/sedd-eval --checkpoint {} --data {} --mc-samples 32 --max-sequences 128 "
                                 "--json {}",
                                 kMpirun, bin_dir(), tmp / "run", tmp / "test.h5", tmp / "eval.json");
  ASSERT_EQ(run(eval, &out), 0) << out;
  auto j = nlohmann::json::parse(fs::read_text(tmp / "eval.json"));
  double bound = j["nats_per_token"], se = j["stderr_nats_per_token"];
  std::cout << "Markov chain: exact " << exact << " nats/token, bound " << bound << " +- " << se << "\n";
  EXPECT_GE(bound, exact - 3 * se) << "the bound fell below the true entropy";
  EXPECT_LE(bound, 1.25 * exact) << "the bound is not within 25% of the true entropy";
  for (const char* key : {"bits_per_token", "perplexity", "tokens", "sequences"}) EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["tokens"].get<int64_t>(), 128 * L);
}
