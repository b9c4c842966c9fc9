// D3PM's discrete-time chain (Austin et al. 2021) on our continuous schedules: step t of T has
// total noise sigma(t / T) (keep probability alpha_bar_t = e^-sigma), step 0 has none. The
// one-step matrix Q_t and the cumulative Qbar_t are the graph's exp(sigma Q) between those noise
// levels, so q(x_t | x0), q(x_{t-1} | x_t, x0) and the x0-parameterised p(x_{t-1} | x_t) are the
// graph's transition / posterior / model_posterior (tests compare them with explicit matrices).
#pragma once
#include <torch/torch.h>

#include "diffusion/graph.h"
#include "diffusion/noise.h"

namespace sedd {

// sigma of steps t (int64 or float, any shape) of a T-step chain; 0 for t = 0.
torch::Tensor discrete_sigma(const Noise& noise, const torch::Tensor& step, int64_t T);
// u in [0, 1) -> a step in {1, ..., T} (uniform; keeps iid / antithetic / stratified u's structure).
torch::Tensor discrete_step(const torch::Tensor& u, int64_t T);
// The explicit matrices, row = from state, column = to state [dim, dim] (tests and small vocabularies).
torch::Tensor transition_matrix(const Graph& graph, double sigma);

}  // namespace sedd
