// Keyed randomness: the Philox generator, keyed uniforms and categorical draws.
#include <gtest/gtest.h>

#include <ATen/core/PhiloxRNGEngine.h>
#include <cmath>
#include <limits>

#include "diffusion/keyed_random.h"
#include "diffusion/philox.h"
#include "test_util.h"

using namespace sedd;

TEST(RandomPhilox, KnownAnswerAndPyTorchsEngine) {
  // Random123's known-answer vector for philox4x32-10 with zero counter and key.
  auto w = philox::philox4x32_10(0, 0, 0, 0, 0, 0);
  EXPECT_EQ(w.w[0], 0x6627e8d5u);
  EXPECT_EQ(w.w[1], 0xe169c58du);
  EXPECT_EQ(w.w[2], 0xbc57ac4cu);
  EXPECT_EQ(w.w[3], 0x9b00dbd8u);
  // PyTorch's engine: key = seed, counter = (offset, subsequence).
  for (uint64_t seed : {0ull, 42ull, 0xDEADBEEFCAFEull})
    for (uint64_t sub : {0ull, 7ull, 1ull << 40})
      for (uint64_t offset : {0ull, 3ull, (1ull << 33) + 5}) {
        at::philox_engine engine(seed, sub, offset);
        auto ours = philox::philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                                          static_cast<uint32_t>(sub), static_cast<uint32_t>(sub >> 32),
                                          static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
        for (int i = 0; i < 4; ++i) EXPECT_EQ(ours.w[i], engine()) << seed << " " << sub << " " << offset << " " << i;
      }
}

TEST(RandomKeyed, UniformsDependOnlyOnTheirKey) {
  RandomStream s{3, purpose::kCorrupt, 17};
  auto rows = torch::tensor({5, 9, 2}, torch::kLong);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    auto u = keyed_uniform(s, rows, 11, dtype);
    ASSERT_EQ(u.sizes(), (std::vector<int64_t>{3, 11}));
    // Another batch composition, another order: the same rows draw the same values.
    auto v = keyed_uniform(s, torch::tensor({2, 100, 5}, torch::kLong), 11, dtype);
    EXPECT_TRUE(torch::equal(u[0], v[2]));
    EXPECT_TRUE(torch::equal(u[2], v[0]));
    // A column offset continues the row's stream.
    auto tail = keyed_uniform(s, rows, 4, dtype, torch::tensor({7, 7, 7}, torch::kLong));
    EXPECT_TRUE(torch::equal(tail, u.narrow(1, 7, 4)));
    // Another step, seed or purpose gives other values.
    for (RandomStream o : {RandomStream{3, purpose::kCorrupt, 18}, RandomStream{4, purpose::kCorrupt, 17},
                           RandomStream{3, purpose::kRedraw, 17}})
      EXPECT_FALSE(torch::equal(keyed_uniform(o, rows, 11, dtype), u));
  }
}

TEST(RandomKeyed, UniformsAreUniform) {
  RandomStream s{1, purpose::kTrainTime, 0};
  auto u = keyed_uniform(s, torch::arange(2000, torch::kLong), 100, torch::kDouble).flatten();
  EXPECT_GE(u.min().item<double>(), 0.0);
  EXPECT_LT(u.max().item<double>(), 1.0);
  // Kolmogorov-Smirnov distance of 200k draws: 1.95 / sqrt(n) is the 0.1% critical value.
  auto sorted = std::get<0>(u.sort());
  auto n = static_cast<double>(u.numel());
  auto ecdf = torch::arange(1, u.numel() + 1, torch::kDouble) / n;
  double ks = (ecdf - sorted).abs().max().item<double>();
  EXPECT_LT(ks, 1.95 / std::sqrt(n)) << "KS distance " << ks;
  // Neighbouring columns are uncorrelated.
  auto m = u.view({2000, 100});
  double corr = torch::corrcoef(torch::stack({m.select(1, 0), m.select(1, 1)})).index({0, 1}).item<double>();
  EXPECT_LT(std::abs(corr), 0.1);
}

