// Block diffusion (bd3): the network's attention forms against each other and a per-block loop, the
// special block sizes (L' = L is our MDLM, L' = 1 next-token cross entropy), an exact denoiser on a
// small Markov chain (the bound for every block size, the samplers' law), the KV cache, stopping,
// the nucleus filter, options, the clipped-schedule search and a tiny run. The authors' own vectors:
// bd3_golden_test below (tests/data/bd3_reference.h5).
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <map>

#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "eval/elbo.h"
#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "model/weights.h"
#include "objectives/bd3.h"
#include "objectives/mdlm.h"
#include "objectives/oracles.h"
#include "objectives/score.h"
#include "recipes.h"
#include "train/config.h"
#include "train/memory_plan.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

ModelConfig bd3_config(int64_t tokens, int64_t length, int64_t block) {
  ModelConfig m = objective_config("bd3", 1000, 0);
  m.tokens = tokens;
  m.length = length;
  m.block_size = block;
  m.hidden_size = 32;
  m.n_heads = 4;
  m.n_blocks = 2;
  m.cond_dim = 16;
  m.time_conditioning = false;
  m.scale_by_sigma = false;
  m.noise = NoiseConfig{"loglinear"};
  return m;
}

SamplerConfig bd3_sampler(const ModelConfig& cfg, const char* sampler, int64_t steps, uint64_t seed,
                          double top_p = 1.0) {
  SamplerConfig sc;
  sc.model = cfg;
  sc.block_sampler = sampler;
  sc.steps = steps;
  sc.seed = seed;
  sc.top_p = top_p;
  return sc;
}

DDiT bd3_random_model(const ModelConfig& cfg, torch::ScalarType dtype, uint64_t seed) {
  torch::manual_seed(seed);
  DDiT model(cfg);
  model->to(dtype);
  model->eval();
  torch::NoGradGuard ng;
  for (auto& p : model->parameters()) p.normal_(0, 0.3);
  return model;
}

// The largest difference relative to the largest entry (float64 paths agree to rounding).
double error_of_scale(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
}

// x0 [B, L] and an x_t with about half of positions 1.. masked (id `mask`).
std::pair<torch::Tensor, torch::Tensor> masked_pair(int64_t B, int64_t L, int64_t tokens, uint64_t seed) {
  torch::manual_seed(seed);
  auto x0 = torch::randint(tokens, {B, L}, torch::kLong);
  auto hide = torch::rand({B, L}) < 0.5;
  hide.select(1, 0).fill_(false);
  return {x0, torch::where(hide, torch::full_like(x0, tokens), x0)};
}

