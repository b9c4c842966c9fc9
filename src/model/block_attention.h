// Block diffusion's attention (Arriola et al. 2025, BD3-LM; docs/DESIGN.md, "Block diffusion"). In
// training the network reads x_t followed by x_0, 2n positions in blocks of b tokens, through the
// authors' mask (their models/dit.py, block_diff_mask):
//   x_t block i sees x_t block i (block-diagonal) and x_0 blocks j < i (offset block-causal);
//   x_0 block i sees x_0 blocks j <= i (block-causal); x_0 never sees x_t.
// Two exact forms compute it:
//   Mask:  one attention over the 2n positions with the precomputed additive mask (4 n^2 scores);
//   Split: x_0 stream = attention(Q0, K0, V0; block-causal), x_t stream = attention(Qt, [Kt; K0],
//          [Vt; V0]; [same block | earlier blocks]) (3 n^2 scores; b = 1 makes the first a causal
//          attention, b = n makes both unmasked, the forms flash attention accepts).
// Sampling runs one block at a time against the clean context's keys and values, which grow by one
// clean block at a time (context_attention): block by block is the block-causal x_0 stream.
#pragma once
#include <torch/torch.h>

namespace sedd {

enum class BlockAttention { Split, Mask };

// The network's output rows of x_t's flat positions `rows` (b n + l in [B, n]): b 2n + l in [B, 2n].
torch::Tensor block_diffusion_xt_rows(const torch::Tensor& rows, int64_t n);

// The authors' mask as booleans [2n, 2n] (true: attends).
torch::Tensor block_diffusion_mask(int64_t n, int64_t block);

// q, k, v [B, H, 2n, Dh] (x_t positions first) -> [B, H, 2n, Dh].
torch::Tensor block_diffusion_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        int64_t block, BlockAttention form);

// Queries q [B, H, T, Dh] of one block placed after C cached clean tokens attend to the cached keys
// and values (k_ctx, v_ctx [B, H, C, Dh], or undefined when C = 0) and to the whole block's own k, v
// [B, H, T, Dh]: the x_t row of the training mask, and, for a clean block, its x_0 row.
torch::Tensor context_attention(const torch::Tensor& q, const torch::Tensor& k_ctx, const torch::Tensor& v_ctx,
                                const torch::Tensor& k, const torch::Tensor& v);

}  // namespace sedd