TEST(RandomKeyed, CategoricalFollowsTheWeightsAndItsKeys) {
  auto p = torch::tensor({0.5, 0.0, 0.2, 0.3}, torch::kDouble);
  const int64_t n = 20000;
  auto weights = (p * 7.0).unsqueeze(0).expand({n, 4}).contiguous();  // any positive scale
  RandomStream s{9, purpose::kSample, 4};
  auto draws = keyed_categorical(weights, s, torch::arange(n, torch::kLong));
  auto counts = torch::bincount(draws, {}, 4).to(torch::kDouble);
  EXPECT_EQ(counts[1].item<double>(), 0.0) << "a zero-weight category was drawn";
  double chi2 = 0;
  for (int k : {0, 2, 3}) {
    double e = p[k].item<double>() * n;
    chi2 += std::pow(counts[k].item<double>() - e, 2) / e;
  }
  EXPECT_LT(chi2, 13.8) << "chi-square with 2 dof, p = 0.001";
  // float32 weights draw the same categories but where a uniform falls within float32 rounding of a
  // boundary of the cumulative weights.
  auto draws32 = keyed_categorical(weights.to(torch::kFloat), s, torch::arange(n, torch::kLong));
  EXPECT_GE((draws32 == draws).to(torch::kDouble).mean().item<double>(), 0.999);
  // A row's draw does not depend on the other rows of the batch.
  auto some = torch::tensor({17, 3, 19999}, torch::kLong);
  EXPECT_TRUE(torch::equal(keyed_categorical(weights.index_select(0, some), s, some), draws.index_select(0, some)));
  // Empty batches draw nothing.
  EXPECT_EQ(keyed_categorical(torch::zeros({0, 5}), s, torch::zeros({0}, torch::kLong)).numel(), 0);
}

// A row of all-zero, NaN or infinite weights has no token to draw: an error naming the row, its
// sample and the step, never token 0 (which a sampler would take for a plausible draw).
TEST(RandomKeyed, CategoricalRefusesRowsWithNothingToDraw) {
  RandomStream s{9, purpose::kSample, 17};
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    for (double poison : {0.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
      auto w = torch::rand({40, 6}, torch::kDouble).to(dtype) + 0.1;
      w[23].fill_(0.0);
      if (poison != 0.0) w[23][2] = poison;
      w[31].fill_(0.0);  // a later bad row: the first one is named
      auto rows = torch::arange(100, 140, torch::kLong), offs = torch::full({40}, 12, torch::kLong);
      std::string msg = test::error_of([&] { keyed_categorical(w, s, rows, offs); });
      EXPECT_NE(msg.find("row 23 of 40 (sample/sequence 123, column offset 12, step 17)"), std::string::npos)
          << c10::toString(dtype) << " " << poison << ": " << msg;
      EXPECT_NE(msg.find(fmt::format("sum to {}", poison)), std::string::npos) << msg;
      // Without the bad rows the same call draws.
      w[23].fill_(1.0);
      w[31].fill_(1.0);
      EXPECT_EQ(test::error_of([&] { keyed_categorical(w, s, rows, offs); }), "<no error>");
    }
  }
}

// The CUDA kernels compute the same uniforms bit for bit, and the same categorical draws.
TEST(RandomGpu, CudaDrawsEqualCpuDraws) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  RandomStream s{11, purpose::kCorrupt, 123456789012ull};
  auto rows = torch::randint(1 << 30, {333}, torch::kLong), offs = torch::randint(1 << 20, {333}, torch::kLong);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    auto cpu = keyed_uniform(s, rows, 77, dtype, offs);
    auto gpu = keyed_uniform(s, rows.cuda(), 77, dtype, offs.cuda());
    EXPECT_TRUE(torch::equal(cpu, gpu.cpu())) << c10::toString(dtype);
  }
  auto w = torch::rand({512, 5000}, torch::kDouble).pow(4);
  auto cpu = keyed_categorical(w, s, rows.narrow(0, 0, 333).repeat({2}).narrow(0, 0, 512), {});
  auto gpu = keyed_categorical(w.cuda(), s, rows.narrow(0, 0, 333).repeat({2}).narrow(0, 0, 512).cuda(), {});
  double agree = (cpu == gpu.cpu()).to(torch::kDouble).mean().item<double>();
  std::cout << "categorical draws equal on CPU and GPU for " << 100 * agree << "% of rows\n";
  EXPECT_GE(agree, 0.998);
  auto gpu32 = keyed_categorical(w.to(torch::kFloat).cuda(), s, rows.narrow(0, 0, 333).repeat({2}).narrow(0, 0, 512).cuda(), {});
  EXPECT_GE((gpu32.cpu() == cpu).to(torch::kDouble).mean().item<double>(), 0.99);
  // A row with nothing to draw (zeros, a NaN) is the same error on the device, naming the same row.
  for (double poison : {0.0, std::nan("")}) {
    auto bad = w.clone();
    bad[7].zero_();
    bad[7][3] = poison;
    auto r = rows.narrow(0, 0, 333).repeat({2}).narrow(0, 0, 512);
    std::string on_cpu = test::error_of([&] { keyed_categorical(bad, s, r, {}); });
    std::string on_gpu = test::error_of([&] { keyed_categorical(bad.cuda(), s, r.cuda(), {}); });
    EXPECT_NE(on_gpu.find(fmt::format("row 7 of 512 (sample/sequence {}", r[7].item<int64_t>())), std::string::npos)
        << on_gpu;
    EXPECT_EQ(on_gpu, on_cpu);
  }
}