// ---- The exact denoiser of a small Markov chain p(x) = pi(x_0) prod P(x_{l-1}, x_l), by enumeration.
class MarkovBlockOracle final : public ScoreModel {
 public:
  MarkovBlockOracle(int64_t V, int64_t L, uint64_t seed) : V_(V), L_(L) {
    torch::manual_seed(seed);
    pi_ = torch::softmax(torch::randn({V}, torch::kDouble) * 1.5, 0);
    P_ = torch::softmax(torch::randn({V, V}, torch::kDouble) * 1.5, 1);
    const int64_t n = static_cast<int64_t>(std::pow(V, L));
    seqs_.assign(n, std::vector<int64_t>(L));
    prob_.assign(n, 0.0);
    for (int64_t k = 0; k < n; ++k) {
      int64_t r = k;
      for (int64_t l = L - 1; l >= 0; --l) seqs_[k][l] = r % V, r /= V;
      double p = pi_[seqs_[k][0]].item<double>();
      for (int64_t l = 1; l < L; ++l) p *= P_[seqs_[k][l - 1]][seqs_[k][l]].item<double>();
      prob_[k] = p;
    }
  }
  // -log p(x_1.. | x_0): the bound's target (position 0 is given, never scored).
  double conditional_nll(const std::vector<int64_t>& x) const {
    double nll = 0;
    for (size_t l = 1; l < x.size(); ++l) nll -= std::log(P_[x[l - 1]][x[l]].item<double>());
    return nll;
  }
  double prob_given_first(const std::vector<int64_t>& x) const { return std::exp(-conditional_nll(x)); }
  torch::Tensor draw(int64_t B, uint64_t seed) const {
    torch::manual_seed(seed);
    auto idx = torch::multinomial(torch::tensor(prob_, torch::kDouble), B, true);
    auto out = torch::empty({B, L_}, torch::kLong);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L_; ++l) out[b][l] = seqs_[idx[b].item<int64_t>()][l];
    return out;
  }

  void evaluate(const torch::Tensor&, const torch::Tensor&) override { FAIL() << "bd3 reads x_t beside x_0"; }
  void evaluate_with_clean(const torch::Tensor& xt, const torch::Tensor&, const torch::Tensor& x0) override {
    const int64_t B = xt.size(0), b = block_;
    std::vector<std::vector<int64_t>> observed(B * L_);
    out_ = torch::empty({B * L_, V_}, torch::kDouble);
    for (int64_t r = 0; r < B; ++r)
      for (int64_t l = 0; l < L_; ++l) {
        std::vector<int64_t> seen(L_, -1);
        const int64_t start = l / b * b;
        for (int64_t j = 0; j < start; ++j) seen[j] = x0[r][j].item<int64_t>();
        for (int64_t j = start; j < std::min(start + b, L_); ++j)
          if (xt[r][j].item<int64_t>() != V_) seen[j] = xt[r][j].item<int64_t>();
        out_[r * L_ + l].copy_(log_conditional(seen, l));
      }
  }
  void set_context(const torch::Tensor& clean) override { context_ = clean.clone(); }
  void evaluate_block(const torch::Tensor& block, const torch::Tensor&) override {
    const int64_t B = block.size(0), T = block.size(1), C = context_.size(1);
    out_ = torch::empty({B * T, V_}, torch::kDouble);
    auto ctx = context_.contiguous(), blk = block.contiguous();
    for (int64_t r = 0; r < B; ++r) {
      std::vector<int64_t> seen(L_, -1);
      for (int64_t j = 0; j < C; ++j) seen[j] = ctx[r][j].item<int64_t>();
      for (int64_t j = 0; j < T; ++j)
        if (blk[r][j].item<int64_t>() != V_) seen[C + j] = blk[r][j].item<int64_t>();
      for (int64_t j = 0; j < T; ++j) out_[r * T + j].copy_(log_conditional(seen, C + j));
    }
  }
  torch::Tensor rows(const torch::Tensor& r) override { return out_.index_select(0, r); }
  int64_t block_ = 1;

 private:
  // log p(x_l = . | the seen positions), the others summed out.
  torch::Tensor log_conditional(const std::vector<int64_t>& seen, int64_t l) {
    std::vector<double> mass(V_, 0.0);
    for (size_t k = 0; k < seqs_.size(); ++k) {
      bool ok = true;
      for (int64_t j = 0; j < L_ && ok; ++j) ok = seen[j] < 0 || seqs_[k][j] == seen[j];
      if (ok) mass[seqs_[k][l]] += prob_[k];
    }
    auto t = torch::tensor(mass, torch::kDouble);
    return (t / t.sum()).clamp_min(1e-300).log();
  }
  int64_t V_, L_;
  torch::Tensor pi_, P_, out_, context_;
  std::vector<std::vector<int64_t>> seqs_;
  std::vector<double> prob_;
};

// ---- Network: the two attention forms, the per-block loop, and the special block sizes.

TEST(Bd3Network, AttentionFormsAndPerBlockLoopAgree) {
  for (int64_t block : {1, 2, 3, 4, 12}) {
    auto cfg = bd3_config(11, 12, block);
    DDiT model = bd3_random_model(cfg, torch::kDouble, 3);
    auto [x0, xt] = masked_pair(3, 12, 11, 5);
    torch::NoGradGuard ng;
    auto zeros = torch::zeros({3}, torch::kDouble);
    auto split = model->forward_hidden(torch::cat({xt, x0}, 1), zeros).h;
    model->set_block_attention(BlockAttention::Mask);
    auto masked = model->forward_hidden(torch::cat({xt, x0}, 1), zeros).h;
    model->set_block_attention(BlockAttention::Split);
    EXPECT_LT(error_of_scale(split, masked), 1e-12) << "block " << block;
    // Block j of x_t run alone after x0's blocks before it (the sampler's path) = the 2L pass.
    for (int64_t j = 0; j < 12 / block; ++j) {
      BlockContext context;
      for (int64_t i = 0; i < j; ++i) model->forward_on_context(x0.narrow(1, i * block, block), zeros, context, true);
      auto alone = model->forward_on_context(xt.narrow(1, j * block, block), zeros, context, false).h;
      EXPECT_LT(error_of_scale(alone, split.narrow(1, j * block, block)), 1e-12) << "block " << block << " j " << j;
    }
    // x_0 never sees x_t: changing x_t leaves the x_0 half alone.
    auto other = model->forward_hidden(torch::cat({torch::full_like(xt, 11), x0}, 1), zeros).h;
    EXPECT_TRUE(other.narrow(1, 12, 12).equal(split.narrow(1, 12, 12))) << "block " << block;
  }
}

