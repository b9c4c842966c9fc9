// Masked diffusion's loss at given draws, exposed for replays and tests (the objective: mdlm.cpp).
#pragma once
#include <torch/torch.h>

#include "objectives/objective.h"

namespace sedd {

// The masked-diffusion (MDLM) loss at given noisy inputs [B]: sigma'(t) / (e^sigma(t) - 1) times the
// sum over the masked positions of xt of -log p(x0_l | xt); t [B] float64; absorbing graph only.
torch::Tensor mdlm_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                 const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                 const LossOptions& options);

}  // namespace sedd
