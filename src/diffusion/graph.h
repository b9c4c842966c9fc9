// Forward graphs of the discrete diffusion (docs/DESIGN.md, "Graphs"): the rate matrix Q, its exponential,
// forward corruption, the score-entropy loss and the pieces of the reverse process.
//
// Shapes: x is an int64 index tensor of any batch shape [...]; per-position vectors are
// [..., dim]. sigma/dsigma broadcast against x (e.g. [B, 1] for x [B, L]). Outputs take the dtype
// of sigma or score (float32 or float64) and the device of x.
#pragma once
#include <torch/torch.h>
#include <memory>
#include <string>

#include "diffusion/keyed_random.h"

namespace sedd {

class Graph {
 public:
  virtual ~Graph() = default;
  virtual std::string name() const = 0;
  virtual bool absorbing() const = 0;
  int64_t tokens() const { return tokens_; }
  virtual int64_t dim() const = 0;

  // Column x of Q (forward rate out of ... into x) and row x of Q.
  virtual torch::Tensor rate(const torch::Tensor& x, torch::Dtype dtype = torch::kFloat) const = 0;
  virtual torch::Tensor transp_rate(const torch::Tensor& x, torch::Dtype dtype = torch::kFloat) const = 0;
  // Column x of exp(sigma Q) and row x of exp(sigma Q).
  virtual torch::Tensor transition(const torch::Tensor& x, const torch::Tensor& sigma) const = 0;
  virtual torch::Tensor transp_transition(const torch::Tensor& x, const torch::Tensor& sigma) const = 0;

  // x0 -> x_sigma, each position independently. Randomness from `gen` (CPU, keyed by the caller).
  virtual torch::Tensor sample_transition(const torch::Tensor& x0, const torch::Tensor& sigma,
                                          torch::Generator& gen) const = 0;
  // x0 [B, L] -> x_sigma with keyed draws: position l of row b moves when
  // U(move, rows[b], col_offset[b] + l) < 1 - e^-sigma[b], to the mask (absorbing) or to token
  // floor(N U(redraw, ...)) (uniform). sigma [B] (float64 recommended). Works on any device, with
  // the same result on each.
  virtual torch::Tensor corrupt(const torch::Tensor& x0, const torch::Tensor& sigma, const RandomStream& move,
                                const RandomStream& redraw, const torch::Tensor& rows,
                                const torch::Tensor& col_offset = {}) const = 0;
  // A draw from the limiting distribution, shape `shape`.
  virtual torch::Tensor sample_limit(torch::IntArrayRef shape, torch::Generator& gen,
                                     torch::Device device = torch::kCPU) const = 0;

  // A distribution pushed through the forward process: probs [..., dim] -> probs exp(sigma Q),
  // sigma broadcast against probs' leading dimensions.
  virtual torch::Tensor transition_of(const torch::Tensor& probs, const torch::Tensor& sigma) const = 0;
  // q(x_s | x_t, x0) of the forward process with total noise sigma_s < sigma_t:
  //   proportional to transp_transition(x_t, sigma_t - sigma_s) * transition(x0, sigma_s).
  // With the clean token x0 replaced by a distribution p0 [..., N] over tokens (the network's
  // prediction), the same product with transition_of(p0, sigma_s) is the x0-parameterised reverse
  // step of masked diffusion and D3PM. Both return normalised [..., dim] probabilities.
  torch::Tensor posterior(const torch::Tensor& xt, const torch::Tensor& x0, const torch::Tensor& sigma_s,
                          const torch::Tensor& sigma_t) const;
  torch::Tensor model_posterior(const torch::Tensor& xt, const torch::Tensor& p0, const torch::Tensor& sigma_s,
                                const torch::Tensor& sigma_t) const;

  // transp_rate(x) * score with the diagonal entry set to minus the sum of the others.
  torch::Tensor reverse_rate(const torch::Tensor& x, const torch::Tensor& score) const;
  // One Euler step: Cat(onehot(x) + rate).
  torch::Tensor sample_rate(const torch::Tensor& x, const torch::Tensor& rate, torch::Generator& gen) const;
  // p_{sigma-dsigma}(z) / p_sigma(x) approximated by exp(-dsigma Q) applied to the score.
  virtual torch::Tensor staggered_score(const torch::Tensor& score, const torch::Tensor& dsigma) const = 0;
  // Denoising score entropy per position [...], given log_score [..., dim].
  virtual torch::Tensor score_entropy(const torch::Tensor& log_score, const torch::Tensor& sigma,
                                      const torch::Tensor& x, const torch::Tensor& x0) const = 0;