TEST(Bd3Network, OneBlockIsOurMdlm) {
  auto cfg = bd3_config(11, 12, 12);
  DDiT bd3 = bd3_random_model(cfg, torch::kDouble, 7);
  ModelConfig mc = cfg;
  mc.objective = "mdlm";
  mc.block_size = 0;
  DDiT mdlm(mc);
  mdlm->to(torch::kDouble);
  load_state_dict(*mdlm, state_dict(*bd3), "bd3 weights");
  auto [x0, xt] = masked_pair(4, 12, 11, 9);
  DDiTScore a(bd3, false), b(mdlm, false);
  auto zeros = torch::zeros({4}, torch::kDouble);
  a.evaluate_with_clean(xt, zeros, x0);
  b.evaluate(xt, zeros);
  auto all = torch::arange(4 * 12);
  EXPECT_LT(max_rel_error(a.rows(all), b.rows(all)), 1e-12);
  auto graph = make_graph("absorb", 11);
  auto noise = make_noise(mc.noise);
  auto t = torch::tensor({0.1, 0.4, 0.7, 0.95}, torch::kDouble);
  bd3->train(), mdlm->train();
  auto ours = bd3_sequence_loss(bd3, xt, x0, t.unsqueeze(1).expand({4, 12}), nullptr, LossOptions{});
  auto theirs = mdlm_sequence_loss(mdlm, *graph, *noise, xt, x0, t, nullptr, LossOptions{});
  std::cout << "L' = L: loss " << ours << " vs mdlm " << theirs << "\n";
  EXPECT_LT(max_rel_error(ours, theirs), 1e-12);
}

TEST(Bd3Network, OneTokenBlocksAreNextTokenCrossEntropy) {
  auto cfg = bd3_config(11, 12, 1);
  DDiT model = bd3_random_model(cfg, torch::kDouble, 11);
  auto x0 = masked_pair(3, 12, 11, 13).first;
  auto graph = make_graph("absorb", 11);
  auto noise = make_noise(cfg.noise);
  const Objective& o = objective_of(cfg);
  LossDraws d{1, 2, torch::arange(3), torch::rand({3}, torch::kDouble), "stratified", 3};
  auto draw = o.draw(Process{*graph, *noise, cfg}, x0, d);
  EXPECT_TRUE(draw.t.eq(1.0).all().item<bool>()) << "L' = 1 draws t = 1";
  auto loss = o.loss(model, Process{*graph, *noise, cfg}, x0, draw, nullptr, LossOptions{});
  // The next-token cross entropy, position by position: p(x_l | x_<l) from a mask after x0[:l].
  torch::NoGradGuard ng;
  auto zeros = torch::zeros({3}, torch::kDouble);
  auto expected = torch::zeros({3}, torch::kDouble);
  DDiTScore score(model, true);
  for (int64_t l = 1; l < 12; ++l) {
    score.set_context(x0.narrow(1, 0, l));
    score.evaluate_block(torch::full({3, 1}, 11, torch::kLong), zeros);
    auto logp = score.rows(torch::arange(3));
    expected -= logp.gather(1, x0.select(1, l).unsqueeze(1)).squeeze(1);
  }
  EXPECT_LT(max_rel_error(loss, expected), 1e-12);
  // The bound is the same number, exact (no Monte Carlo error).
  ElboConfig ec{4, "stratified", 3};
  ec.model = cfg;
  DDiTScore fresh(model, false);
  auto r = elbo_batch(*graph, *noise, fresh, x0, 0, ec, torch::kCPU);
  EXPECT_LT(max_rel_error(r.bound, expected), 1e-12);
  EXPECT_EQ(r.mc_variance.abs().max().item<double>(), 0.0);
}

// ---- The exact denoiser of a Markov chain.

