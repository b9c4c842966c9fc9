// Score entropy's loss and draws, exposed for replays and tests (the objective itself: sedd.cpp).
#pragma once
#include <torch/torch.h>

#include "objectives/objective.h"

namespace sedd {

// The diffusion times t [B] (float64) and the noisy input xt [B, L] that the sedd objective draws
// for a micro-batch: exposed so that a step can be replayed by another trainer with the same draws.
struct SeddDraws {
  torch::Tensor t, xt;
};
SeddDraws sedd_training_draws(const Graph& graph, const Noise& noise, const torch::Tensor& x0, const LossDraws& draws);

// The score-entropy loss from full log-scores [B, L, dim] of the network at (xt, sigma(t)): per
// sequence sigma'(t) * sum_l score_entropy_l [B], in the log-score's dtype (the unfused reference).
torch::Tensor sequence_loss(const Graph& graph, const Noise& noise, const torch::Tensor& log_score,
                            const torch::Tensor& t, const torch::Tensor& xt, const torch::Tensor& x0);

// The score-entropy loss at given noisy inputs: sigma'(t) * sum_l l_l [B]; t [B] float64.
torch::Tensor sedd_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                 const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                 const LossOptions& options);

}  // namespace sedd
