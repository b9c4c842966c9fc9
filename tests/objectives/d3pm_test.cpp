// D3PM (discrete time): its chain against explicit matrix products, its bound and sampler with the
// exact clean-token oracle, and the tiny run on both graphs.
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

// With the exact clean-token posterior, the D3PM bounds are tight (equal to the entropy within
// Monte Carlo error), and its ancestral sampler reproduces the marginals, on both graphs.
TEST(ObjectiveOracle, D3pmBoundsAreTightAndItsSamplerReproducesTheMarginals) {
  expect_clean_token_oracle_is_exact("d3pm", "absorb");
  expect_clean_token_oracle_is_exact("d3pm", "uniform");
}

// The tiny run (src/objectives/d3pm.cpp trains, resumes, samples and evaluates), both graphs.
TEST(ObjectiveTraining, D3pmAbsorb) { expect_objective_learns("--diffusion.objective d3pm --diffusion.timesteps 50"); }
TEST(ObjectiveTraining, D3pmUniform) {
  expect_objective_learns("--diffusion.objective d3pm --diffusion.graph uniform --diffusion.timesteps 50");
}