TEST(Bd3Oracle, BoundIsTheLikelihoodForEveryBlockSize) {
  const int64_t V = 3, L = 6;
  MarkovBlockOracle oracle(V, L, 21);
  auto x0 = oracle.draw(6, 4);
  auto graph = make_graph("absorb", V);
  for (int64_t block : {1, 2, 3, 6}) {
    oracle.block_ = block;
    auto cfg = bd3_config(V, L, block);
    auto noise = make_noise(cfg.noise);
    ElboConfig ec{block == 1 ? 2 : 2048, "stratified", 1};
    ec.model = cfg;
    auto r = elbo_batch(*graph, *noise, oracle, x0, 0, ec, torch::kCPU);
    double gap = 0, variance = 0, truth_sum = 0;
    for (int64_t i = 0; i < x0.size(0); ++i) {
      std::vector<int64_t> x(x0[i].data_ptr<int64_t>(), x0[i].data_ptr<int64_t>() + L);
      const double truth = oracle.conditional_nll(x), bound = r.bound[i].item<double>();
      if (block == 1) {
        EXPECT_NEAR(bound, truth, 1e-12 * truth) << "L' = 1 is exact";
        EXPECT_EQ(r.mc_variance[i].item<double>(), 0.0);
      }
      gap += bound - truth;
      variance += r.mc_variance[i].item<double>();
      truth_sum += truth;
    }
    // The estimator's exact mean: every mask pattern of every block, weighted by its probability
    // integrated over t on the window (Simpson's rule, exact to rounding for these polynomials).
    if (block > 1) {
      double mean = 0;
      const double a = 1e-3;
      auto integral = [&](int64_t m, int64_t n) {  // mean over t ~ U[a, 1] of t^(m-1) (1-t)^(n-m)
        const int64_t steps = 20000;
        double sum = 0;
        for (int64_t k = 0; k <= steps; ++k) {
          const double t = a + (1 - a) * k / steps, w = (k == 0 || k == steps) ? 1 : (k % 2 ? 4 : 2);
          sum += w * std::pow(t, m - 1) * std::pow(1 - t, n - m);
        }
        return sum / (3.0 * steps);
      };
      for (int64_t i = 0; i < x0.size(0); ++i)
        for (int64_t start = 0; start < L; start += block) {
          std::vector<int64_t> free;
          for (int64_t l = std::max<int64_t>(start, 1); l < start + block; ++l) free.push_back(l);
          const int64_t n = static_cast<int64_t>(free.size());
          for (int64_t subset = 1; subset < (1 << n); ++subset) {
            auto xt = x0.narrow(0, i, 1).clone();
            int64_t m = 0;
            for (int64_t j = 0; j < n; ++j)
              if (subset >> j & 1) xt[0][free[j]] = V, ++m;
            oracle.evaluate_with_clean(xt, torch::zeros({1}, torch::kDouble), x0.narrow(0, i, 1));
            double terms = 0;
            for (int64_t j = 0; j < n; ++j)
              if (subset >> j & 1)
                terms -= oracle.rows(torch::tensor({free[j]}))[0][x0[i][free[j]].item<int64_t>()].item<double>();
            mean += terms * integral(m, n);
          }
        }
      std::cout << "block " << block << ": the estimator's exact mean - (-log p) = " << mean - truth_sum << "\n";
      EXPECT_NEAR(mean, truth_sum, 2e-3 * truth_sum) << "block " << block;
    }
    // The Monte Carlo estimate over the sequences, within its error bars (plus the window's bias).
    // The 1/t weight makes its draws right-skewed: most runs land a little low, a few high.
    const double se = std::sqrt(variance);
    std::cout << "block " << block << ": bound - (-log p) summed over " << x0.size(0) << " sequences " << gap << " +- "
              << se << " (-log p " << truth_sum << ")\n";
    if (block > 1) {
      EXPECT_GT(se, 0.0);
      EXPECT_LT(std::abs(gap), 4 * se + 2e-3 * truth_sum) << "block " << block;
    }
  }
}

// Pearson's chi^2 of drawn sequences against p(x_1.. | x_0) over every continuation.
double chi_square_of_draws(const MarkovBlockOracle& oracle, const torch::Tensor& x, int64_t V) {
  const int64_t n = x.size(0), L = x.size(1);
  std::map<std::vector<int64_t>, int64_t> counts;
  for (int64_t i = 0; i < n; ++i) counts[std::vector<int64_t>(x[i].data_ptr<int64_t>(), x[i].data_ptr<int64_t>() + L)]++;
  double chi2 = 0;
  const int64_t cells = static_cast<int64_t>(std::pow(V, L - 1));
  for (int64_t k = 0; k < cells; ++k) {
    std::vector<int64_t> seq(L, 0);
    int64_t r = k;
    for (int64_t l = L - 1; l >= 1; --l) seq[l] = r % V, r /= V;
    const double expected = n * oracle.prob_given_first(seq);
    const double observed = counts.count(seq) ? static_cast<double>(counts[seq]) : 0.0;
    chi2 += (observed - expected) * (observed - expected) / expected;
  }
  return chi2;
}

TEST(Bd3Sampler, SamplersDrawTheChain) {
  const int64_t V = 3, L = 5, n = 3000;
  MarkovBlockOracle oracle(V, L, 31);
  oracle.block_ = 2;
  auto graph = make_graph("absorb", V);
  auto cfg = bd3_config(V, L + 1, 2);  // a window of whole blocks; samples of L tokens
  cfg.bos = 0;
  auto noise = make_noise(cfg.noise);
  for (const char* sampler : {"first-hitting", "ddpm"}) {
    const SamplerConfig sc = bd3_sampler(cfg, sampler, 64, 8);
    auto x = sample(*graph, *noise, oracle, L, sc, Constraint{}, torch::arange(n), torch::kCPU);
    EXPECT_TRUE(x.select(1, 0).eq(0).all().item<bool>()) << "position 0 is the end-of-text id";
    const double chi2 = chi_square_of_draws(oracle, x, V);
    // 80 degrees of freedom: chi^2 above 130 has probability below 1e-4. First hitting is exact;
    // ddpm with 64 steps per 2-token block unmasks both tokens in one step rarely.
    std::cout << sampler << ": chi^2 " << chi2 << " over 81 continuations\n";
    EXPECT_LT(chi2, 130) << sampler;
  }
}

