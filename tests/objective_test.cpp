// The objectives beyond score entropy (masked diffusion, D3PM, autoregressive) against closed
// forms on small vocabularies: forward marginals and posteriors against explicit matrix products,
// bounds and samplers with exact oracles, and real training runs (the loss falls, resume repeats).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "diffusion/discrete.h"
#include "diffusion/loss.h"
#include "diffusion/sampler.h"
#include "eval/elbo.h"
#include "io/error.h"
#include "io/fs.h"
#include "model/objective.h"
#include "recipes.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// The ideal clean-token prediction for a distribution with independent positions (marginal p[l]):
// log p~(x0_l = y | x_t) [.., N]. A masked position knows nothing but p[l]; a kept one is its
// token. Under the uniform graph, masked diffusion and SEDD would want the posterior
// p(y) q(x_t | y); D3PM's parameterisation p(x_{t-1} | x_t) ~ sum_y q(x_{t-1}, x_t | y) p~(y) is
// exact for p~ = p(y) itself (the joint then sums to p(x_{t-1}, x_t)), which `d3pm` selects.
class CleanTokenOracle final : public ScoreModel {
 public:
  CleanTokenOracle(const Graph& g, torch::Tensor p, bool d3pm) : g_(g), p_(std::move(p)), d3pm_(d3pm) {}
  void evaluate(const torch::Tensor& x, const torch::Tensor& sigma) override {
    const int64_t B = x.size(0), L = x.size(1), N = g_.tokens();
    auto p = p_.unsqueeze(0).expand({B, L, N});
    torch::Tensor post;
    if (g_.absorbing()) {
      auto kept = torch::nn::functional::one_hot(x.clamp_max(N - 1), N).to(torch::kDouble);
      post = torch::where((x == N).unsqueeze(-1), p, kept);
    } else if (d3pm_) {
      post = p;
    } else {  // p(y) q(x_t | y): keep e^-sigma, else uniform
      auto keep = torch::exp(-sigma.to(torch::kDouble)).view({B, 1, 1});
      auto like = keep * torch::nn::functional::one_hot(x, N).to(torch::kDouble) + (1 - keep) / static_cast<double>(N);
      post = p * like;
      post = post / post.sum(-1, true);
    }
    last_ = post.clamp_min(1e-300).log();
  }
  torch::Tensor rows(const torch::Tensor& r) override { return last_.view({-1, last_.size(-1)}).index_select(0, r); }

 private:
  const Graph& g_;
  torch::Tensor p_, last_;
  bool d3pm_;
};

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



torch::Tensor draw_truth(const torch::Tensor& p, int64_t n, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto u = torch::rand({n, p.size(0), 1}, gen, torch::kDouble);
  return (p.cumsum(-1).unsqueeze(0) < u).sum(-1).clamp_max(p.size(1) - 1);
}

}  // namespace

