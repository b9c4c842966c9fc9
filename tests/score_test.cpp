// Conditional likelihood (sedd-score) against a Markov chain whose conditional probabilities are
// known exactly, and the command line on real checkpoints and real mpirun ranks.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "eval/conditional.h"
#include "io/error.h"
#include "io/fs.h"
#include "model/weights.h"
#include "train/checkpoint.h"
#include "recipes.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// The chain: states 0..N-1, each moving to its successor (p 0.75) or the one after (p 0.25);
// doubly stochastic, so its stationary law (the first state after an end-of-text id) is uniform.
// Token N is the end-of-text id.
struct ScoreChain {
  static constexpr int64_t N = 6;
  torch::Tensor P = torch::zeros({N, N}, torch::kDouble);
  torch::Tensor pi = torch::full({N}, 1.0 / N, torch::kDouble);
  ScoreChain() {
    for (int64_t i = 0; i < N; ++i) {
      P[i][(i + 1) % N] = 0.75;
      P[i][(i + 2) % N] = 0.25;
    }
  }
  // log p(y | context) exactly: the first continuation state follows the last context state (pi
  // after an end-of-text id, i.e. for an empty context).
  double log_conditional(const std::vector<int64_t>& c, const std::vector<int64_t>& y) const {
    double lp = c.empty() ? std::log(pi[y[0]].item<double>()) : std::log(P[c.back()][y[0]].item<double>());
    for (size_t k = 1; k < y.size(); ++k) lp += std::log(P[y[k - 1]][y[k]].item<double>());
    return lp;
  }
  // Greedy decoding reproduces y: every state is its predecessor's successor (the most likely move,
  // 0.75; and with only the left side known, the next position is always the most confident).
  static bool all_successors(const std::vector<int64_t>& c, const std::vector<int64_t>& y) {
    int64_t prev = c.back();
    for (int64_t v : y) {
      if (v != (prev + 1) % N) return false;
      prev = v;
    }
    return true;
  }
  // n requests drawn from the chain: a context of 1..max_c states, a continuation of 1..max_y.
  std::vector<ScoreRequest> draw(int64_t n, int64_t max_c, int64_t max_y, uint64_t seed) const {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    std::vector<ScoreRequest> out;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t nc = 1 + torch::randint(max_c, {1}, gen).item<int64_t>();
      const int64_t ny = 1 + torch::randint(max_y, {1}, gen).item<int64_t>();
      std::vector<int64_t> s = {torch::randint(N, {1}, gen).item<int64_t>()};
      while (static_cast<int64_t>(s.size()) < nc + ny)
        s.push_back((s.back() + (torch::rand({1}, gen).item<double>() < 0.75 ? 1 : 2)) % N);
      ScoreRequest r;
      r.line = i + 1;
      r.context.assign(s.begin(), s.begin() + nc);
      r.continuation.assign(s.begin() + nc, s.end());
      out.push_back(r);
    }
    return out;
  }
};

// The exact next-state law of the chain as an autoregressive model: log-probabilities [R, N + 1]
// (the end-of-text column at log 1e-300).
class ScoreMarkovNextToken final : public ScoreModel {
 public:
  explicit ScoreMarkovNextToken(const ScoreChain& c) : c_(c) {}
  void evaluate(const torch::Tensor& x, const torch::Tensor&) override {
    const int64_t N = ScoreChain::N;
    auto table = torch::cat({c_.P, c_.pi.unsqueeze(0)}, 0);  // row N: after the end-of-text id
    auto next = table.index_select(0, x.reshape({-1}).clamp_max(N));
    last_ = torch::cat({next, torch::zeros({next.size(0), 1}, torch::kDouble)}, 1).clamp_min(1e-300).log();
  }
  torch::Tensor rows(const torch::Tensor& r) override { return last_.index_select(0, r); }

 private:
  const ScoreChain& c_;
  torch::Tensor last_;
};