TEST(Bd3Sampler, CacheGivesTheSameSamplesPastTheWindow) {
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    auto cfg = bd3_config(13, 8, 2);
    DDiT model = bd3_random_model(cfg, dtype, 41);
    auto graph = make_graph("absorb", 13);
    auto noise = make_noise(cfg.noise);
    for (const char* sampler : {"first-hitting", "ddpm"}) {
      const SamplerConfig sc = bd3_sampler(cfg, sampler, 5, 3, 0.9);
      DDiTScore cached(model, true), plain(model, false);
      auto a = sample(*graph, *noise, cached, 21, sc, Constraint{}, torch::arange(4), torch::kCPU);
      auto b = sample(*graph, *noise, plain, 21, sc, Constraint{}, torch::arange(4), torch::kCPU);
      EXPECT_TRUE(a.equal(b)) << sampler << " " << dtype << "\n" << a << "\n" << b;
      EXPECT_FALSE((a == 13).any().item<bool>()) << "no mask left";
      EXPECT_LT(cached.context_tokens_computed(), plain.context_tokens_computed()) << sampler;
      // A sample's draws do not depend on its batch (in float64, where the network's rounding does not
      // move a draw either).
      if (dtype == torch::kDouble) {
        DDiTScore single(model, true);
        auto one = sample(*graph, *noise, single, 21, sc, Constraint{}, torch::arange(2, 3), torch::kCPU);
        EXPECT_TRUE(one[0].equal(a[2])) << sampler;
      }
    }
  }
}

// Always the same token: its entropy is 0 and the sampler's stopping rules can be read off.
class ConstantModel final : public ScoreModel {
 public:
  ConstantModel(int64_t V, int64_t token) : V_(V), token_(token) {}
  void evaluate(const torch::Tensor&, const torch::Tensor&) override {}
  void set_context(const torch::Tensor&) override {}
  void evaluate_block(const torch::Tensor& block, const torch::Tensor&) override { n_ = block.numel(); }
  torch::Tensor rows(const torch::Tensor& r) override {
    auto out = torch::full({r.size(0), V_}, -1e9, torch::kDouble);
    out.select(1, token_).fill_(0);
    return out;
  }

 private:
  int64_t V_, token_, n_ = 0;
};

TEST(Bd3Sampler, StopsAtEndOfTextAndOnLowEntropy) {
  auto cfg = bd3_config(7, 16, 4);
  cfg.bos = 6;
  auto graph = make_graph("absorb", 7);
  auto noise = make_noise(cfg.noise);
  SamplerConfig sc;
  sc.model = cfg;
  sc.stop_at_eot = true;
  ConstantModel eot(7, 6);  // every drawn token is end-of-text: the sample ends at position 1
  auto x = sample(*graph, *noise, eot, 40, sc, Constraint{}, torch::arange(2), torch::kCPU);
  EXPECT_TRUE(x.eq(6).all().item<bool>());
  sc.stop_at_eot = false;
  sc.stop_entropy = 4;
  ConstantModel same(7, 2);  // entropy 0: stops at the first block past 256 tokens, dropping its last 256
  x = sample(*graph, *noise, same, 600, sc, Constraint{}, torch::arange(2), torch::kCPU);
  EXPECT_TRUE(x.narrow(1, 1, 3).eq(2).all().item<bool>());
  EXPECT_TRUE(x.narrow(1, 4, 596).eq(6).all().item<bool>()) << "260 tokens drawn, the last 256 dropped";
  sc.stop_entropy = 0;
  x = sample(*graph, *noise, same, 600, sc, Constraint{}, torch::arange(2), torch::kCPU);
  EXPECT_TRUE(x.narrow(1, 1, 599).eq(2).all().item<bool>()) << "no stopping rule: every token drawn";
}

TEST(Bd3Sampler, NucleusDropsTheCrossingToken) {
  auto p = torch::tensor({{0.2, 0.5, 0.3}}, torch::kDouble);
  EXPECT_TRUE(bd3_nucleus(p, 0.8).allclose(torch::tensor({{0.0, 0.5 / 0.8, 0.3 / 0.8}}, torch::kDouble)));
  EXPECT_TRUE(bd3_nucleus(p, 0.7).allclose(torch::tensor({{0.0, 1.0, 0.0}}, torch::kDouble)))
      << "0.3 crosses 0.7: dropped (the authors' rule; ar's top-p keeps it)";
  EXPECT_TRUE(bd3_nucleus(p, 0.1).allclose(torch::tensor({{0.0, 1.0, 0.0}}, torch::kDouble))) << "the top one stays";
  EXPECT_TRUE(bd3_nucleus(p, 1.0).equal(p));
}