// q(x_t | x0) and q(x_{t-1} | x_t, x0) of the T-step chain equal explicit products of the one-step
// matrices; the x0-parameterised p(x_{t-1} | x_t) is D3PM's normalised sum over x0.
TEST(ObjectiveD3pm, MarginalsAndPosteriorsEqualExplicitMatrixProducts) {
  const int64_t N = 4, T = 6;
  for (const char* kind : {"absorb", "uniform"}) {
    auto g = make_graph(kind, N);
    auto noise = make_noise(NoiseConfig{"loglinear"});
    const int64_t D = g->dim();
    std::vector<double> sigma(T + 1);
    for (int64_t t = 0; t <= T; ++t)
      sigma[t] = discrete_sigma(*noise, torch::tensor({t}), T).item<double>();
    EXPECT_EQ(sigma[0], 0.0);
    // One-step matrices Q_t (row: from), their running product Qbar_t.
    std::vector<torch::Tensor> Qbar = {torch::eye(D, torch::kDouble)};
    for (int64_t t = 1; t <= T; ++t) {
      auto Q = transition_matrix(*g, sigma[t] - sigma[t - 1]);
      EXPECT_TRUE(torch::allclose(Q.sum(1), torch::ones({D}, torch::kDouble))) << "rows of Q_t are distributions";
      Qbar.push_back(Qbar.back().mm(Q));
    }
    auto states = torch::arange(D, torch::kLong), tokens = torch::arange(N, torch::kLong);
    for (int64_t t = 1; t <= T; ++t) {
      // q(x_t | x0) = row x0 of Qbar_t.
      auto q = g->transition(tokens, torch::full({N}, sigma[t], torch::kDouble));
      EXPECT_LT((q - Qbar[t].narrow(0, 0, N)).abs().max().item<double>(), 1e-12) << kind << " t=" << t;
      auto Qt = transition_matrix(*g, sigma[t] - sigma[t - 1]);
      for (int64_t x0 = 0; x0 < N; ++x0)
        for (int64_t xt = 0; xt < D; ++xt) {
          if (Qbar[t][x0][xt].item<double>() == 0) continue;  // impossible x_t
          // Bayes with the matrices: q(x_{t-1} = j | x_t, x0) = Qbar_{t-1}[x0, j] Q_t[j, x_t] / Qbar_t[x0, x_t].
          auto brute = Qbar[t - 1][x0] * Qt.select(1, xt) / Qbar[t][x0][xt];
          auto ours = g->posterior(torch::tensor({xt}), torch::tensor({x0}), torch::tensor({sigma[t - 1]}, torch::kDouble),
                                   torch::tensor({sigma[t]}, torch::kDouble))[0];
          EXPECT_LT((ours - brute).abs().max().item<double>(), 1e-12) << kind << " t=" << t << " x0=" << x0 << " xt=" << xt;
        }
      // p(x_{t-1} | x_t) for a clean-token distribution p0: normalise(sum_x0 p0(x0) Qbar_{t-1}[x0, .] Q_t[., x_t]).
      auto p0 = torch::tensor({0.1, 0.2, 0.3, 0.4}, torch::kDouble);
      for (int64_t xt = 0; xt < D; ++xt) {
        auto joint = p0.unsqueeze(0).mm(Qbar[t - 1].narrow(0, 0, N)).squeeze(0) * Qt.select(1, xt);
        if (joint.sum().item<double>() == 0) continue;
        auto ours = g->model_posterior(torch::tensor({xt}), p0.unsqueeze(0), torch::tensor({sigma[t - 1]}, torch::kDouble),
                                       torch::tensor({sigma[t]}, torch::kDouble))[0];
        EXPECT_LT((ours - joint / joint.sum()).abs().max().item<double>(), 1e-12) << kind << " xt=" << xt;
      }
    }
  }
}

// With the exact clean-token posterior, the masked-diffusion and D3PM bounds are tight (equal to the
// entropy within Monte Carlo error), and their ancestral samplers reproduce the marginals.
TEST(ObjectiveOracle, BoundsAreTightAndSamplersReproduceTheMarginals) {
  const int64_t L = 5, N = 5;
  auto p = position_marginals(L, N);
  const double entropy = -(p * p.log()).sum().item<double>();
  struct Case {
    const char* objective;
    const char* graph;
  };
  for (Case c : {Case{"mdlm", "absorb"}, Case{"d3pm", "absorb"}, Case{"d3pm", "uniform"}}) {
    auto g = make_graph(c.graph, N);
    NoiseConfig nc{"loglinear"};
    if (std::string(c.graph) == "uniform") nc = NoiseConfig{"geometric", 1e-3, 1e-4, 20.0};
    auto noise = make_noise(nc);
    CleanTokenOracle oracle(*g, p, std::string(c.objective) == "d3pm");
    ObjectiveSpec spec{c.objective, 50, -1};
    auto x0 = draw_truth(p, 400, 3);
    ElboConfig ec{32, "antithetic", 1};
    ec.objective = spec;
    auto r = elbo_batch(*g, *noise, oracle, x0, 0, ec, torch::kCPU);
    double mean = r.bound.mean().item<double>(), se = r.bound.std().item<double>() / std::sqrt(400.0);
    std::cout << c.objective << "/" << c.graph << ": bound " << mean << " +- " << se << " nats/sequence, entropy "
              << entropy << " (prior " << r.prior_nats << ")\n";
    EXPECT_GE(mean, entropy - 4 * se) << c.objective << " " << c.graph << ": a bound below the entropy";
    EXPECT_NEAR(mean, entropy, 4 * se + 0.02 * entropy) << c.objective << " " << c.graph;
    SamplerConfig sc;
    sc.objective = spec;
    sc.steps = 50;
    sc.seed = 7;
    sc.float64 = true;
    auto x = sample(*g, *noise, oracle, L, sc, Constraint{}, torch::arange(4000, torch::kLong), torch::kCPU);
    ASSERT_TRUE((x >= 0).all().item<bool>() && (x < N).all().item<bool>()) << "a mask survived";
    double chi2 = chi_square(x, p);
    std::cout << c.objective << "/" << c.graph << " sampler: chi2 " << chi2 << " (critical 45.3, 20 dof, p = 0.001)\n";
    EXPECT_LT(chi2, 45.3) << c.objective << " " << c.graph;
  }
}

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
  sc.objective = ObjectiveSpec{"ar", 0, bos};
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
  ec.objective = sc.objective;
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