// The exact denoiser of the chain under the absorbing graph (mask id N + 1): a masked position's
// state given the unmasked ones depends only on its nearest unmasked neighbours, a on the left
// (pi after an end-of-text id) and b on the right, d_a and d_b positions away:
// p(v) ~ (P^d_a)[a, v] (P^d_b)[v, b]. Output: log-probabilities of the clean token [R, N + 1]
// (mdlm, d3pm) or the absorbing log-score log p(v) - log(e^sigma - 1), mask column 0 (sedd).
class ScoreMarkovDenoiser final : public ScoreModel {
 public:
  ScoreMarkovDenoiser(const ScoreChain& c, bool score_entropy, int64_t L) : score_entropy_(score_entropy) {
    powers_.push_back(torch::eye(ScoreChain::N, torch::kDouble));
    for (int64_t k = 1; k <= L; ++k) powers_.push_back(powers_.back().mm(c.P));
  }
  void evaluate(const torch::Tensor& x_in, const torch::Tensor& sigma_in) override {
    const int64_t N = ScoreChain::N, mask = N + 1;
    auto x = x_in.cpu();
    auto sigma = sigma_in.to(torch::kDouble).cpu();
    const int64_t B = x.size(0), L = x.size(1);
    auto xa = x.accessor<int64_t, 2>();
    auto probs = torch::zeros({B, L, N + 1}, torch::kDouble);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L; ++l) {
        if (xa[b][l] != mask) continue;
        int64_t i = l - 1, j = l + 1;
        while (i >= 0 && xa[b][i] == mask) --i;
        while (j < L && xa[b][j] == mask) ++j;
        auto left = (i < 0 || xa[b][i] == N) ? torch::full({N}, 1.0 / N, torch::kDouble) : powers_[l - i][xa[b][i]];
        auto p = j < L ? left * powers_[j - l].select(1, xa[b][j]) : left.clone();
        probs[b][l].narrow(0, 0, N).copy_(p / p.sum());
      }
    auto logp = probs.clamp_min(1e-300).log().view({B * L, N + 1});
    if (score_entropy_) {
      auto shift = torch::log(torch::expm1(sigma)).repeat_interleave(L).unsqueeze(1);
      last_ = torch::cat({logp - shift, torch::zeros({B * L, 1}, torch::kDouble)}, 1);
    } else {
      last_ = logp;
    }
  }
  torch::Tensor rows(const torch::Tensor& r) override { return last_.index_select(0, r); }

 private:
  bool score_entropy_;
  std::vector<torch::Tensor> powers_;
  torch::Tensor last_;
};

std::vector<const ScoreRequest*> score_pointers(const std::vector<ScoreRequest>& v) {
  std::vector<const ScoreRequest*> p;
  for (const auto& r : v) p.push_back(&r);
  return p;
}

std::vector<int64_t> score_keys(int64_t n) {
  std::vector<int64_t> k(n);
  for (int64_t i = 0; i < n; ++i) k[i] = i;
  return k;
}

}  // namespace

