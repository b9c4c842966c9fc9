// Discrete flow matching's pieces (Gat et al. 2024; Shaul et al. 2024), as Meta's flow_matching
// computes them, exposed for the golden and oracle tests (the objective itself: dfm.cpp).
// Time runs the other way from the diffusion objectives: t = 0 is the source (all masks, or
// uniform tokens), t = 1 the data; kappa_t = t^n is the probability that a position already holds
// its data token.
#pragma once
#include <torch/torch.h>

#include <vector>

#include "objectives/objective.h"

namespace sedd {

// kappa_t = t^n and its derivative n t^(n-1) (their PolynomialConvexScheduler), float64.
torch::Tensor dfm_kappa(const torch::Tensor& t, double n);
torch::Tensor dfm_kappa_rate(const torch::Tensor& t, double n);

// The mixture path: x_t = x_0 where u < 1 - kappa_t, else x_1; x0, x1, u [B, L], kappa [B].
torch::Tensor dfm_path(const torch::Tensor& x0, const torch::Tensor& x1, const torch::Tensor& kappa,
                       const torch::Tensor& u);

// Per-position losses from log-probabilities log_p [R, V'] (over every output column, the mask's
// included) of rows with data token x1 [R] and path token xt [R]:
//   generalized KL: -w (p(xt) - [xt = x1] + [xt != x1] log p(x1)), w = kappa'/(1 - kappa) [R];
//   cross entropy: -log p(x1).
torch::Tensor dfm_generalized_kl(const torch::Tensor& log_p, const torch::Tensor& x1, const torch::Tensor& xt,
                                 const torch::Tensor& w);

// The Euler solver's time grid: t_0 + h i for i < ceil((t_f - t_0) / h), then t_f.
std::vector<double> dfm_time_grid(double step_size, double t0, double t_final);

// The probability velocity towards drawn data tokens x1 [R] from xt [R] over `width` columns:
//   kappa'/(1 - kappa) onehot(x1) + c kappa'/(kappa (1 - kappa)) ((1 - kappa) p0 + kappa onehot(x1)),
// zero at xt (the corrector term only when c > 0); p0 [width] the source distribution. [R, width].
torch::Tensor dfm_velocity(const torch::Tensor& x1, const torch::Tensor& xt, double kappa, double kappa_rate,
                           double corrector, const torch::Tensor& p0, int64_t width);

// The corrector coefficient c(t) = a t^b (1 - t)^c of a sampler config (0 when a = 0).
double dfm_corrector(const SamplerConfig& cfg, double t);

}  // namespace sedd
