// The training objective (DESIGN.md §3): per sequence sigma'(t) * sum_l score_entropy_l.
#pragma once
#include <torch/torch.h>

#include "diffusion/graph.h"
#include "diffusion/noise.h"

namespace sedd {

// t = (1 - eps) u + eps from uniform draws u [B] (the reference's sampling_eps = 1e-3).
torch::Tensor training_time(const torch::Tensor& u, double eps = 1e-3);

// log_score [B, L, dim] of the network at (xt, sigma(t)); returns the loss per sequence [B]
// in the log-score's dtype.
torch::Tensor sequence_loss(const Graph& graph, const Noise& noise, const torch::Tensor& log_score,
                            const torch::Tensor& t, const torch::Tensor& xt, const torch::Tensor& x0);

}  // namespace sedd
