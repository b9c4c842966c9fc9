// Block diffusion's pieces (Arriola et al. 2025, BD3-LM), as the authors' code computes them
// (kuleshov-group/bd3lms, diffusion.py and metrics.py), exposed for the golden and oracle tests
// (the objective itself: bd3.cpp).
#pragma once
#include <torch/torch.h>

#include <utility>
#include <vector>

#include "objectives/objective.h"

namespace sedd {

// The clipped schedule (beta, omega) of a bd3 model: model.clip, or the default (1e-3, 1), (1, 1)
// for blocks of one token (exact next-token cross entropy).
std::pair<double, double> bd3_clip(const ModelConfig& m);
std::string bd3_clip_text(double beta, double omega);

// One time per (sequence, block) from uniforms eps [B, N] (N blocks): stratified as the authors'
// _sample_t ("antithetic" there) over the G * N blocks of a batch of G sequences, where rows [B]
// are the sequences' indices in that batch, t = (eps + row N + block) / (G N); iid: t = eps. Then
// t = beta + t (omega - beta); beta = omega = 1: all ones. Returns [B, N] float64.
torch::Tensor bd3_times(const torch::Tensor& eps, const torch::Tensor& rows, int64_t G, bool stratified, double beta,
                        double omega);

// x_t: position l of x0 [B, L] masked (id mask) where u <= t (u, t [B, L]), except position 0,
// which stays clean (the authors' ignore_bos).
torch::Tensor bd3_corrupt(const torch::Tensor& x0, const torch::Tensor& t, const torch::Tensor& u, int64_t mask);

// The per-sequence training loss [B]: sum over masked positions of -log p(x0 | x_t, x0's earlier
// blocks) / t, the network reading x_t beside x0.
torch::Tensor bd3_sequence_loss(DDiT& model, const torch::Tensor& xt, const torch::Tensor& x0, const torch::Tensor& t,
                                const DropoutKey* dropout, const LossOptions& o);

// The per-block losses [B, L / block] of the clipped-schedule search: the mean over each block's
// positions of -log p(x0 | ...) / t at masked positions, 0 elsewhere (their nlls per block).
torch::Tensor bd3_block_losses(DDiT& model, const torch::Tensor& xt, const torch::Tensor& x0, const torch::Tensor& t,
                               int64_t block);

// The authors' nucleus filter (_nucleus_sample): p [R, V] sorted descending keeps the entries whose
// cumulative probability is <= top_p and always the first (the entry that crosses top_p is
// dropped), renormalised. top_p = 1: p unchanged.
torch::Tensor bd3_nucleus(const torch::Tensor& p, double top_p);

// The samplers' steps. First hitting: the position of each row [B] to unmask, the floor(u n)-th of
// its n masked positions (masked [B, T] bool, u [B] in [0, 1)); the token is then drawn from the
// nucleus-filtered p(x0) of that position. ddpm from t to s: the weights [R, V + 1] of a masked
// position, p0 (1 - s/t) and s/t for staying masked (the last column).
torch::Tensor bd3_first_hitting_position(const torch::Tensor& masked, const torch::Tensor& u);
torch::Tensor bd3_ddpm_weights(const torch::Tensor& p0, double t, double s);

// The clipped-schedule search's windows (metrics.py, init_valid_vars with their recipe's widths
// 0.5 ... 0.9 and step 0.05): (1e-3, 1) first, then (max(i, 1e-3), i + w) for each width w and
// i = 0, 0.05, ... while i + w <= 1, as float32 arange gives them.
std::vector<std::pair<double, double>> bd3_clip_windows();
// The window with the least variance (the first on ties), as their _clipped_schedule_search.
size_t bd3_pick_window(const std::vector<double>& variance);

}  // namespace sedd