// ---- Options and the clipped-schedule search.

TEST(Bd3Options, BadSettingsNameTheirKey) {
  auto bad = [](const std::function<void(ModelConfig&)>& change) {
    ModelConfig m = bd3_config(11, 12, 4);
    change(m);
    return error_of([&] { m.validate(); });
  };
  const std::string fine = error_of([] {});
  EXPECT_EQ(bad([](ModelConfig&) {}), fine);
  EXPECT_NE(bad([](ModelConfig& m) { m.block_size = 5; }).find("diffusion.block_size = 5 does not divide"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.block_size = 0; }).find("diffusion.block_size"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.graph = "uniform"; }).find("diffusion.graph = absorb"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.time_conditioning = true; }).find("model.time_conditioning"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.clip = "0,0.5"; }).find("(0, 1]"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.clip = "0.3,1.2"; }).find("(0, 1]"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.clip = "0.6,0.5"; }).find("beta must be below omega"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.clip = "1,1"; }).find("beta must be below omega"), std::string::npos);
  EXPECT_NE(bad([](ModelConfig& m) { m.clip = "0.3"; }).find("'beta,omega'"), std::string::npos);
  EXPECT_EQ(bad([](ModelConfig& m) { m.block_size = 1, m.clip = "1,1"; }), fine) << "the exact case";
  EXPECT_NE(bad([](ModelConfig& m) { m.objective = "mdlm", m.block_size = 0, m.clip = "0.3,0.8"; }).find("diffusion.clip"), std::string::npos)
      << "bd3's clip on an mdlm model";
  EXPECT_NE(bad([](ModelConfig& m) { m.objective = "mdlm"; }).find("diffusion.block_size"), std::string::npos);
  SamplerConfig sc;
  sc.model = bd3_config(11, 12, 4);
  sc.top_p = 0;
  EXPECT_NE(error_of([&] { sc.validate(); }).find("--top-p"), std::string::npos);
  sc.top_p = 1, sc.block_sampler = "euler";
  EXPECT_NE(error_of([&] { sc.validate(); }).find("--block-sampler"), std::string::npos);
}

TEST(Bd3Clip, WindowsAndTheirChoice) {
  const auto windows = bd3_clip_windows();
  ASSERT_EQ(windows.size(), 36u);
  EXPECT_EQ(windows[0], std::make_pair(1e-3, 1.0));
  for (const auto& [lo, hi] : windows) {
    EXPECT_GT(lo, 0.0);
    EXPECT_LE(hi, 1.0 + 1e-6);
    EXPECT_LT(lo, hi);
  }
  EXPECT_EQ(bd3_pick_window({3, 1, 2, 1}), 1u) << "the least variance, the first on ties";
  auto cfg = bd3_config(11, 12, 4);
  EXPECT_EQ(objective_of(cfg).schedule_candidates(cfg).size(), 36u);
  cfg.block_size = 1;
  EXPECT_TRUE(objective_of(cfg).schedule_candidates(cfg).empty()) << "the exact loss has no window to search";
}

// ---- End to end.

TEST(Bd3Run, TinyRunLearnsResumesSamplesAndEvaluates) {
  expect_objective_learns("--diffusion.objective bd3 --diffusion.block_size 4");
}

