// Samplers and the likelihood bound against distributions whose truth is known exactly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "diffusion/categorical.h"
#include "objectives/sampling.h"
#include "eval/elbo.h"
#include "io/fs.h"
#include "objectives/score.h"
#include "model/weights.h"
#include "train/checkpoint.h"
#include "io/error.h"
#include "recipes.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// The exact score of a distribution with independent positions, position l having marginal
// p[l] (a [L, N] table): the concrete score ratio p_sigma(x with x_l = y) / p_sigma(x).
class IndependentOracle final : public ScoreModel {
 public:
  IndependentOracle(const Graph& g, torch::Tensor p) : g_(g), p_(std::move(p)) {}
  void evaluate(const torch::Tensor& x, const torch::Tensor& sigma) override { last_ = full(x, sigma); }
  torch::Tensor rows(const torch::Tensor& rows) override {
    return last_.view({-1, last_.size(-1)}).index_select(0, rows);
  }
  torch::Tensor full(const torch::Tensor& x, const torch::Tensor& sigma_f) {
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
  torch::Tensor p_, last_;
};



torch::Tensor sample_ids(int64_t n) { return torch::arange(n, torch::kLong); }

torch::Generator generator(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

}  // namespace

TEST(Sampler, MarginalsConvergeToTheTruth) {
  const int64_t L = 4, N = 5, n = 4000;
  auto p = position_marginals(L, N);
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
        sc.seed = 42;
        auto x = sample(*g, *noise, oracle, L, sc, Constraint{}, sample_ids(n), torch::kCPU);
        ASSERT_TRUE((x >= 0).all().item<bool>() && (x < N).all().item<bool>()) << "a mask or bad id survived";
        chi[steps] = chi_square(x, p);
      }
      std::cout << kind << "/" << pred << ": chi2 at 2, 16, 256 steps = " << chi[2] << ", " << chi[16] << ", "
                << chi[256] << " (critical " << crit << ")\n";
      EXPECT_LT(chi[256], crit) << kind << " " << pred;
      // The draws are keyed (seed 42), so these values are fixed. With an exact denoiser the
      // absorbing samplers and the uniform analytic one are exact at any step count; the uniform
      // Euler step is biased at 2 steps, and the statistic must see it (the test has power).
      if (std::string(kind) == "uniform" && std::string(pred) == "euler") {
        EXPECT_GT(chi[2], 3 * crit) << "a 2-step Euler sampler on the uniform graph should be visibly biased";
      } else {
        EXPECT_LT(chi[2], crit) << kind << " " << pred;
        EXPECT_LT(chi[16], crit) << kind << " " << pred;
      }
    }
  }
}

