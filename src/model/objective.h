// Training losses of the objectives one engine trains (docs/DESIGN.md, "Objectives"), all with
// the same network, data, keyed draws and optimizer:
//  - sedd: score entropy, sigma'(t) sum_l l_l(x_t)                               (SEDD)
//  - mdlm: masked diffusion, sigma'(t) / (e^sigma(t) - 1) sum_{masked l} -log p(x0_l | x_t), the
//    network's output read as logits of the clean token with the mask excluded (SUBS)  (MDLM)
//  - d3pm: discrete time, T KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for one step t ~ U{1..T}
//    (the t = 1 term is -log p(x0 | x1)), plus lambda_ce sum -log p(x0 | x_t)        (D3PM hybrid)
//  - ar: next-token cross entropy with the end-of-text id as the first input      (AR baseline)
// Each returns the per-sequence loss [B] in nats summed over the positions; the trainer divides by
// the batch's tokens. Only rows with a non-zero term are projected (masked rows for absorbing
// graphs), through the fused, chunked output loss where the loss is a weighted cross entropy or
// score entropy.
#pragma once
#include <torch/torch.h>

#include "diffusion/graph.h"
#include "diffusion/keyed_random.h"
#include "diffusion/noise.h"
#include "model/ddit.h"

namespace sedd {

struct LossOptions {
  // Project only the rows with a non-zero loss (absorbing graph: the masked positions) and fuse the
  // projection with the loss chunk by chunk; off = full logits, then the loss (the reference).
  bool fused = true;
  int64_t chunk_elems = int64_t{1} << 26;  // logits per chunk of the fused loss
  double lambda_ce = 0.01;                 // d3pm: weight of the auxiliary cross entropy
};

// The keyed draws of one micro-batch: its rows' global indices and the step key; `u` [B] float64
// in (0, 1) sets each row's diffusion time (iid, antithetic or stratified, chosen by the caller).
struct LossDraws {
  uint64_t seed = 0, step = 0;
  torch::Tensor rows, u;
};

// Per-sequence training loss [B] of the model's objective on clean sequences x0 [B, L].
torch::Tensor training_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& x0,
                            const LossDraws& draws, const DropoutKey* dropout, const LossOptions& options);

// The diffusion times t [B] (float64) and the noisy input xt [B, L] that training_loss draws for the
// sedd objective: exposed so that a step can be replayed by another trainer with the same draws.
struct SeddDraws {
  torch::Tensor t, xt;
};
SeddDraws sedd_training_draws(const Graph& graph, const Noise& noise, const torch::Tensor& x0, const LossDraws& draws);

// The score-entropy loss at given noisy inputs: sigma'(t) * sum_l l_l [B]; t [B] float64.
torch::Tensor sedd_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                 const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                 const LossOptions& options);

// The masked-diffusion (MDLM) loss at given noisy inputs [B]: sigma'(t) / (e^sigma(t) - 1) times the
// sum over the masked positions of xt of -log p(x0_l | xt); t [B] float64; absorbing graph only.
// training_loss's mdlm branch draws t and xt and calls this; tests and replays inject their own.
torch::Tensor mdlm_sequence_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& xt,
                                 const torch::Tensor& x0, const torch::Tensor& t, const DropoutKey* dropout,
                                 const LossOptions& options);

// The autoregressive model's input: x0 shifted right by one, the end-of-text id first.
torch::Tensor autoregressive_input(const torch::Tensor& x0, int64_t bos);

}  // namespace sedd