TEST(Bd3Run, ClipSearchChoosesAWindowThatResumeKeeps) {
  TempDir tmp;
  const std::string data = objective_data(tmp), out_dir = tmp / "run";
  const std::string flags = fmt::format(
      "--diffusion.objective bd3 --diffusion.block_size 4 --diffusion.clip_search_every 3 --data.valid '{}' "
      "--train.eval_batches 1",
      data);
  std::string out;
  ASSERT_EQ(run(objective_train(data, tmp / "straight", flags, 8), &out), 0) << out;
  EXPECT_NE(out.find("clipped schedule ("), std::string::npos) << out;
  ASSERT_EQ(run(objective_train(data, tmp / "cut", flags, 4), &out), 0) << out;
  ASSERT_EQ(run(objective_train(data, tmp / "cut", flags, 8), &out), 0) << out;
  auto s = run_losses(tmp / "straight"), c = run_losses(tmp / "cut");
  ASSERT_EQ(s.size(), c.size());
  for (size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(s[i], c[i], 1e-6 * std::abs(s[i])) << "step " << i + 1;
  h5::File f(tmp / "straight/checkpoints/step_8/model.h5", h5::Mode::Read);
  const std::string chosen = f.attr_string("/", "clip");
  bool known = false;
  for (const auto& [lo, hi] : bd3_clip_windows()) known |= chosen == bd3_clip_text(lo, hi);
  EXPECT_TRUE(known) << chosen;
  // Without validation data the search cannot run: refused up front, naming the key.
  std::string refused;
  EXPECT_EQ(run(objective_train(data, tmp / "novalid", "--diffusion.objective bd3 --diffusion.block_size 4 "
                                                        "--diffusion.clip_search_every 3",
                                2),
                &refused),
            2)
      << refused;
  EXPECT_NE(refused.find("diffusion.clip_search_every needs validation data"), std::string::npos) << refused;
}

TEST(Bd3Run, ResumesOnOneRankWithActivationCheckpointing) {
  TempDir tmp;
  const std::string data = objective_data(tmp);
  const std::string flags = "--diffusion.objective bd3 --diffusion.block_size 4";
  std::string out;
  ASSERT_EQ(run(objective_train(data, tmp / "straight", flags, 8), &out), 0) << out;
  ASSERT_EQ(run(objective_train(data, tmp / "cut", flags, 4), &out), 0) << out;
  // Steps 5 to 8 on one rank, every block recomputed in backward: the same run.
  ASSERT_EQ(run(tiny_sedd().set("train.steps", 8).set("model.scale_by_sigma", "false").command(
                    1, data, tmp / "cut", flags + " --train.activation_checkpointing blocks"),
                &out),
            0)
      << out;
  auto s = run_losses(tmp / "straight"), c = run_losses(tmp / "cut");
  ASSERT_EQ(s.size(), c.size());
  for (size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(s[i], c[i], 1e-5 * std::abs(s[i])) << "step " << i + 1;
}

TEST(Bd3Run, RefusedOptionsExitTwoNamingTheKey) {
  TempDir tmp;
  const std::string data = objective_data(tmp);
  std::string out;
  auto train = [&](const std::string& flags) {
    return run(tiny_sedd().set("train.steps", 2).set("model.scale_by_sigma", "false").command(1, data, tmp / "bad", flags),
               &out);
  };
  for (const auto& [flags, says] : std::vector<std::pair<std::string, std::string>>{
           {"--diffusion.objective bd3 --diffusion.block_size 5", "diffusion.block_size = 5 does not divide"},
           {"--diffusion.objective bd3 --diffusion.block_size 4 --diffusion.graph uniform", "diffusion.graph = absorb"},
           {"--diffusion.objective bd3 --diffusion.block_size 4 --diffusion.clip 0.5,0.2", "beta must be below omega"},
           {"--diffusion.objective bd3 --diffusion.block_size 4 --diffusion.clip 0,1", "(0, 1]"},
           {"--diffusion.objective bd3 --diffusion.block_size 4 --model.time_conditioning true", "model.time_conditioning"},
           {"--diffusion.objective mdlm --diffusion.block_size 4", "diffusion.block_size belongs to block diffusion"},
       }) {
    EXPECT_EQ(train(flags), 2) << flags << "\n" << out;
    EXPECT_NE(out.find(says), std::string::npos) << flags << "\n" << out;
  }
  // A bd3 model: the sampler options of other models, a bad --top-p and --block-size are refused.
  const std::string dir = tmp / "run";
  ASSERT_EQ(run(objective_train(data, dir, "--diffusion.objective bd3 --diffusion.block_size 4", 2), &out), 0) << out;
  // Block size and clip are in the fingerprint: a resume that changes them is refused.
  for (const std::string change : {"--diffusion.block_size 8", "--diffusion.block_size 4 --diffusion.clip 0.3,0.8"}) {
    EXPECT_EQ(run(objective_train(data, dir, "--diffusion.objective bd3 " + change, 4), &out), 2) << change << "\n" << out;
    EXPECT_NE(out.find(change.find("clip") != std::string::npos ? "diffusion.clip" : "diffusion.block_size"),
              std::string::npos)
        << out;
  }
  for (const auto& [flags, says] : std::vector<std::pair<std::string, std::string>>{
           {"--top-p 1.5", "--top-p must be in (0, 1]"},
           {"--predictor euler", "--predictor applies to"},
           {"--block-size 8", "--block-size: "},
           {"--block-sampler euler", "--block-sampler must be first-hitting or ddpm"},
           {"--stop-entropy -1", "--stop-entropy"},
       }) {
    EXPECT_EQ(run(fmt::format("{}/sedd-sample --checkpoint {} --device cpu --num-samples 1 {}", bin_dir(), dir, flags), &out), 2)
        << flags << "\n" << out;
    EXPECT_NE(out.find(says), std::string::npos) << flags << "\n" << out;
  }
}

TEST(Bd3Plan, ActivationsCountBothHalves) {
  TrainingConfig c;
  c.data.seq_len = 256;
  c.train.batch_size = 8;
  c.model.objective = "mdlm";
  c.model.time_conditioning = false;
  c.model.scale_by_sigma = false;
  const int64_t mdlm = activation_bytes(c, 8, 0, false);
  c.model.objective = "bd3";
  c.model.block_size = 16;
  const int64_t bd3 = activation_bytes(c, 8, 0, false);
  std::cout << "activations per micro-batch: mdlm " << mdlm << " B, bd3 " << bd3 << " B\n";
  // The blocks run over 2L positions; the output layer and the loss read L.
  EXPECT_GT(bd3, 1.7 * mdlm);
  EXPECT_LT(bd3, 2.0 * mdlm);
}

// The CUDA path: both attention forms in bf16 against float32, and the KV cache on the device.
TEST(Bd3Gpu, AttentionFormsAndCacheOnTheDevice) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Device gpu(torch::kCUDA, 0);
  auto cfg = bd3_config(101, 256, 16);
  cfg.hidden_size = 128;
  DDiT model = bd3_random_model(cfg, torch::kFloat, 5);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.mul_(0.1);
  }
  model->to(gpu);
  auto [x0, xt] = masked_pair(4, 256, 101, 7);
  x0 = x0.to(gpu), xt = xt.to(gpu);
  torch::NoGradGuard ng;
  auto zeros = torch::zeros({4}, torch::TensorOptions().dtype(torch::kFloat).device(gpu));
  auto reference = model->forward_hidden(torch::cat({xt, x0}, 1), zeros).h;
  model->bf16 = true;
  for (auto form : {BlockAttention::Split, BlockAttention::Mask}) {
    model->set_block_attention(form);
    auto h = model->forward_hidden(torch::cat({xt, x0}, 1), zeros).h;
    const double err = error_of_scale(h, reference);
    std::cout << (form == BlockAttention::Split ? "split" : "mask") << " bf16 vs fp32: " << err << "\n";
    EXPECT_LT(err, 3e-2);
  }
  model->set_block_attention(BlockAttention::Split);
  auto graph = make_graph("absorb", 101);
  auto noise = make_noise(cfg.noise);
  SamplerConfig sc;
  sc.model = cfg;
  sc.seed = 2;
  DDiTScore cached(model, true), plain(model, false);
  auto a = sample(*graph, *noise, cached, 320, sc, Constraint{}, torch::arange(4), gpu).cpu();
  auto b = sample(*graph, *noise, plain, 320, sc, Constraint{}, torch::arange(4), gpu).cpu();
  const double equal = a.eq(b).to(torch::kDouble).mean().item<double>();
  std::cout << "bf16 cached vs plain: " << equal << " of the tokens equal\n";
  EXPECT_GE(equal, 0.99);
}