// The autoregressive score is the chain's exact conditional log-probability, whatever the context
// length (empty, fitting, truncated to the window) and the batching; is_greedy is "every state is
// the most likely move".
TEST(ScoreConditional, AutoregressiveScoreIsTheExactMarkovConditional) {
  ScoreChain chain;
  const int64_t L = 12;
  auto reqs = chain.draw(40, 20, 6, 3);  // contexts up to 20: many do not fit in 12
  ScoreRequest empty;
  empty.continuation = {2, 3, 5};
  reqs.push_back(empty);
  auto graph = make_graph("absorb", ScoreChain::N + 1);
  auto noise = make_noise(NoiseConfig{"loglinear"});
  ScoreMarkovNextToken oracle(chain);
  ScoreOptions o;
  o.elbo.model = test::objective_config("ar", 1000, ScoreChain::N);
  o.window = L;
  o.pad_id = ScoreChain::N;
  int64_t truncated = 0, greedy = 0;
  for (int64_t batch : {1, 7}) {
    o.batch_size = batch;
    auto res = score_requests(*graph, *noise, oracle, score_pointers(reqs), score_keys(reqs.size()), o, torch::kCPU);
    ASSERT_EQ(res.size(), reqs.size());
    truncated = greedy = 0;
    for (size_t i = 0; i < reqs.size(); ++i) {
      const auto& r = reqs[i];
      // What the window keeps of the context: its last L - |y| states (an empty one: pi).
      const int64_t keep = std::min<int64_t>(r.context.size(), L - r.continuation.size());
      std::vector<int64_t> kept(r.context.end() - keep, r.context.end());
      EXPECT_NEAR(res[i].logprob, chain.log_conditional(kept, r.continuation), 1e-12) << "request " << i;
      EXPECT_EQ(res[i].stderr_mc, 0.0);
      EXPECT_EQ(res[i].tokens, static_cast<int64_t>(r.continuation.size()));
      EXPECT_EQ(res[i].truncated_context, static_cast<int64_t>(r.context.size()) - keep) << i;
      // A first-order chain forgets everything before the last context state.
      if (!r.context.empty()) {
        EXPECT_NEAR(res[i].logprob, chain.log_conditional(r.context, r.continuation), 1e-12) << i;
        EXPECT_EQ(res[i].is_greedy, ScoreChain::all_successors(r.context, r.continuation) ? 1 : 0) << i;
        greedy += res[i].is_greedy;
      }
      truncated += res[i].truncated_context > 0;
    }
  }
  std::cout << truncated << " of " << reqs.size() << " contexts truncated, " << greedy << " greedy\n";
  EXPECT_GT(truncated, 5) << "the test must exercise truncation";
  EXPECT_GT(greedy, 3) << "the test must see greedy continuations";
  EXPECT_LT(greedy, static_cast<int64_t>(reqs.size()) - 5);
}

// With the chain's exact denoiser the conditional bound is tight: its expectation is
// -log p(y | context) plus the prior term (1e-3 log 7 nats per continuation token), so the mean of
// (exact - logprob) is >= 0 within its standard error and close to 0, and the Monte Carlo error of
// each request shrinks with K (as 1/sqrt(K): 4x from K = 4 to K = 64), and the reported standard
// error covers it (at K = 64, at least 85% of the requests within 4 of it).
// is_greedy is the same "every state is the most likely move" as the autoregressive one.
TEST(ScoreConditional, DiffusionBoundIsTightWithTheExactDenoiserAndTightensWithK) {
  ScoreChain chain;
  const int64_t L = 12;
  auto reqs = chain.draw(48, 10, 5, 4);
  auto graph = make_graph("absorb", ScoreChain::N + 1);
  auto noise = make_noise(NoiseConfig{"loglinear"});
  for (const char* objective : {"sedd", "mdlm", "d3pm"}) {
    ScoreMarkovDenoiser oracle(chain, std::string(objective) == "sedd", L);
    ScoreOptions o;
    o.elbo.model = test::objective_config(objective, 1000, -1);
    o.window = L;
    o.pad_id = ScoreChain::N;
    o.batch_size = 16;
    std::map<int64_t, double> mean_abs_gap;
    for (int64_t K : {4, 64}) {
      o.elbo.mc_samples = K;
      auto res = score_requests(*graph, *noise, oracle, score_pointers(reqs), score_keys(reqs.size()), o, torch::kCPU);
      std::vector<double> gaps;
      int64_t within = 0;
      for (size_t i = 0; i < reqs.size(); ++i) {
        const double exact = chain.log_conditional(reqs[i].context, reqs[i].continuation);
        gaps.push_back(exact - res[i].logprob);
        mean_abs_gap[K] += std::abs(gaps.back()) / static_cast<double>(reqs.size());
        within += std::abs(gaps.back()) <= 4 * res[i].stderr_mc + 0.01;
        if (K == 64)
          EXPECT_EQ(res[i].is_greedy, ScoreChain::all_successors(reqs[i].context, reqs[i].continuation) ? 1 : 0)
              << objective << " request " << i;
      }
      auto g = torch::tensor(gaps, torch::kDouble);
      const double mean = g.mean().item<double>(), se = g.std().item<double>() / std::sqrt(double(gaps.size()));
      std::cout << objective << " K=" << K << ": mean(exact - logprob) " << mean << " +- " << se << ", mean |gap| "
                << mean_abs_gap[K] << ", " << within << "/" << reqs.size() << " within 4 s.e.\n";
      EXPECT_GT(mean, -3 * se - 1e-3) << objective << " K=" << K << ": the bound exceeds the exact log-probability";
      EXPECT_LT(mean, 3 * se + 0.02) << objective << " K=" << K << ": the bound is not tight with the exact denoiser";
      // The standard error of K = 4 antithetic draws comes from 2 pairs: too rough to hold to this.
      if (K == 64)
        EXPECT_GE(within, static_cast<int64_t>(0.85 * reqs.size())) << objective << ": the reported standard error is too small";
    }
    EXPECT_LT(mean_abs_gap[64], 0.5 * mean_abs_gap[4]) << objective << ": the bound does not tighten with K";
  }
}

