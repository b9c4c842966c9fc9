// Fused elementwise chains of the DDiT block: adaLN-modulated LayerNorm, the gated residual with
// bias and keyed dropout, and the rotary embedding. Each op has
//   - a plain LibTorch composition (`*_plain`): the CPU path, the reference and the fallback;
//   - a CUDA path (`*_fused`): forward and backward kernels (fused_ops_kernels.cu) inside
//     torch::autograd::Functions, for float32 and bf16 tensors on a CUDA device;
//   - a dispatcher (no suffix) that takes the CUDA path when the kernels are built, the tensors
//     suit them and fused_ops_active() holds for the device, and the plain path otherwise.
// All arithmetic is float32 (float64 inputs stay float64 on the plain path).
#pragma once
#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>

#include "model/dropout.h"

namespace sedd {

// layer_norm(x.float(), no bias, eps 1e-5) * weight * (1 + scale) + shift, which is
// modulate(BiasFreeLayerNorm(x), shift, scale) of the DDiT block. x [B, L, D], weight [D],
// shift and scale [B, 1, D]. The result's dtype is `out_dtype` when given, else the CUDA autocast
// dtype when autocast is on and x is on CUDA (the next matmul casts to it anyway, so the fused
// kernel writes bf16 directly and saves a float32 round trip), else float32 (float64 for
// float64 inputs). Gradients for x, weight, shift and scale.
torch::Tensor layer_norm_modulate(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& shift,
                                  const torch::Tensor& scale, std::optional<torch::ScalarType> out_dtype = std::nullopt);
torch::Tensor layer_norm_modulate_plain(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& shift,
                                        const torch::Tensor& scale,
                                        std::optional<torch::ScalarType> out_dtype = std::nullopt);
torch::Tensor layer_norm_modulate_fused(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& shift,
                                        const torch::Tensor& scale,
                                        std::optional<torch::ScalarType> out_dtype = std::nullopt);

// x + gate * keyed_dropout(branch + bias, p, training, key, site): the residual update of a DDiT
// branch whose last Linear ran without its bias. x, branch [B, L, D]; bias [D] or undefined;
// gate [B, 1, D]. The result has the promoted dtype of x, branch and gate (float32 for the
// float32 residual stream under autocast). The fused backward recomputes the dropout mask from
// the key (never stored); training with p > 0 and no key (torch's unkeyed dropout) is plain only.
// Gradients for x, branch, bias and gate.
torch::Tensor gated_residual(const torch::Tensor& x, const torch::Tensor& branch, const torch::Tensor& bias,
                             const torch::Tensor& gate, double p, bool training, const DropoutKey* key, int64_t site);
torch::Tensor gated_residual_plain(const torch::Tensor& x, const torch::Tensor& branch, const torch::Tensor& bias,
                                   const torch::Tensor& gate, double p, bool training, const DropoutKey* key,
                                   int64_t site);
torch::Tensor gated_residual_fused(const torch::Tensor& x, const torch::Tensor& branch, const torch::Tensor& bias,
                                   const torch::Tensor& gate, double p, bool training, const DropoutKey* key,
                                   int64_t site);

// Rotary embedding of q or k [B, L, H, Dh] (RotaryImpl::apply): x * cos + rotate_half(x) * sin
// with the angles l * inv_freq[j] (inv_freq [Dh / 2], float32). The result has x's dtype and is
// contiguous. Gradient for x.
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& inv_freq);
torch::Tensor rotary_plain(const torch::Tensor& x, const torch::Tensor& inv_freq);
torch::Tensor rotary_fused(const torch::Tensor& x, const torch::Tensor& inv_freq);

// Comparison helpers of the runtime self-check, shared with the tests.
using TensorOp = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;
// op(inputs) and the gradients of sum(op(inputs) * probe) for the inputs with a name in `names`
// (an empty name: no gradient), on leaves of their own (so two paths never share a graph).
std::vector<std::pair<std::string, torch::Tensor>> value_and_grads(const TensorOp& op,
                                                                   const std::vector<torch::Tensor>& inputs,
                                                                   const std::vector<std::string>& names,
                                                                   const torch::Tensor& probe);
// max |a - b| / max |b| over the elements, in float64 (a missing gradient counts as zeros).
double normalised_error(const torch::Tensor& a, const torch::Tensor& b);

// True when this build has the CUDA kernels.
bool fused_ops_built();

// Whether the dispatchers take the CUDA path on `device`. The first call for a CUDA device runs
// fused_ops_self_check() on it; a mismatch prints one warning line (the op and its error) to
// stderr, and the device keeps the plain path from then on. False on CPU and without kernels.
bool fused_ops_active(const torch::Device& device);

// One line for logs and benchmarks: "fused kernels: active on cuda:0", "... not built", ...; it
// names every launch that fell back to the plain path.
std::string fused_ops_status();

// A fused kernel that fails to launch (CUDA refuses the block shape, or the launcher the row) makes
// the dispatcher, or the backward pass of an op whose forward was fused, compute that call with the
// plain ops; a warning naming the op and the CUDA error is printed once per distinct failure. For
// tests: the next `count` launch checks fail as if CUDA had refused the launch.
void fused_ops_inject_launch_failures(int count);

// Runs every fused op and its plain counterpart on small random inputs on `device` (float32 and
// bf16, vectorised and scalar row widths, with and without dropout), forward and backward, and
// compares them: the normalised error max|fused - plain| / max|plain| of every output and
// gradient must stay within kFusedCheckTolFloat (float32 storage) or kFusedCheckTolBf16 (bf16
// storage: one rounding of 2^-8 on either side, plus the plain path's intermediate roundings).
// Returns "" when all agree, else the first mismatch ("rotary bf16 grad x: error 0.3 > 0.02").
// Leaves the global random generators and the autocast state untouched.
std::string fused_ops_self_check(const torch::Device& device);
constexpr double kFusedCheckTolFloat = 1e-4;
constexpr double kFusedCheckTolBf16 = 2e-2;

}  // namespace sedd
