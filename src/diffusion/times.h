// Keyed training times: the uniforms of a batch's rows (iid, stratified or antithetic) and the time t they give.
#pragma once
#include <torch/torch.h>

#include <string>

namespace sedd {

// t = (1 - eps) u + eps from uniform draws u [B] (the reference's sampling_eps = 1e-3).
torch::Tensor training_time(const torch::Tensor& u, double eps = 1e-3);

// The uniforms u in [0, 1) that set the diffusion times of rows `rows` (int64 [n], global indices
// 0..B-1 in a batch of B) at step `step`, keyed by the row so they never depend on the ranks:
//   iid: U_k; stratified: (k + U_k) / B (one time per B-th of [0, 1)); antithetic: U_k for
//   k < B/2 and 1 - U_{k - B/2} for the rest (B even).
torch::Tensor time_uniforms(const std::string& mode, uint64_t seed, uint64_t step, const torch::Tensor& rows,
                            int64_t B);


}  // namespace sedd