namespace {
// A byte-level corpus and two tiny models trained on it for a few steps (sedd and ar).
struct ScoreCliModels {
  TempDir tmp;
  std::string sedd, ar;
  ScoreCliModels() {
    std::string text;
    for (int i = 0; i < 300; ++i) text += "the quick brown fox jumps over the lazy dog; ";
    std::vector<int64_t> ids(text.begin(), text.end());
    write_shard(tmp / "a.h5", torch::tensor(ids, torch::kLong), 257, 256, "byte");
    sedd = tmp / "sedd";
    ar = tmp / "ar";
    std::string out;
    for (auto [dir, extra] : {std::pair{sedd, std::string()},
                              std::pair{ar, std::string("--diffusion.objective ar --model.time_conditioning false "
                                                        "--model.scale_by_sigma false")}}) {
      EXPECT_EQ(train_in_process(one_block().set("train.batch_size", 8).set("train.steps", 10).set("train.lr", "3e-3"),
                                 tmp / "a.h5", dir, extra),
                10);
    }
  }
};

}  // namespace

// The command line: rows in request order with the same values on 1 and 3 ranks; bad requests
// (empty continuation, malformed JSON, ids out of range, a continuation longer than the window)
// get an error row naming their line while the rest are scored, exit 2; the autoregressive
// logprob equals the network's own likelihood of the continuation, recomputed here from a forward
// pass over [end-of-text, context, continuation] in float64.
TEST(ScoreCli, SameRowsOnOneAndThreeRanksAndBadRequestsGetErrorRows) {
  ScoreCliModels t;
  std::ofstream(t.tmp / "req.jsonl")
      << "{\"id\": \"a\", \"context\": \"the quick brown\", \"continuation\": \" fox\"}\n"
      << "{\"id\": \"b\", \"context\": \"\", \"continuation\": \"the lazy dog\"}\n"
      << "{\"id\": \"c\", \"context\": \"over the\", \"continuation\": \"\"}\n"
      << "this is not json\n"
      << "{\"id\": \"e\", \"context_ids\": [116, 104], \"continuation_ids\": [101, 300]}\n"
      << "\n"
      << "{\"id\": \"g\", \"context\": \"jumps over the lazy dog; the quick brown fox jumps over\", \"continuation\": \" the\"}\n"
      << "{\"id\": \"h\", \"context_ids\": [116, 104], \"continuation_ids\": [101, 32, 113]}\n"
      << "{\"id\": \"i\", \"continuation\": \"a continuation far longer than the window of thirty-two\"}\n";
  const std::vector<std::string> ok_ids = {"a", "b", "g", "h"};
  std::string out;
  for (const auto& model : {t.sedd, t.ar}) {
    std::vector<std::vector<nlohmann::json>> runs;
    for (int np : {1, 3}) {
      const std::string file = t.tmp / fmt::format("out{}.jsonl", np);
      const int rc = run(fmt::format("{} -np {} {}/sedd-score --checkpoint {} --requests {} --out {} --device cpu "
                                     "--mc-samples 8 --batch-size 2",
                                     kMpirun, np, bin_dir(), model, t.tmp / "req.jsonl", file),
                         &out);
      EXPECT_EQ(rc, 2) << "some requests were refused: exit 2\n" << out;
      EXPECT_NE(out.find("requests/s"), std::string::npos) << out;
      EXPECT_NE(out.find("req.jsonl:4: malformed JSON"), std::string::npos) << out;
      runs.push_back(read_jsonl(file));
    }
    const auto& a = runs[0];
    ASSERT_EQ(a.size(), 8u) << "one row per non-blank line";
    const std::vector<std::string> ids = {"a", "b", "c", "", "e", "g", "h", "i"};
    for (size_t i = 0; i < a.size(); ++i) {
      const bool ok = std::find(ok_ids.begin(), ok_ids.end(), ids[i]) != ok_ids.end();
      EXPECT_EQ(a[i].contains("error"), !ok) << a[i];
      if (!ids[i].empty()) EXPECT_EQ(a[i]["id"], ids[i]) << "rows in request order";
      if (ok) {
        EXPECT_LT(a[i]["logprob"].get<double>(), 0.0) << a[i];
        EXPECT_TRUE(a[i]["is_greedy"].is_boolean()) << a[i];
        EXPECT_NEAR(a[i]["logprob"].get<double>(), runs[1][i]["logprob"].get<double>(),
                    1e-5 * std::abs(a[i]["logprob"].get<double>()))
            << "3 ranks changed request " << ids[i];
        EXPECT_EQ(a[i]["is_greedy"], runs[1][i]["is_greedy"]) << ids[i];
        EXPECT_EQ(a[i]["tokens"], runs[1][i]["tokens"]) << ids[i];
      } else {
        EXPECT_EQ(a[i], runs[1][i]);
      }
    }
    EXPECT_EQ(a[0]["tokens"], 4);
    EXPECT_EQ(a[5]["truncated_context"], 55 + 4 - 32) << a[5];
    EXPECT_NE(a[2]["error"].get<std::string>().find("req.jsonl:3: the continuation is empty"), std::string::npos) << a[2];
    EXPECT_NE(a[3]["error"].get<std::string>().find("req.jsonl:4: malformed JSON"), std::string::npos) << a[3];
    EXPECT_NE(a[4]["error"].get<std::string>().find("req.jsonl:5: \"continuation\": token id 300"), std::string::npos) << a[4];
    EXPECT_NE(a[7]["error"].get<std::string>().find("req.jsonl:9: the continuation has 55 tokens, more than the model's window of 32"),
              std::string::npos)
        << a[7];
    if (model == t.ar) {
      EXPECT_EQ(a[0]["stderr"].get<double>(), 0.0) << "exact";
      auto net = load_model_file(resolve_model_file(t.ar), true);
      net->eval();
      torch::NoGradGuard no_grad;
      auto own = [&](const std::string& c, const std::string& y) {
        std::vector<int64_t> s = {256};
        s.insert(s.end(), c.begin(), c.end());
        s.insert(s.end(), y.begin(), y.end());
        std::vector<int64_t> input(s.begin(), s.end() - 1);
        auto logits = net->forward_raw(torch::tensor(input, torch::kLong).unsqueeze(0), torch::zeros({1}));
        auto logp = torch::log_softmax(logits[0].narrow(1, 0, 257).to(torch::kDouble), 1);
        double lp = 0;
        for (size_t k = c.size(); k < input.size(); ++k) lp += logp[k][s[k + 1]].item<double>();
        return lp;
      };
      EXPECT_NEAR(a[0]["logprob"].get<double>(), own("the quick brown", " fox"), 1e-4);
      EXPECT_NEAR(a[1]["logprob"].get<double>(), own("", "the lazy dog"), 1e-4);
      EXPECT_NEAR(a[6]["logprob"].get<double>(), own("th", "e q"), 1e-4);
    } else {
      EXPECT_GT(a[0]["stderr"].get<double>(), 0.0) << "a Monte Carlo bound reports its standard error";
    }
  }
  // A missing request file is refused before any work, exit 2.
  const int rc = run(fmt::format("{} -np 1 {}/sedd-score --checkpoint {} --requests {} --out {} --device cpu", kMpirun,
                                 bin_dir(), t.ar, t.tmp / "none.jsonl", t.tmp / "x.jsonl"),
                     &out);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("none.jsonl: cannot read the request file"), std::string::npos) << out;
}
