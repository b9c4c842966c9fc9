// What the objectives' test files share; see oracles.h.
#include "objectives/oracles.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "diffusion/noise.h"
#include "eval/elbo.h"
#include "io/fs.h"
#include "recipes.h"
#include "test_util.h"

namespace sedd::test {

// A motif of 37 tokens repeated 80 times, then 500 uniform tokens (vocabulary 40, end-of-text 39).
std::string objective_data(const TempDir& tmp, torch::Tensor* tokens) {
  torch::manual_seed(7);
  auto motif = torch::randint(39, {37});
  auto all = torch::cat({motif.repeat({80}), torch::randint(39, {500})});
  write_shard(tmp / "o0.h5", all, 40, 39, "byte");
  if (tokens) *tokens = all;
  return tmp / "o*.h5";
}

torch::Tensor draw_truth(const torch::Tensor& p, int64_t n, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto u = torch::rand({n, p.size(0), 1}, gen, torch::kDouble);
  return (p.cumsum(-1).unsqueeze(0) < u).sum(-1).clamp_max(p.size(1) - 1);
}

namespace {

// Entropy (nats) of the token frequencies of `tokens`: the best a model that ignores the context
// can do on them (its mean log-loss is a cross entropy against these frequencies, never below it).
double unigram_entropy(const torch::Tensor& tokens, int64_t vocab) {
  auto f = torch::bincount(tokens.flatten(), {}, vocab).to(torch::kDouble) / static_cast<double>(tokens.numel());
  f = f.masked_select(f > 0);
  return -(f * f.log()).sum().item<double>();
}

}  // namespace

std::string objective_train(const std::string& data, const std::string& dir, const std::string& objective,
                            int64_t steps) {
  return tiny_sedd().set("train.steps", steps).set("model.scale_by_sigma", "false").command(2, data, dir, objective);
}

void expect_clean_token_oracle_is_exact(const char* objective, const char* graph) {
  const int64_t L = 5, N = 5;
  auto p = position_marginals(L, N);
  const double entropy = -(p * p.log()).sum().item<double>();
  auto g = make_graph(graph, N);
  NoiseConfig nc{"loglinear"};
  if (std::string(graph) == "uniform") nc = NoiseConfig{"geometric", 1e-3, 1e-4, 20.0};
  auto noise = make_noise(nc);
  CleanTokenOracle oracle(*g, p, std::string(objective) == "d3pm");
  ModelConfig spec = test::objective_config(objective, 50, -1);
  auto x0 = draw_truth(p, 400, 3);
  ElboConfig ec{32, "antithetic", 1};
  ec.model = spec;
  auto r = elbo_batch(*g, *noise, oracle, x0, 0, ec, torch::kCPU);
  double mean = r.bound.mean().item<double>(), se = r.bound.std().item<double>() / std::sqrt(400.0);
  std::cout << objective << "/" << graph << ": bound " << mean << " +- " << se << " nats/sequence, entropy "
            << entropy << " (prior " << r.prior_nats << ")\n";
  EXPECT_GE(mean, entropy - 4 * se) << objective << " " << graph << ": a bound below the entropy";
  EXPECT_NEAR(mean, entropy, 4 * se + 0.02 * entropy) << objective << " " << graph;
  SamplerConfig sc;
  sc.model = spec;
  sc.steps = 50;
  sc.seed = 7;
  sc.float64 = true;
  auto x = sample(*g, *noise, oracle, L, sc, Constraint{}, torch::arange(4000, torch::kLong), torch::kCPU);
  ASSERT_TRUE((x >= 0).all().item<bool>() && (x < N).all().item<bool>()) << "a mask survived";
  double chi2 = chi_square(x, p);
  std::cout << objective << "/" << graph << " sampler: chi2 " << chi2 << " (critical 45.3, 20 dof, p = 0.001)\n";
  EXPECT_LT(chi2, 45.3) << objective << " " << graph;
}

void expect_objective_learns(const std::string& objective) {
  TempDir tmp;
  torch::Tensor tokens;
  std::string data = objective_data(tmp, &tokens), out;
  // sedd-eval below reads the first 16 windows of 16 tokens in order (no shuffle): 256 tokens of
  // the motif. Their true entropy is at most log(37) / 16 = 0.23 nats/token (a window is fixed by
  // its phase in the motif); a model that ignores the context cannot beat their unigram entropy.
  const double context_free = unigram_entropy(tokens.narrow(0, 0, 16 * 16), 40);
  std::cout << "evaluated windows: unigram entropy " << context_free << " nats/token, at most " << std::log(37.0) / 16
            << " with the motif known\n";
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
  auto e = nlohmann::json::parse(sedd::fs::read_text(tmp / "e.json"));
  const double nats = e["nats_per_token"].get<double>();
  std::cout << objective << ": evaluated bound " << nats << " nats/token\n";
  EXPECT_GT(nats, 0.0) << objective;
  EXPECT_LT(nats, context_free) << objective << ": no better than a model without context";
}

}  // namespace sedd::test
