// The network's last linear layer fused with the per-position loss, chunked over rows.
//
// A vocabulary-wide output ([rows, V] logits, V = 50k for GPT-2 tokens) is the largest tensor of
// a step. This function takes the rows' features [R, D] and the layer's weight [V, D] and bias [V]
// and computes, chunk by chunk, logits -> loss per row; backward recomputes each chunk's logits
// instead of keeping them. Memory stays O(chunk x V); the values and gradients equal those of
// "logits = features W^T + b, then the loss" (tests compare both). The token columns are padded
// to a multiple of 8 inside (aligned rows for cuBLASLt; the padding columns are -inf logits and get
// no gradient); the weight and bias keep their shape.
//
// Row losses, with s = logits of the row and N the number of token columns used:
//  - SeddAbsorb (masked rows of the absorbing graph), a = score shift (scale_by_sigma, else 0),
//    b = r = 1 / (e^sigma - 1):  l = sum_{y<N} exp(s_y + a) - r (s_{x0} + a) + r (log r - 1)
//  - SeddUniform, a = 1 / (e^sigma - 1), b = rho = e / (e + N), x = current token whose score is 0:
//      M = sum_{y != x} exp(s_y) / N,  m = sum_{y != x} s_y / N,  s'_{x0} = (x0 == x ? 0 : s_{x0})
//      x == x0: l = M - rho m + (N-1)/N rho (log rho - 1)
//      x != x0: l = M - (a s_{x0} + m) + ((-log rho - 1) / rho - (N - 2)) / N
//  - CrossEntropy: l = logsumexp_{y<N} s_y - s_{x0}   (masked diffusion, autoregressive)
#pragma once
#include <torch/torch.h>

namespace sedd {

enum class RowLoss { SeddAbsorb, SeddUniform, CrossEntropy };

struct OutputLossRows {
  torch::Tensor target;   // [R] int64: x0, the token each row is scored against
  torch::Tensor current;  // [R] int64: the row's current token (SeddUniform only)
  torch::Tensor a, b;     // [R] per-row constants (see above), any float dtype
};

// features [R, D], weight [V, D], bias [V] (may be undefined) -> loss per row [R] (float32, or
// float64 for float64 features). `columns`: token columns N <= V used by the loss (the absorbing
// mask column is not). `low_precision`: matmul operands in bf16 on CUDA (fp32 elsewhere), products
// accumulated into float32 logits (the bias added in float32: never logits rounded to bf16 before
// exp/log), the loss math in fp32. Differentiable in features, weight and bias.
torch::Tensor fused_output_loss(RowLoss kind, const torch::Tensor& features, const torch::Tensor& weight,
                                const torch::Tensor& bias, const OutputLossRows& rows, int64_t columns,
                                bool low_precision, int64_t chunk_elems = int64_t{1} << 26);

// The same loss from full logits [R, >= N] (the unfused reference; also used where the logits
// exist anyway).
torch::Tensor row_loss_from_logits(RowLoss kind, const torch::Tensor& logits, const OutputLossRows& rows,
                                   int64_t columns);

}  // namespace sedd
