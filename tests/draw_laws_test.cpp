// The laws of the training draws (docs/DESIGN.md, "Draw laws"), tested with the functions the
// trainer calls and the keys it uses: training times uniform on their range (Kolmogorov-Smirnov),
// the absorbing mask Bernoulli with the graph's probability and independent across positions,
// rows, micro-batches, ranks and steps (chi-square on counts and on pair co-occurrence), the
// uniform graph's replacements uniform over the other tokens (chi-square), and the data order
// visiting every window once per epoch on 1, 2 and 3 ranks. Every law is paired with a planted
// bias of the size that moves the likelihood bound by about 0.5%, which the same statistic must
// reject: a test that cannot see such a bias would not protect the bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <vector>

#include "data/shard.h"
#include "data/token_stream.h"
#include "diffusion/graph.h"
#include "diffusion/keyed_random.h"
#include "diffusion/times.h"
#include "diffusion/noise.h"
#include "objectives/mdlm.h"
#include "objectives/rows.h"
#include "objectives/sedd.h"
#include "test_util.h"

namespace sedd::draw_laws {

// Significance of every test: deterministic seeds keep the real draws at one fixed p-value, so
// the suite is not flaky; the planted biases must land below it.
constexpr double kAlpha = 1e-4;
constexpr uint64_t kSeed = 20240607;
// A stream no training draw uses, for the planted biases' own randomness.
constexpr uint64_t kPlantedPurpose = 999;

// ---------------------------------------------------------------------------------------------
// Statistics

// Regularized upper incomplete gamma Q(a, x) (Numerical Recipes 6.2: series below a + 1, Lentz's
// continued fraction above).
double upper_gamma_q(double a, double x) {
  if (x <= 0) return 1.0;
  const double log_prefix = -x + a * std::log(x) - std::lgamma(a);
  if (x < a + 1) {
    double term = 1 / a, sum = term;
    for (int n = 1; n < 100000 && std::abs(term) > std::abs(sum) * 1e-16; ++n) {
      term *= x / (a + n);
      sum += term;
    }
    return std::max(0.0, 1 - sum * std::exp(log_prefix));
  }
  const double tiny = 1e-300;
  double b = x + 1 - a, c = 1 / tiny, d = 1 / b, h = d;
  for (int i = 1; i < 100000; ++i) {
    const double an = -i * (i - a);
    b += 2;
    d = an * d + b;
    if (std::abs(d) < tiny) d = tiny;
    c = b + an / c;
    if (std::abs(c) < tiny) c = tiny;
    d = 1 / d;
    const double step = d * c;
    h *= step;
    if (std::abs(step - 1) < 1e-16) break;
  }
  return std::exp(log_prefix) * h;
}

// P(X > x) for X ~ chi-square with `dof` degrees of freedom.
double chi2_pvalue(double x, double dof) { return upper_gamma_q(dof / 2, x / 2); }

// P(K > lambda) for the Kolmogorov distribution, by whichever series converges fast.
double kolmogorov_pvalue(double lambda) {
  if (lambda < 0.04) return 1.0;
  if (lambda < 1.18) {
    const double pi2 = M_PI * M_PI;
    double cdf = 0;
    for (int k = 1; k <= 50; ++k)
      cdf += std::exp(-(2.0 * k - 1) * (2.0 * k - 1) * pi2 / (8 * lambda * lambda));
    return 1 - std::sqrt(2 * M_PI) / lambda * cdf;
  }
  double p = 0;
  for (int k = 1; k <= 100; ++k) p += (k % 2 ? 2.0 : -2.0) * std::exp(-2.0 * k * k * lambda * lambda);
  return std::clamp(p, 0.0, 1.0);
}

// One-sample Kolmogorov-Smirnov test of x against U[a, b]: the p-value of the largest gap between
// the empirical and the uniform CDF (asymptotic law with Stephens' small-sample correction).
double ks_uniform_pvalue(const torch::Tensor& x, double a, double b) {
  auto f = (std::get<0>(x.reshape({-1}).to(torch::kDouble).sort()) - a) / (b - a);
  const double n = static_cast<double>(f.numel());
  auto i = torch::arange(1, f.numel() + 1, torch::kDouble);
  const double d = std::max((i / n - f).max().item<double>(), (f - (i - 1) / n).max().item<double>());
  const double sn = std::sqrt(n);
  return kolmogorov_pvalue((sn + 0.12 + 0.11 / sn) * d);
}

// Chi-square of indicator counts m (0/1) against their own Bernoulli probabilities p, pooled into
// `bins` bins of p: per bin (sum m - sum p)^2 / sum p(1-p), exact variance of a sum of independent
// Bernoullis of unequal probabilities. One degree of freedom per non-empty bin.
double bernoulli_counts_pvalue(const torch::Tensor& m, const torch::Tensor& p, int64_t bins) {
  auto bin = (p.reshape({-1}) * static_cast<double>(bins)).floor().clamp(0, bins - 1).to(torch::kLong);
  auto zeros = torch::zeros({bins}, torch::kDouble);
  auto pf = p.reshape({-1}).to(torch::kDouble);
  auto observed = zeros.index_add(0, bin, m.reshape({-1}).to(torch::kDouble));
  auto expected = zeros.index_add(0, bin, pf);
  auto variance = zeros.index_add(0, bin, pf * (1 - pf));
  auto used = variance > 0;
  const double chi2 = ((observed - expected).pow(2) / variance).index({used}).sum().item<double>();
  return chi2_pvalue(chi2, static_cast<double>(used.sum().item<int64_t>()));
}

// Chi-square (1 dof) of the co-occurrence of indicator pairs (first[i], second[i]) with
// probabilities (pf[i], ps[i]): sum (m_f - p_f)(m_s - p_s), the co-occurrence count centred at its
// expectation under independence, over its standard deviation, squared. The products are
// uncorrelated under independence even where pairs share an element.
double cooccurrence_pvalue(const torch::Tensor& mf, const torch::Tensor& pf, const torch::Tensor& ms,
                           const torch::Tensor& ps) {
  auto a = mf.to(torch::kDouble) - pf, b = ms.to(torch::kDouble) - ps;
  const double centred = (a * b).sum().item<double>();
  const double variance = (pf * (1 - pf) * ps * (1 - ps)).sum().item<double>();
  return chi2_pvalue(centred * centred / variance, 1);
}

// ---------------------------------------------------------------------------------------------
// The trainer's keys

// How one optimizer step's global batch of `batch` rows is cut: `world` ranks of batch / world rows,
// each in micro-batches of `micro` rows (Trainer::run and Trainer::micro_batch).
struct BatchLayout {
  int64_t batch, world, micro;
  int64_t rows_per_rank() const { return batch / world; }
  // The global row indices of every micro-batch of every rank: what the trainer keys its draws by.
  std::vector<torch::Tensor> micro_batches() const {
    std::vector<torch::Tensor> out;
    for (int64_t r = 0; r < world; ++r)
      for (int64_t m = 0; m < rows_per_rank(); m += micro)
        out.push_back(torch::arange(r * rows_per_rank() + m, r * rows_per_rank() + m + micro, torch::kLong));
    return out;
  }
};

// ---------------------------------------------------------------------------------------------
// Training times: t = (1 - eps) u + eps uniform on [eps, 1] for every time sampling.

constexpr double kTimeEps = 1e-3;

// The times of `steps` optimizer steps, drawn micro-batch by micro-batch as Trainer::micro_batch
// does; `distort` is applied to u (identity for the real law).
torch::Tensor training_times(const std::string& mode, const BatchLayout& layout, int64_t steps,
                             const std::function<torch::Tensor(torch::Tensor)>& distort) {
  std::vector<torch::Tensor> t;
  for (int64_t step = 1; step <= steps; ++step)
    for (const auto& rows : layout.micro_batches())
      t.push_back(training_time(distort(time_uniforms(mode, kSeed, step, rows, layout.batch)), kTimeEps));
  return torch::cat(t);
}

void expect_times_uniform(const std::string& mode) {
  const BatchLayout layout{512, 4, 32};
  const int64_t steps = 1024;  // 524,288 times
  auto real = training_times(mode, layout, steps, [](torch::Tensor u) { return u; });
  ASSERT_EQ(real.numel(), layout.batch * steps);
  EXPECT_GE(real.min().item<double>(), kTimeEps);
  EXPECT_LT(real.max().item<double>(), 1.0);
  const double p_real = ks_uniform_pvalue(real, kTimeEps, 1.0);
  // Planted: u^1.02, a 2% tilt of the time density (largest CDF gap 0.0073).
  auto planted = training_times(mode, layout, steps, [](torch::Tensor u) { return u.pow(1.02); });
  const double p_planted = ks_uniform_pvalue(planted, kTimeEps, 1.0);
  std::printf("[draw laws] times %-10s KS n=%lld: real p=%.3g, planted u^1.02 p=%.3g\n", mode.c_str(),
              static_cast<long long>(real.numel()), p_real, p_planted);
  EXPECT_GT(p_real, kAlpha) << mode << " times are not uniform on [eps, 1]";
  EXPECT_LT(p_planted, kAlpha) << mode << ": the KS test cannot see a 2% tilt of the times";
}

TEST(DrawLaws, TrainingTimesUniformIid) { expect_times_uniform("iid"); }
TEST(DrawLaws, TrainingTimesUniformAntithetic) { expect_times_uniform("antithetic"); }
TEST(DrawLaws, TrainingTimesUniformStratified) { expect_times_uniform("stratified"); }

// ---------------------------------------------------------------------------------------------
// Absorbing graph: each position is masked with probability 1 - e^-sigma(t), independently.

// One run's masks m and their probabilities p [steps, B, L], drawn micro-batch by micro-batch with
// sedd_training_draws (what training_loss draws x_t with). `move_scale` < 1 plants a move
// chance that much too low (the same keyed stream, through Graph::corrupt).
struct MaskDraws {
  torch::Tensor mask, prob;
};

MaskDraws absorbing_masks(const BatchLayout& layout, int64_t L, int64_t steps, double move_scale) {
  const int64_t N = 50257;
  auto graph = make_graph("absorb", N);
  auto noise = make_noise(NoiseConfig{});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(kSeed);
  auto x0 = torch::randint(N, {layout.batch, L}, gen, torch::kLong);
  auto mask = torch::empty({steps, layout.batch, L}, torch::kBool);
  auto prob = torch::empty({steps, layout.batch, L}, torch::kDouble);
  for (int64_t step = 1; step <= steps; ++step) {
    for (const auto& rows : layout.micro_batches()) {
      LossDraws d{kSeed, static_cast<uint64_t>(step), rows, time_uniforms("iid", kSeed, step, rows, layout.batch)};
      auto x0_rows = x0.index_select(0, rows);
      auto draws = sedd_training_draws(*graph, *noise, x0_rows, d);
      auto p = (1 - NoiseConfig{}.eps) * draws.t;  // log-linear noise: 1 - e^-sigma(t), [mb]
      auto xt = draws.xt;
      if (move_scale != 1.0) {
        auto sigma = -torch::log1p(-move_scale * p);
        xt = graph->corrupt(x0_rows, sigma, RandomStream{kSeed, purpose::kCorrupt, static_cast<uint64_t>(step)},
                            RandomStream{kSeed, purpose::kRedraw, static_cast<uint64_t>(step)}, rows);
      }
      mask[step - 1].index_copy_(0, rows, xt == N);
      prob[step - 1].index_copy_(0, rows, p.unsqueeze(1).expand({-1, L}));
    }
  }
  return {mask, prob};
}

const BatchLayout kMaskLayout{64, 4, 4};  // 4 ranks of 16 rows, 4 micro-batches each
constexpr int64_t kMaskLen = 128, kMaskSteps = 64;  // 524,288 positions

TEST(DrawLaws, AbsorbingMaskProbability) {
  auto real = absorbing_masks(kMaskLayout, kMaskLen, kMaskSteps, 1.0);
  const double p_real = bernoulli_counts_pvalue(real.mask, real.prob, 20);
  // Planted: a move chance 2% too low.
  auto planted = absorbing_masks(kMaskLayout, kMaskLen, kMaskSteps, 0.98);
  const double p_planted = bernoulli_counts_pvalue(planted.mask, planted.prob, 20);
  std::printf("[draw laws] mask counts chi2 (20 bins of p) n=%lld: real p=%.3g, planted move chance x0.98 p=%.3g\n",
              static_cast<long long>(real.mask.numel()), p_real, p_planted);
  EXPECT_GT(p_real, kAlpha) << "the mask is not Bernoulli(1 - e^-sigma(t))";
  EXPECT_LT(p_planted, kAlpha) << "the counts test cannot see a move chance 2% too low";
}

// A kind of pair of positions whose masks must be independent: the second of each pair is the
// first shifted by `shift` along dimension `dim` of [steps, B, L], for the firsts `valid` marks.
struct PairKind {
  std::string name;
  int64_t dim, shift;
  std::function<torch::Tensor(int64_t steps, int64_t B, int64_t L)> valid;  // bool [steps, B, L]
};

std::vector<PairKind> pair_kinds(const BatchLayout& layout) {
  const int64_t mb = layout.micro, R = layout.rows_per_rank();
  auto by_row = [](std::function<bool(int64_t)> keep) {
    return [keep](int64_t S, int64_t B, int64_t L) {
      auto v = torch::zeros({S, B, L}, torch::kBool);
      for (int64_t b = 0; b < B; ++b) v.select(1, b).fill_(keep(b));
      return v;
    };
  };
  return {
      {"positions", 2, 1,
       [](int64_t S, int64_t B, int64_t L) {
         auto v = torch::ones({S, B, L}, torch::kBool);
         v.select(2, L - 1).fill_(false);
         return v;
       }},
      {"rows of a micro-batch", 1, 1, by_row([mb](int64_t b) { return b % mb != mb - 1; })},
      {"micro-batches of a rank", 1, mb, by_row([mb, R](int64_t b) { return b % R + mb < R; })},
      {"ranks", 1, R, by_row([R, layout](int64_t b) { return b + R < layout.batch; })},
      {"steps", 0, 1,
       [](int64_t S, int64_t B, int64_t L) {
         auto v = torch::ones({S, B, L}, torch::kBool);
         v.select(0, S - 1).fill_(false);
         return v;
       }},
  };
}

// The pairs (first, second) of a kind as flat [pairs] tensors of t.
std::pair<torch::Tensor, torch::Tensor> pairs_of(const torch::Tensor& t, const PairKind& kind) {
  const int64_t n = t.size(kind.dim);
  auto first = t.narrow(kind.dim, 0, n - kind.shift), second = t.narrow(kind.dim, kind.shift, n - kind.shift);
  auto valid = kind.valid(t.size(0), t.size(1), t.size(2)).narrow(kind.dim, 0, n - kind.shift);
  return {first.masked_select(valid), second.masked_select(valid)};
}

double pair_pvalue(const MaskDraws& d, const PairKind& kind) {
  auto [mf, ms] = pairs_of(d.mask, kind);
  auto [pf, ps] = pairs_of(d.prob, kind);
  return cooccurrence_pvalue(mf, pf, ms, ps);
}

// Planted dependence: the second of each pair of `kind` copies the first's mask 2% of the time.
MaskDraws with_copied_masks(const MaskDraws& d, const PairKind& kind) {
  const int64_t S = d.mask.size(0), B = d.mask.size(1), L = d.mask.size(2), n = d.mask.size(kind.dim);
  auto u = keyed_uniform(RandomStream{kSeed, kPlantedPurpose, 0}, torch::arange(S * B, torch::kLong), L,
                         torch::kDouble)
               .view({S, B, L});
  auto copy = (u < 0.02).logical_and(kind.valid(S, B, L)).narrow(kind.dim, 0, n - kind.shift);
  auto mask = d.mask.clone();
  auto second = mask.narrow(kind.dim, kind.shift, n - kind.shift);
  second.copy_(torch::where(copy, d.mask.narrow(kind.dim, 0, n - kind.shift), second));
  return {mask, d.prob};
}

TEST(DrawLaws, AbsorbingMaskIndependence) {
  auto real = absorbing_masks(kMaskLayout, kMaskLen, kMaskSteps, 1.0);
  for (const auto& kind : pair_kinds(kMaskLayout)) {
    const double p_real = pair_pvalue(real, kind);
    const double p_planted = pair_pvalue(with_copied_masks(real, kind), kind);
    std::printf("[draw laws] mask co-occurrence chi2 across %-24s pairs=%lld: real p=%.3g, planted 2%% copies p=%.3g\n",
                kind.name.c_str(), static_cast<long long>(pairs_of(real.prob, kind).first.numel()), p_real,
                p_planted);
    EXPECT_GT(p_real, kAlpha) << "masks are dependent across " << kind.name;
    EXPECT_LT(p_planted, kAlpha) << "the co-occurrence test cannot see 2% copied masks across " << kind.name;
  }
}

// ---------------------------------------------------------------------------------------------
// Uniform graph: a position that changes takes each of the other N - 1 tokens alike.

constexpr int64_t kUniformTokens = 8;

// Chi-square (N - 1 dof) of the replacement tokens of the positions that changed against their
// expected counts: a changed position whose clean token is c puts 1 / (N - 1) on every k != c.
double replacement_pvalue(const torch::Tensor& x0, const torch::Tensor& xt) {
  const int64_t N = kUniformTokens;
  auto changed = xt != x0;
  auto observed = torch::bincount(xt.masked_select(changed), {}, N).to(torch::kDouble);
  auto clean = torch::bincount(x0.masked_select(changed), {}, N).to(torch::kDouble);
  auto expected = (changed.sum().item<double>() - clean) / static_cast<double>(N - 1);
  return chi2_pvalue(((observed - expected).pow(2) / expected).sum().item<double>(), N - 1);
}

TEST(DrawLaws, UniformGraphReplacements) {
  const int64_t N = kUniformTokens, L = 256, steps = 72;  // 4.7M positions, about 2M replaced
  const BatchLayout layout{256, 2, 64};
  auto graph = make_graph("uniform", N);
  auto noise = make_noise(NoiseConfig{});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(kSeed);
  auto x0 = torch::randint(N, {layout.batch, L}, gen, torch::kLong);
  std::vector<torch::Tensor> clean, real, planted;
  const int64_t favoured = 3;
  // Planted: token 3 2% more likely than 1 / (N - 1) among the replacements of other tokens.
  const double q = 1.0 / static_cast<double>(N - 1), switch_chance = 0.02 * q / (1 - q);
  for (int64_t step = 1; step <= steps; ++step) {
    for (const auto& rows : layout.micro_batches()) {
      LossDraws d{kSeed, static_cast<uint64_t>(step), rows, time_uniforms("iid", kSeed, step, rows, layout.batch)};
      auto x0_rows = x0.index_select(0, rows);
      auto xt = sedd_training_draws(*graph, *noise, x0_rows, d).xt;
      auto v = keyed_uniform(RandomStream{kSeed, kPlantedPurpose, static_cast<uint64_t>(step)}, rows, L, torch::kDouble);
      auto favour = (xt != x0_rows).logical_and(x0_rows != favoured).logical_and(v < switch_chance);
      clean.push_back(x0_rows);
      real.push_back(xt);
      planted.push_back(torch::where(favour, torch::full_like(xt, favoured), xt));
    }
  }
  auto x0_all = torch::cat(clean);
  auto real_all = torch::cat(real);
  const double p_real = replacement_pvalue(x0_all, real_all);
  const double p_planted = replacement_pvalue(x0_all, torch::cat(planted));
  std::printf("[draw laws] uniform-graph replacements chi2 (N=%lld) replaced=%lld: real p=%.3g, planted +2%% p=%.3g\n",
              static_cast<long long>(N), static_cast<long long>((real_all != x0_all).sum().item<int64_t>()), p_real,
              p_planted);
  EXPECT_GT(p_real, kAlpha) << "replacements are not uniform over the other tokens";
  EXPECT_LT(p_planted, kAlpha) << "the chi-square cannot see one token 2% more likely";
}

// ---------------------------------------------------------------------------------------------
// Data order: every window once per epoch, whatever the number of ranks.

constexpr int64_t kWindowLen = 16;
const int64_t kOrderShardTokens[] = {4000, 2900, 5300};  // tails of 0, 4 and 4 tokens are dropped

// Shards whose token at global offset g is g: a window is named by its first token.
std::string write_counting_shards(const test::TempDir& tmp) {
  int64_t base = 0;
  for (size_t i = 0; i < std::size(kOrderShardTokens); ++i) {
    write_shard(tmp / fmt::format("order-{}.h5", i), torch::arange(base, base + kOrderShardTokens[i]), 1 << 16, 0,
                "byte");
    base += kOrderShardTokens[i];
  }
  return tmp / "order-*.h5";
}

// Every window's first token.
std::vector<int64_t> all_windows() {
  std::vector<int64_t> out;
  int64_t base = 0;
  for (int64_t tokens : kOrderShardTokens) {
    for (int64_t w = 0; w < tokens / kWindowLen; ++w) out.push_back(base + w * kWindowLen);
    base += tokens;
  }
  return out;
}

// The windows (first tokens) of global sequences 0, 1, ... as `world` ranks read them, batch by
// batch and rank by rank, for `batches` global batches; each row is checked to be a whole window.
std::vector<int64_t> read_order(const std::string& data, int world, int64_t global_batch, int64_t batches) {
  std::vector<std::unique_ptr<TokenStream>> ranks;
  for (int r = 0; r < world; ++r) {
    TokenStreamConfig c;
    c.data = data;
    c.seq_len = kWindowLen;
    c.global_batch = global_batch;
    c.rank = r;
    c.world = world;
    c.seed = kSeed;
    ranks.push_back(std::make_unique<TokenStream>(c));
  }
  std::vector<int64_t> order;
  for (int64_t b = 0; b < batches; ++b)
    for (auto& rank : ranks) {
      auto rows = rank->next();
      for (int64_t i = 0; i < rows.size(0); ++i) {
        const int64_t first = rows[i][0].item<int64_t>();
        EXPECT_TRUE(torch::equal(rows[i], torch::arange(first, first + kWindowLen))) << "a row is not one window";
        order.push_back(first);
      }
    }
  return order;
}

// The windows that epoch `epoch` of `order` does not visit exactly once (unknown ones included).
int64_t windows_not_visited_once(const std::vector<int64_t>& order, int64_t epoch) {
  const auto windows = all_windows();
  const int64_t M = static_cast<int64_t>(windows.size());
  std::map<int64_t, int64_t> visits;
  for (int64_t w : windows) visits[w] = 0;
  for (int64_t k = epoch * M; k < (epoch + 1) * M; ++k) ++visits[order.at(k)];
  return std::count_if(visits.begin(), visits.end(), [](const auto& v) { return v.second != 1; });
}

TEST(DrawLaws, DataOrderVisitsEveryWindowOncePerEpoch) {
  test::TempDir tmp;
  const std::string data = write_counting_shards(tmp);
  const int64_t M = static_cast<int64_t>(all_windows().size()), global_batch = 12, epochs = 3;
  ASSERT_NE(M % global_batch, 0) << "epochs should end inside a global batch";
  const int64_t batches = (epochs * M + global_batch - 1) / global_batch;
  std::vector<int64_t> single;
  for (int world : {1, 2, 3}) {
    auto order = read_order(data, world, global_batch, batches);
    for (int64_t e = 0; e < epochs; ++e)
      EXPECT_EQ(windows_not_visited_once(order, e), 0) << world << " ranks, epoch " << e;
    if (world == 1) single = order;
    else EXPECT_EQ(order, single) << world << " ranks read another order than one rank";
  }
  EXPECT_NE(std::vector<int64_t>(single.begin(), single.begin() + M),
            std::vector<int64_t>(single.begin() + M, single.begin() + 2 * M))
      << "two epochs in the same order";
  // Planted: epoch 1 repeats one window in place of another.
  auto planted = single;
  planted[M + 10] = planted[M + 200];
  const int64_t planted_bad = windows_not_visited_once(planted, 1);
  std::printf("[draw laws] data order: %lld windows x %lld epochs on 1, 2, 3 ranks; planted repeat: %lld windows "
              "not visited once\n",
              static_cast<long long>(M), static_cast<long long>(epochs), static_cast<long long>(planted_bad));
  EXPECT_EQ(planted_bad, 2) << "a repeated window and a skipped one must both be seen";
}

}  // namespace sedd::draw_laws
