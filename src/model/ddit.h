// DDiT: the score network of SEDD (a diffusion transformer with adaLN conditioning on sigma).
// Parameter names equal the PyTorch state-dict names of the reference implementation
// (vocab_embed.embedding, sigma_map.mlp.{0,2}, blocks.N.{norm1,attn_qkv,attn_out,norm2,mlp.{0,2},
// adaLN_modulation}, output_layer.{norm_final,linear,adaLN_modulation}, rotary_emb.inv_freq), so
// weights move to and from PyTorch by name. The module knows nothing of ranks or devices' count.
#pragma once
#include <torch/torch.h>

#include "model/block_attention.h"
#include "model/config.h"
#include "model/dropout.h"

namespace sedd {

// LayerNorm without bias, computed in float32 whatever the autocast dtype.
struct BiasFreeLayerNormImpl : torch::nn::Module {
  explicit BiasFreeLayerNormImpl(int64_t dim);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight;
  int64_t dim;
};
TORCH_MODULE(BiasFreeLayerNorm);

// Sinusoidal embedding of sigma followed by an MLP (names: mlp.0, mlp.2).
struct SigmaEmbedderImpl : torch::nn::Module {
  explicit SigmaEmbedderImpl(int64_t cond_dim, int64_t frequencies = 256);
  torch::Tensor forward(const torch::Tensor& sigma);  // [B] -> [B, cond_dim]
  torch::nn::Sequential mlp{nullptr};
  int64_t frequencies;
};
TORCH_MODULE(SigmaEmbedder);

// Rotary position embedding; inv_freq is a buffer (saved with the weights, as in PyTorch).
struct RotaryImpl : torch::nn::Module {
  explicit RotaryImpl(int64_t head_dim, double base = 10000.0);
  // q or k: [B, L, H, Dh] at positions offset, ..., offset + L - 1.
  torch::Tensor apply(const torch::Tensor& x, int64_t offset = 0) const;
  torch::Tensor inv_freq;
};
TORCH_MODULE(Rotary);

struct DDiTBlockImpl : torch::nn::Module {
  // `index`: the block's place in the stack; its dropout sites are 2 index (attention) and
  // 2 index + 1 (MLP).
  DDiTBlockImpl(int64_t index, int64_t dim, int64_t n_heads, int64_t cond_dim, double dropout, bool causal = false);
  // `fused`: the elementwise chains run as the fused ops of model/fused_ops.h (same math, CUDA
  // kernels); the caller decides (DDiTImpl::fused_kernels).
  torch::Tensor forward(const torch::Tensor& x, const Rotary& rotary, const torch::Tensor& c,
                        const DropoutKey* dropout_key = nullptr, bool fused = false);
  // Block diffusion's sampling (no dropout, no fused ops): x [B, T, D], one block at positions
  // offset.. after the clean context whose keys and values (after rotary) are k_ctx, v_ctx
  // [B, H, offset, Dh] (undefined when offset = 0); see context_attention. With k_out, v_out the
  // block's keys and values are handed back (to extend the context).
  torch::Tensor forward_on_context(const torch::Tensor& x, const Rotary& rotary, const torch::Tensor& c,
                                   int64_t offset, const torch::Tensor& k_ctx, const torch::Tensor& v_ctx,
                                   torch::Tensor* k_out, torch::Tensor* v_out);
  // The attention's output projection, gated residuals and MLP; mod: the six adaLN chunks.
  torch::Tensor residual_tail(const torch::Tensor& x_in, const torch::Tensor& attn, const std::vector<torch::Tensor>& mod,
                              const DropoutKey* dropout_key, bool fused);
  int64_t index, n_heads;
  double dropout;
  bool causal;  // attention to earlier positions only (the autoregressive baseline)
  // Block diffusion (> 0): x is x_t followed by x_0 with blocks of this many tokens (block_attention.h).
  int64_t block_size = 0;
  BlockAttention block_attention = BlockAttention::Split;
  BiasFreeLayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Linear attn_qkv{nullptr}, attn_out{nullptr}, adaLN_modulation{nullptr};
  torch::nn::Sequential mlp{nullptr};
};
TORCH_MODULE(DDiTBlock);

struct FinalLayerImpl : torch::nn::Module {
  FinalLayerImpl(int64_t hidden, int64_t out, int64_t cond_dim);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& c, bool fused = false);
  // The input of `linear`: adaLN-modulated norm_final(x). x [..., D]; shift/scale broadcast.
  // `fused` (x [B, L, D] with shift/scale [B, 1, D], or x [R, D] with shift/scale [R, D]): one
  // fused kernel, its result already in the autocast dtype.
  torch::Tensor features(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale,
                         bool fused = false);
  BiasFreeLayerNorm norm_final{nullptr};
  torch::nn::Linear linear{nullptr}, adaLN_modulation{nullptr};
};
TORCH_MODULE(FinalLayer);

struct TokenEmbeddingImpl : torch::nn::Module {
  TokenEmbeddingImpl(int64_t vocab_dim, int64_t dim, double normal_std = 0);  // normal_std > 0: N(0, std^2)
  torch::Tensor forward(const torch::Tensor& idx) { return embedding.index({idx}); }
  torch::Tensor embedding;  // [vocab_dim, dim]
};
TORCH_MODULE(TokenEmbedding);

