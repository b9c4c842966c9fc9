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

// The score-entropy loss at given noisy inputs: sigma'(t) * sum_l l_l [B]; t [B] float64.
torch::Tensor sedd_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                 const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                 const LossOptions& options);

}  // namespace sedd