TEST(Sampler, PrefixSuffixAndInfillAreAlwaysHonoured) {
  const int64_t L = 12, N = 5;
  auto p = position_marginals(L, N);
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
      sc.seed = 3;
      auto x = sample(*g, *noise, oracle, L, sc, c, sample_ids(200), torch::kCPU);
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

namespace {
DDiT random_sampler_model(bool time_conditioning) {
  ModelConfig cfg;
  cfg.tokens = 20;
  cfg.hidden_size = 32;
  cfg.n_heads = 2;
  cfg.n_blocks = 2;
  cfg.cond_dim = 16;
  cfg.length = 24;
  cfg.time_conditioning = time_conditioning;
  torch::manual_seed(1);
  DDiT m(cfg);
  torch::NoGradGuard ng;
  for (auto& t : m->parameters()) t.normal_(0, 0.2);
  m->eval();
  return m;
}
}  // namespace

TEST(Sampler, ExactCacheGivesIdenticalSamplesWithFewerEvaluations) {
  DDiT m = random_sampler_model(false);
  ModelConfig cfg = m->cfg;
  auto g = make_graph("absorb", cfg.tokens);
  auto noise = make_noise(cfg.noise);
  for (int64_t steps : {16, 128}) {
    SamplerConfig sc;
    sc.steps = steps;
    DDiTScore cached(m, true), plain(m, false);
    ASSERT_TRUE(cached.caching());
    sc.seed = 9;
    auto a = sample(*g, *noise, cached, cfg.length, sc, Constraint{}, sample_ids(6), torch::kCPU);
    auto b = sample(*g, *noise, plain, cfg.length, sc, Constraint{}, sample_ids(6), torch::kCPU);
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
  auto p = position_marginals(L, N);
  double entropy = -(p * p.log()).sum().item<double>();  // nats per sequence
  for (const char* kind : {"absorb", "uniform"}) {
    auto g = make_graph(kind, N);
    NoiseConfig nc{"loglinear"};
    if (std::string(kind) == "uniform") nc = NoiseConfig{"geometric", 1e-3, 1e-4, 20.0};
    auto noise = make_noise(nc);
    IndependentOracle oracle(*g, p);
    // Sequences drawn from the truth.
    auto gen = generator(5);
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
  auto p = position_marginals(L, N);
  auto g = make_graph("absorb", N);
  auto noise = make_noise(NoiseConfig{"loglinear"});
  IndependentOracle oracle(*g, p);
  auto gen = generator(6);
  auto x0 = sample_categorical(p.unsqueeze(0).expand({40, L, N}).contiguous(), gen);
  // The real Monte Carlo error: the spread of the estimate over independent seeds.
  auto spread_at = [&](int64_t K, const char* mode, double* reported) {
    std::vector<double> means;
    double reported_sum = 0;
    for (uint64_t seed = 0; seed < 160; ++seed) {
      auto r = elbo_batch(*g, *noise, oracle, x0, 0, ElboConfig{K, mode, seed}, torch::kCPU);
      means.push_back(r.bound.sum().item<double>());
      reported_sum += std::sqrt(r.mc_variance.sum().item<double>());
    }
    *reported = reported_sum / 160;
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
  auto gen = generator(11);
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
  std::string eval = fmt::format("{} -np 2 {}/sedd-eval --checkpoint {} --device cpu --data {} --mc-samples 32 --max-sequences 128 "
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


// Sample i depends on (seed, i) only: not on the batch it runs in, its place there or the other rows.
TEST(Sampler, DrawsDependOnlyOnTheSeedAndTheSampleIndex) {
  for (bool tc : {false, true}) {
    auto m = random_sampler_model(tc);
    auto g = make_graph("absorb", m->cfg.tokens);
    auto noise = make_noise(m->cfg.noise);
    for (const char* pred : {"analytic", "euler"}) {
      SamplerConfig sc;
      sc.steps = 24;
      sc.seed = 77;
      sc.predictor = pred;
      auto run = [&](std::vector<int64_t> ids) {
        DDiTScore score(m, true);
        return sample(*g, *noise, score, m->cfg.length, sc, Constraint{}, torch::tensor(ids, torch::kLong), torch::kCPU);
      };
      auto all = run({0, 1, 2, 3, 4, 5});
      auto tail = run({5, 4, 3}), head = run({2, 1, 0, 9});
      for (int64_t i = 0; i < 3; ++i) {
        EXPECT_TRUE(torch::equal(all[5 - i], tail[i])) << pred << " sample " << 5 - i;
        EXPECT_TRUE(torch::equal(all[2 - i], head[i])) << pred << " sample " << 2 - i;
      }
      EXPECT_FALSE(torch::equal(all[0], all[1])) << "different indices drew the same sample";
      sc.seed = 78;
      EXPECT_FALSE(torch::equal(run({0, 1, 2, 3, 4, 5}), all)) << "the seed changed nothing";
      EXPECT_TRUE((all >= 0).all().item<bool>() && (all < m->cfg.tokens).all().item<bool>()) << "a mask survived";
    }
  }
}

// The command line end to end: conditioning, JSONL rows with their index, and the same samples for
// any batch size and any number of ranks.
TEST(SamplerCli, SamplesAreTheSameForAnyBatchSizeAndRankCount) {
  TempDir tmp;
  // A byte-level model trained for a few steps: enough to exercise the whole path.
  std::string text;
  for (int i = 0; i < 300; ++i) text += "The quick brown fox jumps over the lazy dog. ";
  std::vector<int64_t> ids(text.begin(), text.end());
  write_shard(tmp / "d.h5", torch::tensor(ids, torch::kLong), 257, 256, "byte");
  std::string out;
  ASSERT_EQ(train_in_process(one_block().set("train.steps", 3).set("train.log_every", 1), tmp / "d.h5", tmp / "run"), 3);
  auto sample_cmd = [&](int np, int batch, const std::string& file) {
    return fmt::format("{} -np {} {}/sedd-sample --checkpoint {} --device cpu --num-samples 7 --steps 16 --batch-size {} "
                       "--prefix 'The ' --suffix 'dog.' --fix 10=120 --seed 5 --out {}",
                       kMpirun, np, bin_dir(), tmp / "run", batch, file);
  };
  ASSERT_EQ(run(sample_cmd(1, 7, tmp / "a.jsonl"), &out), 0) << out;
  EXPECT_NE(out.find("samples/s"), std::string::npos) << out;
  ASSERT_EQ(run(sample_cmd(1, 2, tmp / "b.jsonl"), &out), 0) << out;
  ASSERT_EQ(run(sample_cmd(3, 3, tmp / "c.jsonl"), &out), 0) << out;
  auto a = read_jsonl(tmp / "a.jsonl"), b = read_jsonl(tmp / "b.jsonl"), c = read_jsonl(tmp / "c.jsonl");
  ASSERT_EQ(a.size(), 7u);
  ASSERT_EQ(b.size(), 7u);
  ASSERT_EQ(c.size(), 7u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i]["index"].get<int64_t>(), static_cast<int64_t>(i));
    EXPECT_EQ(a[i]["ids"], b[i]["ids"]) << "batch size changed sample " << i;
    EXPECT_EQ(a[i]["ids"], c[i]["ids"]) << "3 ranks changed sample " << i;
    auto ids_i = a[i]["ids"].get<std::vector<int64_t>>();
    ASSERT_EQ(ids_i.size(), 32u);
    std::string s = a[i]["text"].get<std::string>();
    EXPECT_EQ(s.substr(0, 4), "The ") << s;
    EXPECT_EQ(s.substr(s.size() - 4), "dog.") << s;
    EXPECT_EQ(ids_i[10], 120);
  }
  EXPECT_NE(a[0]["ids"], a[1]["ids"]);
  // Bad requests fail with one clear message.
  EXPECT_NE(run(fmt::format("{} -np 1 {}/sedd-sample --checkpoint {} --device cpu --fix 40=1", kMpirun, bin_dir(), tmp / "run"), &out), 0);
  EXPECT_NE(out.find("outside the sequence"), std::string::npos) << out;
  EXPECT_NE(run(fmt::format("{} -np 1 {}/sedd-sample --checkpoint {} --device cpu --precision bf16", kMpirun, bin_dir(),
                            tmp / "run"),
                &out),
            0);
  EXPECT_NE(out.find("bf16 needs a GPU"), std::string::npos) << out;
}

// On a GPU: the sampler's draws equal the CPU's (same keyed uniforms), and the bf16 bound is within
// 0.5% of the fp32 one.
TEST(SamplerGpu, GpuSamplesMatchCpuAndBf16BoundTracksFp32) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto m = random_sampler_model(false);
  auto g = make_graph("absorb", m->cfg.tokens);
  auto noise = make_noise(m->cfg.noise);
  SamplerConfig sc;
  sc.steps = 32;
  sc.float64 = true;
  auto ids = torch::arange(16, torch::kLong);
  DDiTScore cpu_score(m, true);
  auto on_cpu = sample(*g, *noise, cpu_score, m->cfg.length, sc, Constraint{}, ids, torch::kCPU);
  auto mg = random_sampler_model(false);
  mg->to(torch::kCUDA);
  DDiTScore gpu_score(mg, true);
  auto on_gpu = sample(*g, *noise, gpu_score, m->cfg.length, sc, Constraint{}, ids, torch::kCUDA).cpu();
  double agree = (on_cpu == on_gpu).to(torch::kDouble).mean().item<double>();
  std::cout << "GPU and CPU samples agree on " << 100 * agree << "% of tokens\n";
  EXPECT_GE(agree, 0.99);
  auto x0 = torch::randint(m->cfg.tokens, {32, m->cfg.length}, torch::kLong);
  ElboConfig ec{16, "antithetic", 0};
  DDiTScore fp32(mg, false);
  auto a = elbo_batch(*g, *noise, fp32, x0, 0, ec, torch::kCUDA).bound.mean().item<double>();
  mg->bf16 = true;
  DDiTScore bf16(mg, false);
  auto b = elbo_batch(*g, *noise, bf16, x0, 0, ec, torch::kCUDA).bound.mean().item<double>();
  std::cout << "bound fp32 " << a << ", bf16 " << b << " nats/sequence\n";
  EXPECT_LT(std::abs(a - b), 0.005 * std::abs(a));
}

namespace {
// A small byte-level corpus and two models trained on it for a few steps: a score-entropy model and
// an autoregressive one (the scorer of generative perplexity).
struct TwoModels {
  TempDir tmp;
  std::string data, sedd, ar;
  TwoModels() {
    std::string text;
    for (int i = 0; i < 400; ++i) text += "the quick brown fox jumps over the lazy dog; ";
    std::vector<int64_t> ids(text.begin(), text.end());
    write_shard(tmp / "a.h5", torch::tensor(ids, torch::kLong), 257, 256, "byte");
    std::reverse(ids.begin(), ids.end());
    write_shard(tmp / "b.h5", torch::tensor(ids, torch::kLong), 257, 256, "byte");
    data = tmp / "a.h5";
    sedd = tmp / "sedd";
    ar = tmp / "ar";
    std::string out;
    for (auto [dir, extra] : {std::pair{sedd, std::string()},
                              std::pair{ar, std::string("--diffusion.objective ar --model.time_conditioning false "
                                                        "--model.scale_by_sigma false")}}) {
      int rc = run(fmt::format("{} -np 2 {}/sedd-train --data.train {} --run.dir {} --run.device cpu --data.seq_len 32 "
                               "--model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 --model.cond_dim 16 "
                               "--train.batch_size 8 --train.steps 20 --train.lr 3e-3 {}",
                               kMpirun, bin_dir(), data, dir, extra),
                   &out);
      EXPECT_EQ(rc, 0) << out;
    }
  }
};

}  // namespace

// Past the training length: block by block, the prefix kept, the same samples for any batching and
// rank count, and the unigram entropy is that of each sample's token counts; generative perplexity
// under an autoregressive scorer equals its exact likelihood of the samples, recomputed here.
TEST(SamplerCli, BlocksPastTheWindowAndGenerativePerplexity) {
  TwoModels t;
  std::string out;
  auto cmd = [&](int np, int batch, const std::string& file, const std::string& extra) {
    return fmt::format("{} -np {} {}/sedd-sample --checkpoint {} --device cpu --num-samples 5 --steps 12 --length 100 "
                       "--block-size 20 "
                       "--batch-size {} --prefix 'the ' --seed 3 --out {} {}",
                       kMpirun, np, bin_dir(), t.sedd, batch, file, extra);
  };
  ASSERT_EQ(run(cmd(1, 5, t.tmp / "a.jsonl", ""), &out), 0) << out;
  ASSERT_EQ(run(cmd(2, 2, t.tmp / "b.jsonl", ""), &out), 0) << out;
  auto a = read_jsonl(t.tmp / "a.jsonl"), b = read_jsonl(t.tmp / "b.jsonl");
  ASSERT_EQ(a.size(), 5u);
  for (size_t i = 0; i < a.size(); ++i) {
    auto ids = a[i]["ids"].get<std::vector<int64_t>>();
    ASSERT_EQ(ids.size(), 100u);
    EXPECT_EQ(a[i]["text"].get<std::string>().substr(0, 4), "the ");
    EXPECT_EQ(a[i]["ids"], b[i]["ids"]) << "batching or ranks changed block-generated sample " << i;
    auto f = torch::bincount(torch::tensor(ids, torch::kLong)).to(torch::kDouble) / 100.0;
    double h = -(f * torch::where(f > 0, f.log(), torch::zeros_like(f))).sum().item<double>();
    EXPECT_NEAR(a[i]["unigram_entropy"].get<double>(), h, 1e-9) << i;
  }
  // Generative perplexity under the autoregressive scorer (its window is 32: samples of that
  // length, on 2 ranks), against the scorer's likelihood computed here from its network alone, not
  // through the bound code sedd-sample calls: -log p(x_l | x_<l) from a forward pass over the prefix
  // [eot, x_0 .. x_{l-1}] only (nothing later can leak in), log-softmax over the vocabulary in
  // float64. Tolerance 1e-5: float32 logits of passes of other lengths.
  ASSERT_EQ(run(fmt::format("{} -np 2 {}/sedd-sample --checkpoint {} --device cpu --num-samples 5 --steps 12 "
                            "--batch-size 2 --prefix 'the ' --seed 3 --score-with {} --stats {} --out {}",
                            kMpirun, bin_dir(), t.sedd, t.ar, t.tmp / "st.json", t.tmp / "s.jsonl"),
                &out),
            0)
      << out;
  auto scored = read_jsonl(t.tmp / "s.jsonl");
  ASSERT_EQ(scored.size(), 5u);
  auto scorer = load_model_file(resolve_model_file(t.ar), true);
  scorer->eval();
  ASSERT_EQ(scorer->cfg.objective, "ar");
  ASSERT_EQ(scorer->cfg.bos, 256) << "the AR input starts with the data's end-of-text id";
  const int64_t N = scorer->cfg.tokens;
  torch::NoGradGuard no_grad;
  double nll_sum = 0;
  for (size_t i = 0; i < scored.size(); ++i) {
    auto ids = scored[i]["ids"].get<std::vector<int64_t>>();
    ASSERT_EQ(ids.size(), 32u);
    double nll = 0;
    for (size_t l = 0; l < ids.size(); ++l) {
      std::vector<int64_t> prefix = {256};
      prefix.insert(prefix.end(), ids.begin(), ids.begin() + l);
      auto logits = scorer->forward_raw(torch::tensor(prefix, torch::kLong).unsqueeze(0), torch::zeros({1}));
      auto logp = torch::log_softmax(logits[0][l].narrow(0, 0, N).to(torch::kDouble), 0);
      nll -= logp[ids[l]].item<double>();
    }
    nll /= static_cast<double>(ids.size());
    nll_sum += nll;
    EXPECT_NEAR(scored[i]["gen_perplexity"].get<double>(), std::exp(nll), 1e-5 * std::exp(nll)) << i;
  }
  auto st = nlohmann::json::parse(fs::read_text(t.tmp / "st.json"));
  std::cout << "generative perplexity under the AR model: " << st["gen_perplexity"] << ", recomputed "
            << std::exp(nll_sum / 5) << "\n";
  EXPECT_NEAR(st["gen_perplexity"].get<double>(), std::exp(nll_sum / 5), 1e-5 * std::exp(nll_sum / 5));
  EXPECT_EQ(st["scorer_objective"], "ar");
  EXPECT_GT(st["unigram_entropy_sd"].get<double>(), 0.0);
  // An autoregressive scorer reads samples up to its window only.
  EXPECT_NE(run(cmd(1, 5, t.tmp / "c.jsonl", "--score-with " + t.ar), &out), 0);
  EXPECT_NE(out.find("window"), std::string::npos) << out;
  // A suffix cannot condition block generation; a block as long as the window is refused.
  EXPECT_NE(run(cmd(1, 5, t.tmp / "c.jsonl", "--suffix dog"), &out), 0);
  EXPECT_NE(out.find("block generation conditions the first block only"), std::string::npos) << out;
  EXPECT_NE(run(fmt::format("{} -np 1 {}/sedd-sample --checkpoint {} --device cpu --length 100 --block-size 32", kMpirun, bin_dir(),
                            t.sedd),
                &out),
            0);
  EXPECT_NE(out.find("--block-size must be in [1, 32)"), std::string::npos) << out;
}

// Several datasets in one run (--data NAME=GLOB repeated and a --suite file): one table, JSON rows
// equal to evaluating each dataset alone; another tokenizer's data is refused.
TEST(ElboCli, SeveralDatasetsInOneTableAndJson) {
  TwoModels t;
  std::string out;
  std::ofstream(t.tmp / "suite.txt") << "# held-out sets\nforward " << (t.tmp / "a.h5") << "\nbackward=" << (t.tmp / "b.h5")
                                     << "\n";
  auto eval = [&](const std::string& args, const std::string& json) {
    return run(fmt::format("{} -np 2 {}/sedd-eval --checkpoint {} --device cpu --mc-samples 4 --max-sequences 12 {} --json {}",
                           kMpirun, bin_dir(), t.sedd, args, json),
               &out);
  };
  ASSERT_EQ(eval("--suite " + (t.tmp / "suite.txt"), t.tmp / "both.json"), 0) << out;
  EXPECT_NE(out.find("forward"), std::string::npos) << out;
  EXPECT_NE(out.find("backward"), std::string::npos) << out;
  EXPECT_NE(out.find("packing: documents concatenated"), std::string::npos) << out;
  ASSERT_EQ(eval("--data back=" + (t.tmp / "b.h5"), t.tmp / "one.json"), 0) << out;
  auto both = nlohmann::json::parse(fs::read_text(t.tmp / "both.json"));
  auto one = nlohmann::json::parse(fs::read_text(t.tmp / "one.json"));
  ASSERT_EQ(both["datasets"].size(), 2u);
  EXPECT_EQ(both["datasets"][1]["dataset"], "backward");
  EXPECT_DOUBLE_EQ(both["datasets"][1]["nats_per_token"].get<double>(), one["nats_per_token"].get<double>());
  EXPECT_NE(both["datasets"][0]["nats_per_token"], both["datasets"][1]["nats_per_token"]);
  EXPECT_EQ(one["tokens"].get<int64_t>(), 12 * 32);
  EXPECT_GT(one["stderr_data_nats_per_token"].get<double>(), 0.0);
  // Data tokenized with another tokenizer (same vocabulary size) is refused by name.
  write_shard(t.tmp / "other.h5", torch::randint(256, {4000}), 257, 256, "{\"model\": {\"type\": \"BPE\"}}");
  EXPECT_NE(eval("--data " + (t.tmp / "other.h5"), t.tmp / "x.json"), 0);
  EXPECT_NE(out.find("another tokenizer than the model"), std::string::npos) << out;
  // sedd-compare puts both models on the same data in one table.
  ASSERT_EQ(run(fmt::format("{} -np 2 {}/sedd-compare --checkpoint {} --checkpoint {} --device cpu --data {} --mc-samples 4 "
                            "--max-sequences 12 --json {}",
                            kMpirun, bin_dir(), t.sedd, t.ar, t.data, t.tmp / "cmp.json"),
                &out),
            0)
      << out;
  auto cmp = nlohmann::json::parse(fs::read_text(t.tmp / "cmp.json"));
  ASSERT_EQ(cmp.size(), 2u);
  EXPECT_EQ(cmp[0]["objective"], "sedd-absorb");
  EXPECT_EQ(cmp[1]["objective"], "ar");
  EXPECT_EQ(cmp[0]["model"].get<std::string>(), fmt::format("{}", t.sedd)) << "rows are named as given";
  EXPECT_TRUE(cmp[1]["exact"].get<bool>());
  EXPECT_EQ(cmp[1]["stderr_nats_per_token"].get<double>(), 0.0) << "an exact likelihood has no Monte Carlo error";
  EXPECT_GT(cmp[1]["stderr_data_nats_per_token"].get<double>(), 0.0) << "rows carry sedd-eval's fields";
  EXPECT_GT(cmp[0]["parameters"].get<int64_t>(), 0);
}

// The command-line tools on a GPU against their CPU runs (the CPU tests above pin --device cpu).
// Tolerances: fp32 on the GPU draws the same keyed numbers and differs only in summation order:
// bounds and generative perplexity within 1e-4 (relative). bf16 (the GPU default: bf16 network,
// fp32 loss math): bounds within 1%, generative perplexity under the bf16 scorer within 5% (the
// exponential of a mean log-likelihood off by up to ~0.05 nats/token).
// Samples of one GPU run for two batch sizes agree on at least 95% of their tokens (another batch
// shape may sum in another order and move a draw across a boundary of its distribution).
TEST(SamplerCliGpu, ToolsOnTheGpuTrackTheirCpuRuns) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (auto why = gpu_children_unavailable(); !why.empty()) GTEST_SKIP() << why;
  TwoModels t;
  std::string out;
  auto eval = [&](const std::string& device, const std::string& json) {
    EXPECT_EQ(run(fmt::format("{} -np 1 {}/sedd-eval --checkpoint {} {} --data {} --mc-samples 4 --max-sequences 12 "
                              "--json {}",
                              kMpirun, bin_dir(), t.sedd, device, t.data, json),
                  &out),
              0)
        << out;
    return nlohmann::json::parse(fs::read_text(json))["nats_per_token"].get<double>();
  };
  const double cpu = eval("--device cpu", t.tmp / "cpu.json");
  const double fp32 = eval("--device cuda --precision fp32", t.tmp / "fp32.json");
  const double bf16 = eval("--device cuda", t.tmp / "bf16.json");
  std::cout << "sedd-eval nats/token: cpu " << cpu << ", cuda fp32 " << fp32 << ", cuda bf16 " << bf16 << "\n";
  EXPECT_NEAR(fp32, cpu, 1e-4 * cpu);
  EXPECT_NEAR(bf16, cpu, 1e-2 * cpu);

  // Generative perplexity: the GPU's score of each sample against the AR model's exact likelihood
  // of that sample on the CPU.
  auto scorer = load_model_file(resolve_model_file(t.ar), true);
  scorer->eval();
  DDiTScore score(scorer, false);
  auto g = make_graph(scorer->cfg.graph, scorer->cfg.tokens);
  auto noise = make_noise(scorer->cfg.noise);
  ElboConfig ec{2, "antithetic", 0};
  ec.model = test::objective_config("ar", 0, scorer->cfg.bos);
  auto sample = [&](const std::string& device, int batch, const std::string& file) {
    EXPECT_EQ(run(fmt::format("{} -np 1 {}/sedd-sample --checkpoint {} {} --num-samples 5 --steps 12 --batch-size {} "
                              "--prefix 'the ' --seed 3 --score-with {} --out {}",
                              kMpirun, bin_dir(), t.sedd, device, batch, t.ar, file),
                  &out),
              0)
        << out;
    return read_jsonl(file);
  };
  for (auto [device, tol] : {std::pair<std::string, double>{"--device cuda --precision fp32", 1e-4},
                             std::pair<std::string, double>{"--device cuda", 5e-2}}) {
    auto rows = sample(device, 5, t.tmp / "s.jsonl");
    ASSERT_EQ(rows.size(), 5u) << device;
    for (const auto& row : rows) {
      auto x = torch::tensor(row["ids"].get<std::vector<int64_t>>(), torch::kLong).unsqueeze(0);
      const double nll = elbo_batch(*g, *noise, score, x, 0, ec, torch::kCPU).bound[0].item<double>() / x.size(1);
      EXPECT_NEAR(row["gen_perplexity"].get<double>(), std::exp(nll), tol * std::exp(nll)) << device;
    }
  }
  auto a = sample("--device cuda --precision fp32", 5, t.tmp / "a.jsonl");
  auto b = sample("--device cuda --precision fp32", 2, t.tmp / "b.jsonl");
  int64_t same = 0, total = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    auto ia = a[i]["ids"].get<std::vector<int64_t>>(), ib = b[i]["ids"].get<std::vector<int64_t>>();
    for (size_t k = 0; k < std::min(ia.size(), ib.size()); ++k) same += ia[k] == ib[k], ++total;
  }
  std::cout << "GPU samples for batch sizes 5 and 2 agree on " << same << " of " << total << " tokens\n";
  EXPECT_GE(same, 0.95 * 5 * 32);
}