// The transformer body's output: what the output layer needs for any subset of positions.
struct DDiTHidden {
  torch::Tensor h;  // [B, L, D] residual stream after the last block (float32)
  torch::Tensor c;  // [B, cond_dim] conditioning, silu(sigma_map(sigma))
};

// Block diffusion's sampling cache: per layer the keys and values [B, H, C, Dh] (after rotary, in the
// model's compute dtype) of the C clean context tokens.
struct BlockContext {
  std::vector<torch::Tensor> k, v;
  int64_t length() const { return k.empty() || !k[0].defined() ? 0 : k[0].size(2); }
};

struct DDiTImpl : torch::nn::Module {
  explicit DDiTImpl(ModelConfig cfg);
  // indices [B, L] int64, sigma [B] -> log-score [B, L, vocab_dim] (float32; the entry of the
  // current token is 0). bf16 autocast for the blocks when the module lives on CUDA and
  // `bf16` is set. `dropout_key` keys the dropout masks per sequence (training with dropout).
  torch::Tensor forward(const torch::Tensor& indices, const torch::Tensor& sigma,
                        const DropoutKey* dropout_key = nullptr);
  // forward() = finish(forward_raw()) = finish(output rows of forward_hidden()). The raw output
  // of a model without time conditioning does not depend on sigma, which lets a sampler reuse it
  // exactly while the input is unchanged.
  DDiTHidden forward_hidden(const torch::Tensor& indices, const torch::Tensor& sigma,
                            const DropoutKey* dropout_key = nullptr);
  // The output layer's input for chosen positions: rows [R] index the flattened [B * L]
  // positions; returns [R, D] (float32). Losses and samplers that need the vocabulary-wide
  // output of only some positions (the masked ones) project just these rows.
  torch::Tensor output_features(const DDiTHidden& hidden, const torch::Tensor& rows);
  // Raw output (before scale_by_sigma and the current-token zero) of chosen rows' features:
  // [R, D] -> [R, vocab_dim] float32.
  torch::Tensor output_logits(const torch::Tensor& features);
  torch::Tensor forward_raw(const torch::Tensor& indices, const torch::Tensor& sigma);
  torch::Tensor finish(const torch::Tensor& raw, const torch::Tensor& indices, const torch::Tensor& sigma) const;
  // The scale_by_sigma shift -log(e^sigma - 1) - log(vocab_dim - 1) per sigma [...] (0 when off).
  torch::Tensor score_shift(const torch::Tensor& sigma) const;
  // Block diffusion's sampler: runs one block of tokens [B, T] placed after the context's clean
  // tokens, attending to the context and to the whole block. With `extend` the block is clean and
  // its keys and values join the context (a context built block by block is the x_0 stream).
  DDiTHidden forward_on_context(const torch::Tensor& tokens, const torch::Tensor& sigma, BlockContext& context,
                                bool extend);
  // Which exact form computes block diffusion's training attention (block_attention.h).
  void set_block_attention(BlockAttention form);
  int64_t parameter_count() const;
  // Model FLOPs of one training token (forward + backward = 3 x forward) for MFU, by the usual
  // convention (PaLM, appendix B): 2 per multiply-add of every matrix product the network needs,
  // the attention over the full window and the output layer over the full vocabulary at every
  // position, whatever the implementation skips (the masked-rows loss projects masked rows only);
  // elementwise ops, norms, softmax and recomputation are not counted. Block diffusion: see ddit.cpp. Per token: 24 D^2 per block
  // (qkv, attention output, MLP) + 4 L D per block (scores, values) + 2 D V (output layer); per
  // sequence, divided by L: the sigma embedding 2 (256 C + C^2) and the adaLN modulations
  // 2 C (6 blocks + 2) D.
  double flops_per_token(int64_t seq_len) const;

  ModelConfig cfg;
  bool bf16 = false;
  // Fused CUDA kernels for the blocks' and the output layer's elementwise chains (LayerNorm +
  // modulation, rotary, bias + dropout + gated residual). Used only when the activations are on
  // CUDA, the kernels are built and their self-check passed on the device (fused_ops_active());
  // CPU runs always take the plain LibTorch ops.
  bool fused_kernels = true;
  // Activation checkpointing, a training setting (not saved with the weights): with K > 0 the
  // blocks whose index is a multiple of K keep only their inputs (x, c) while grad mode is on and
  // run again in backward; K = 1 checkpoints every block. Keyed dropout redraws the same masks, so
  // gradients equal those of the plain path bit for bit.
  int64_t checkpoint_every = 0;
  // Whether forward passes on `device` take the fused kernels.
  bool uses_fused_kernels(const torch::Device& device) const;
  TokenEmbedding vocab_embed{nullptr};
  SigmaEmbedder sigma_map{nullptr};
  Rotary rotary_emb{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  FinalLayer output_layer{nullptr};
};
TORCH_MODULE(DDiT);

}  // namespace sedd