namespace {
// A motif of 37 tokens repeated 80 times, then 500 uniform tokens (vocabulary 40, end-of-text 39).
std::string objective_data(const TempDir& tmp, torch::Tensor* tokens = nullptr) {
  torch::manual_seed(7);
  auto motif = torch::randint(39, {37});
  auto all = torch::cat({motif.repeat({80}), torch::randint(39, {500})});
  write_shard(tmp / "o0.h5", all, 40, 39, "byte");
  if (tokens) *tokens = all;
  return tmp / "o*.h5";
}

// Entropy (nats) of the token frequencies of `tokens`: the best a model that ignores the context
// can do on them (its mean log-loss is a cross entropy against these frequencies, never below it).
double unigram_entropy(const torch::Tensor& tokens, int64_t vocab) {
  auto f = torch::bincount(tokens.flatten(), {}, vocab).to(torch::kDouble) / static_cast<double>(tokens.numel());
  f = f.masked_select(f > 0);
  return -(f * f.log()).sum().item<double>();
}

std::string objective_train(const std::string& data, const std::string& dir, const std::string& objective,
                            int64_t steps) {
  return tiny_sedd().set("train.steps", steps).set("model.scale_by_sigma", "false").command(2, data, dir, objective);
}

}  // namespace

// Each objective trains in the one engine (loss falls), resumes exactly, samples and evaluates.
TEST(ObjectiveTraining, EachObjectiveLearnsResumesSamplesAndEvaluates) {
  TempDir tmp;
  torch::Tensor tokens;
  std::string data = objective_data(tmp, &tokens), out;
  // sedd-eval below reads the first 16 windows of 16 tokens in order (no shuffle): 256 tokens of
  // the motif. Their true entropy is at most log(37) / 16 = 0.23 nats/token (a window is fixed by
  // its phase in the motif); a model that ignores the context cannot beat their unigram entropy.
  const double context_free = unigram_entropy(tokens.narrow(0, 0, 16 * 16), 40);
  std::cout << "evaluated windows: unigram entropy " << context_free << " nats/token, at most " << std::log(37.0) / 16
            << " with the motif known\n";
  for (std::string objective : {"--diffusion.objective mdlm", "--diffusion.objective d3pm --diffusion.timesteps 50",
                                "--diffusion.objective d3pm --diffusion.graph uniform --diffusion.timesteps 50",
                                "--diffusion.objective ar --model.time_conditioning false"}) {
    std::string dir = tmp / fmt::format("run{}", std::hash<std::string>{}(objective) % 100000);
    const int64_t steps = 150, window = 15;
    ASSERT_EQ(run(objective_train(data, dir, objective, steps), &out), 0) << objective << "\n" << out;
    auto a = run_losses(dir);
    ASSERT_EQ(a.size(), static_cast<size_t>(steps));
    double first = 0, last = 0;
    for (int64_t i = 0; i < window; ++i) first += a[i] / window, last += a[steps - 1 - i] / window;
    std::cout << objective << ": loss " << first << " -> " << last << " (means of the first and last " << window
              << " steps)\n";
    EXPECT_LT(last, 0.85 * first) << objective;
    // Resume: 4 steps, then on to 8, equals 8 straight.
    std::string straight = dir + "-straight", cut = dir + "-cut";
    ASSERT_EQ(run(objective_train(data, straight, objective, 8), &out), 0) << out;
    ASSERT_EQ(run(objective_train(data, cut, objective, 4), &out), 0) << out;
    ASSERT_EQ(run(objective_train(data, cut, objective, 8), &out), 0) << out;
    auto s = run_losses(straight), c = run_losses(cut);
    ASSERT_EQ(s.size(), c.size());
    for (size_t i = 0; i < s.size(); ++i) EXPECT_NEAR(s[i], c[i], 1e-6 * std::abs(s[i])) << objective << " step " << i + 1;
    ASSERT_EQ(run(fmt::format("{} -np 2 {}/sedd-sample --checkpoint {} --device cpu --num-samples 3 --steps 10 --fix 0=5,1=6 --out {}",
                              kMpirun, bin_dir(), dir, tmp / "s.jsonl"),
                  &out),
              0)
        << objective << "\n" << out;
    {  // Every sample, drawn on either rank, holds the fixed ids at the fixed positions.
      std::ifstream in(tmp / "s.jsonl");
      int64_t samples = 0;
      for (std::string line; std::getline(in, line); ++samples) {
        auto ids = nlohmann::json::parse(line)["ids"].get<std::vector<int64_t>>();
        ASSERT_EQ(ids.size(), 16u) << objective << ": " << line;
        EXPECT_EQ(ids[0], 5) << objective << ": --fix 0=5 not honoured in " << line;
        EXPECT_EQ(ids[1], 6) << objective << ": --fix 1=6 not honoured in " << line;
      }
      EXPECT_EQ(samples, 3) << objective;
    }
    ASSERT_EQ(run(fmt::format("{} -np 2 {}/sedd-eval --checkpoint {} --device cpu --data '{}' --mc-samples 4 --max-sequences 16 --json {}",
                              kMpirun, bin_dir(), dir, data, tmp / "e.json"),
                  &out),
              0)
        << objective << "\n" << out;
    auto e = nlohmann::json::parse(fs::read_text(tmp / "e.json"));
    const double nats = e["nats_per_token"].get<double>();
    std::cout << objective << ": evaluated bound " << nats << " nats/token\n";
    EXPECT_GT(nats, 0.0) << objective;
    EXPECT_LT(nats, context_free) << objective << ": no better than a model without context";
  }
}