 protected:
  explicit Graph(int64_t tokens) : tokens_(tokens) {}
  torch::Tensor one_hot(const torch::Tensor& x, torch::Dtype dtype) const;
  int64_t tokens_;
};

// Absorbing ("masked") graph: dim = tokens + 1, the mask is the last state.
class AbsorbingGraph final : public Graph {
 public:
  explicit AbsorbingGraph(int64_t tokens);
  std::string name() const override { return "absorb"; }
  bool absorbing() const override { return true; }
  int64_t dim() const override { return tokens_ + 1; }
  int64_t mask_id() const { return tokens_; }
  torch::Tensor rate(const torch::Tensor& x, torch::Dtype dtype) const override;
  torch::Tensor transp_rate(const torch::Tensor& x, torch::Dtype dtype) const override;
  torch::Tensor transition(const torch::Tensor& x, const torch::Tensor& sigma) const override;
  torch::Tensor transp_transition(const torch::Tensor& x, const torch::Tensor& sigma) const override;
  torch::Tensor sample_transition(const torch::Tensor& x0, const torch::Tensor& sigma,
                                  torch::Generator& gen) const override;
  torch::Tensor corrupt(const torch::Tensor& x0, const torch::Tensor& sigma, const RandomStream& move,
                        const RandomStream& redraw, const torch::Tensor& rows,
                        const torch::Tensor& col_offset) const override;
  torch::Tensor sample_limit(torch::IntArrayRef shape, torch::Generator& gen,
                             torch::Device device) const override;
  torch::Tensor staggered_score(const torch::Tensor& score, const torch::Tensor& dsigma) const override;
  torch::Tensor score_entropy(const torch::Tensor& log_score, const torch::Tensor& sigma,
                              const torch::Tensor& x, const torch::Tensor& x0) const override;
  torch::Tensor transition_of(const torch::Tensor& probs, const torch::Tensor& sigma) const override;
};

// Uniform graph: Q = 11^T / N - I, dim = tokens.
class UniformGraph final : public Graph {
 public:
  explicit UniformGraph(int64_t tokens);
  std::string name() const override { return "uniform"; }
  bool absorbing() const override { return false; }
  int64_t dim() const override { return tokens_; }
  torch::Tensor rate(const torch::Tensor& x, torch::Dtype dtype) const override;
  torch::Tensor transp_rate(const torch::Tensor& x, torch::Dtype dtype) const override;
  torch::Tensor transition(const torch::Tensor& x, const torch::Tensor& sigma) const override;
  torch::Tensor transp_transition(const torch::Tensor& x, const torch::Tensor& sigma) const override;
  torch::Tensor sample_transition(const torch::Tensor& x0, const torch::Tensor& sigma,
                                  torch::Generator& gen) const override;
  torch::Tensor corrupt(const torch::Tensor& x0, const torch::Tensor& sigma, const RandomStream& move,
                        const RandomStream& redraw, const torch::Tensor& rows,
                        const torch::Tensor& col_offset) const override;
  torch::Tensor sample_limit(torch::IntArrayRef shape, torch::Generator& gen,
                             torch::Device device) const override;
  torch::Tensor staggered_score(const torch::Tensor& score, const torch::Tensor& dsigma) const override;
  torch::Tensor score_entropy(const torch::Tensor& log_score, const torch::Tensor& sigma,
                              const torch::Tensor& x, const torch::Tensor& x0) const override;
  torch::Tensor transition_of(const torch::Tensor& probs, const torch::Tensor& sigma) const override;
};

// "absorb" | "uniform"; tokens = vocabulary size N without the mask.
std::unique_ptr<Graph> make_graph(const std::string& kind, int64_t tokens);

// e^sigma - 1, with expm1 below 0.5 where exp(sigma) - 1 would lose digits.
torch::Tensor exp_minus_one(const torch::Tensor& sigma);

}  // namespace sedd