TEST(Bd3Run, ScoresContinuationsTheSameOnOneAndTwoRanks) {
  TempDir tmp;
  const std::string data = objective_data(tmp), dir = tmp / "run";
  std::string out;
  ASSERT_EQ(run(objective_train(data, dir, "--diffusion.objective bd3 --diffusion.block_size 4", 20), &out), 0) << out;
  std::ofstream(tmp / "req.jsonl") << "{\"id\": \"a\", \"context_ids\": [1, 2, 3, 4, 5], \"continuation_ids\": [6, 7, 8]}\n"
                                   << "{\"id\": \"b\", \"context_ids\": [9], \"continuation_ids\": [10, 11, 12, 13, 14]}\n";
  std::vector<std::vector<nlohmann::json>> rows;
  for (int np : {1, 2}) {
    const std::string file = tmp / fmt::format("scores{}.jsonl", np);
    ASSERT_EQ(run(fmt::format("{} -np {} {}/sedd-score --checkpoint {} --requests {} --out {} --device cpu --mc-samples 8",
                              kMpirun, np, bin_dir(), dir, tmp / "req.jsonl", file),
                  &out),
              0)
        << out;
    rows.push_back(read_jsonl(file));
  }
  ASSERT_EQ(rows[0].size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const double logprob = rows[0][i]["logprob"].get<double>();
    EXPECT_LT(logprob, 0.0) << rows[0][i];
    EXPECT_TRUE(std::isfinite(logprob)) << rows[0][i];
    EXPECT_TRUE(rows[0][i]["is_greedy"].is_boolean()) << rows[0][i];
    // Keyed draws: the same rows on any number of ranks (to float32 rounding: other batches).
    EXPECT_NEAR(logprob, rows[1][i]["logprob"].get<double>(), 1e-6 * std::abs(logprob)) << rows[1][i];
    EXPECT_EQ(rows[0][i]["is_greedy"], rows[1][i]["is_greedy"]);
    EXPECT_EQ(rows[0][i]["tokens"], rows[1][i]["tokens"]);
  }
}

}  // namespace
