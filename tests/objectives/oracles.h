// What the objectives' test files share: an exact clean-token oracle for distributions with
// independent positions, draws from them, and the tiny run every objective goes through (it
// learns, resumes exactly, samples with conditioning on two ranks and evaluates).
#pragma once
#include <torch/torch.h>

#include <string>

#include "diffusion/graph.h"
#include "objectives/sampling.h"
#include "test_util.h"

namespace sedd::test {

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

// n draws of sequences whose positions are independent with marginals p [L, N].
torch::Tensor draw_truth(const torch::Tensor& p, int64_t n, uint64_t seed);

// With CleanTokenOracle (exact for independent positions) the bound of `objective` on `graph` is
// tight (within Monte Carlo error of the entropy) and its sampler reproduces the marginals (chi^2).
void expect_clean_token_oracle_is_exact(const char* objective, const char* graph);

// A motif of 37 tokens repeated 80 times, then 500 uniform tokens (vocabulary 40, end-of-text 39),
// as one shard in `tmp`; returns its glob (and the tokens in *tokens when given).
std::string objective_data(const TempDir& tmp, torch::Tensor* tokens = nullptr);

// The tiny recipe's sedd-train command on two ranks for `steps` steps with `flags` (an objective and its options).
std::string objective_train(const std::string& data, const std::string& dir, const std::string& flags, int64_t steps);

// Trains the tiny recipe with `flags` (an objective and its options) on a motif corpus and checks
// that the loss falls, resume repeats the straight run, sampling on two ranks honours --fix and the
// evaluated bound beats a model without context.
void expect_objective_learns(const std::string& flags);

}  // namespace sedd::test