// Stratified and antithetic times over the global batch: the same expected loss, less variance
// between batches (measured over many steps with a fixed network and fixed data). The score-entropy
// loss of an untrained network depends strongly on t, which is where spreading the times helps.
TEST(ObjectiveTimeSampling, StratifiedAndAntitheticTimesReduceTheLossVariance) {
  ModelConfig cfg;
  cfg.objective = "sedd";
  cfg.tokens = 20;
  cfg.hidden_size = 32;
  cfg.n_heads = 2;
  cfg.n_blocks = 1;
  cfg.cond_dim = 16;
  cfg.length = 64;
  torch::manual_seed(3);
  DDiT m(cfg);
  {
    torch::NoGradGuard ng;
    for (auto& p : m->parameters()) p.normal_(0, 0.3);
  }
  m->eval();
  auto g = make_graph("absorb", cfg.tokens);
  auto noise = make_noise(cfg.noise);
  const int64_t B = 16;
  auto x0 = torch::randint(cfg.tokens, {B, cfg.length}, torch::kLong);
  auto rows = torch::arange(B, torch::kLong);
  std::map<std::string, std::pair<double, double>> stats;  // mean, variance of the batch loss
  torch::NoGradGuard ng;
  for (const char* mode : {"iid", "stratified", "antithetic"}) {
    std::vector<double> v;
    for (uint64_t step = 1; step <= 200; ++step) {
      LossDraws d{11, step, rows, time_uniforms(mode, 11, step, rows, B)};
      v.push_back(training_loss(m, *g, *noise, x0, d, nullptr, LossOptions{}).mean().item<double>());
    }
    auto t = torch::tensor(v, torch::kDouble);
    stats[mode] = {t.mean().item<double>(), t.var().item<double>()};
    std::cout << mode << ": batch loss mean " << stats[mode].first << ", variance " << stats[mode].second << "\n";
  }
  for (const char* mode : {"stratified", "antithetic"}) {
    EXPECT_LT(stats[mode].second, stats["iid"].second) << mode;
    double se = std::sqrt(stats["iid"].second / 200);
    EXPECT_NEAR(stats[mode].first, stats["iid"].first, 5 * se) << mode << " changed the expected loss";
  }
  std::cout << "variance reduction: stratified " << stats["iid"].second / stats["stratified"].second
            << "x, antithetic " << stats["iid"].second / stats["antithetic"].second << "x\n";
  // The figures docs/training.md states (stratified 2.6x, antithetic 1.5x). Every draw is keyed (network
  // seed 3, data, times and corruption keyed by seed 11 and the step), so the ratios are fixed up to
  // the summation order of the CPU's threads (measured 2.60x and 1.49x on every run); the margins
  // (2.0x, 1.2x) are about 1.5 standard deviations of a ratio of two 200-step variances (~14%),
  // should the draws ever change.
  EXPECT_GE(stats["iid"].second / stats["stratified"].second, 2.0) << "docs/training.md: stratified times cut the variance 2.6x";
  EXPECT_GE(stats["iid"].second / stats["antithetic"].second, 1.2) << "docs/training.md: antithetic times cut it 1.5x";
  // Stratified times cover [0, 1) once per batch, whatever the ranks: one time per B-th.
  auto u = time_uniforms("stratified", 1, 5, rows, B);
  EXPECT_TRUE(torch::equal((u * B).floor().to(torch::kLong), rows));
  EXPECT_TRUE(torch::equal(time_uniforms("stratified", 1, 5, rows.narrow(0, 8, 8), B), u.narrow(0, 8, 8)));
}
