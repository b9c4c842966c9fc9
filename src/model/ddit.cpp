// DDiT score network; see ddit.h. Math follows the SEDD reference: adaLN-modulated blocks,
// modulate(x) = x (1 + scale) + shift, residual + gate * dropout(branch).
#include "model/ddit.h"

#include <ATen/autocast_mode.h>

#include <cmath>
#include <optional>

#include "io/error.h"
#include "model/fused_ops.h"

namespace sedd {

namespace F = torch::nn::functional;

namespace {

torch::Tensor modulate(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale) {
  return x * (1 + scale) + shift;
}

// Reduced-precision tensors go up to float32; float32/float64 stay (float64 serves gradient checks).
torch::Tensor at_least_float(const torch::Tensor& x) {
  return (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf) ? x.to(torch::kFloat) : x;
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  auto halves = x.chunk(2, -1);
  return torch::cat({-halves[1], halves[0]}, -1);
}

// Sets one device type's autocast state (on or off, and its dtype) for the guard's lifetime and
// puts the previous state back after, so a caller's autocast region and dtype survive us.
struct AutocastState {
  AutocastState(at::DeviceType device, bool enabled, at::ScalarType dtype)
      : device_(device),
        enabled_(enabled),
        prev_(at::autocast::is_autocast_enabled(device)),
        prev_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_enabled(device_, enabled_);
    at::autocast::set_autocast_dtype(device_, dtype);
    if (enabled_) at::autocast::increment_nesting();
  }
  ~AutocastState() {
    if (enabled_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, prev_);
    at::autocast::set_autocast_dtype(device_, prev_dtype_);
  }
  AutocastState(const AutocastState&) = delete;
  AutocastState& operator=(const AutocastState&) = delete;
  at::DeviceType device_;
  bool enabled_, prev_;
  at::ScalarType prev_dtype_;
};

// bf16 autocast on CUDA for the transformer body; LayerNorm and the log-score stay in fp32.
struct CudaAutocast {
  explicit CudaAutocast(bool on) {
    if (on) state_.emplace(at::kCUDA, true, at::kBFloat16);
  }
  std::optional<AutocastState> state_;
};

// A checkpointed block: forward runs without a graph and saves only the block's inputs; backward
// runs the block again with grad on detached inputs, under the autocast state of the forward (on or
// off, whatever the state around the backward call), and differentiates it. The block's parameters
// are inputs of the node, so their gradients reach their accumulators (and the optimizer's hooks on
// them) through ordinary autograd accumulation.
// Dropout is keyed, so the recomputation draws the same masks: no RNG state is saved.
struct CheckpointedBlock : torch::autograd::Function<CheckpointedBlock> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, DDiTBlockImpl* block, const Rotary* rotary,
                               const torch::Tensor& x, const torch::Tensor& c, const DropoutKey* key, bool fused,
                               torch::TensorList params) {
    // The block and the rotary table belong to the model, which outlives its autograd graphs.
    ctx->saved_data["block"] = reinterpret_cast<int64_t>(block);
    ctx->saved_data["rotary"] = reinterpret_cast<int64_t>(rotary);
    ctx->saved_data["fused"] = fused;
    // The autocast state of the inputs' device type: the recomputation sets it, on or off.
    const auto device = x.device().type();
    ctx->saved_data["autocast_device"] = static_cast<int64_t>(device);
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(device);
    ctx->saved_data["autocast_dtype"] = static_cast<int64_t>(at::autocast::get_autocast_dtype(device));
    ctx->saved_data["has_key"] = key != nullptr;
    if (key) {
      ctx->saved_data["seed"] = static_cast<int64_t>(key->seed);
      ctx->saved_data["step"] = static_cast<int64_t>(key->step);
      ctx->saved_data["rows"] = key->rows;
    }
    ctx->save_for_backward({x, c});
    return block->forward(x, *rotary, c, key, fused);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto* block = reinterpret_cast<DDiTBlockImpl*>(ctx->saved_data["block"].toInt());
    const auto* rotary = reinterpret_cast<const Rotary*>(ctx->saved_data["rotary"].toInt());
    auto saved = ctx->get_saved_variables();
    DropoutKey key;
    const bool has_key = ctx->saved_data["has_key"].toBool();
    if (has_key) {
      key.seed = static_cast<uint64_t>(ctx->saved_data["seed"].toInt());
      key.step = static_cast<uint64_t>(ctx->saved_data["step"].toInt());
      key.rows = ctx->saved_data["rows"].toTensor();
    }
    std::vector<torch::Tensor> wrt;
    auto x = saved[0].detach().requires_grad_(saved[0].requires_grad());
    auto c = saved[1].detach().requires_grad_(saved[1].requires_grad());
    if (x.requires_grad()) wrt.push_back(x);
    if (c.requires_grad()) wrt.push_back(c);
    auto params = block->parameters();
    for (const auto& p : params) wrt.push_back(p);
    torch::Tensor y;
    {
      torch::AutoGradMode grad_on(true);
      // The forward's state, also when it had autocast off and backward runs inside an autocast
      // region; the caller's state is back for the differentiation, as on the plain path.
      AutocastState autocast(static_cast<at::DeviceType>(ctx->saved_data["autocast_device"].toInt()),
                             ctx->saved_data["autocast"].toBool(),
                             static_cast<at::ScalarType>(ctx->saved_data["autocast_dtype"].toInt()));
      y = block->forward(x, *rotary, c, has_key ? &key : nullptr, ctx->saved_data["fused"].toBool());
    }
    auto grads = torch::autograd::grad({y}, wrt, {grad_out[0]}, /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
    // One gradient per forward argument: block, rotary, x, c, key, fused, then each parameter.
    torch::autograd::variable_list out(6 + params.size());
    size_t g = 0;
    if (x.requires_grad()) out[2] = grads[g++];
    if (c.requires_grad()) out[3] = grads[g++];
    for (size_t i = 0; i < params.size(); ++i) out[6 + i] = grads[g++];
    return out;
  }
};

}  // namespace

BiasFreeLayerNormImpl::BiasFreeLayerNormImpl(int64_t d) : dim(d) {
  weight = register_parameter("weight", torch::ones({d}));
}

torch::Tensor BiasFreeLayerNormImpl::forward(const torch::Tensor& x) {
  auto y = F::layer_norm(at_least_float(x), F::LayerNormFuncOptions({dim}));
  return y * weight;
}

SigmaEmbedderImpl::SigmaEmbedderImpl(int64_t cond_dim, int64_t freqs) : frequencies(freqs) {
  mlp = register_module("mlp", torch::nn::Sequential(torch::nn::Linear(freqs, cond_dim), torch::nn::SiLU(),
                                                     torch::nn::Linear(cond_dim, cond_dim)));
}

torch::Tensor SigmaEmbedderImpl::forward(const torch::Tensor& sigma) {
  const int64_t half = frequencies / 2;
  auto dtype = mlp->parameters()[0].scalar_type();
  auto opts = torch::TensorOptions().dtype(dtype).device(sigma.device());
  auto freqs = torch::exp(-std::log(10000.0) * torch::arange(half, opts) / static_cast<double>(half));
  auto args = sigma.to(dtype).unsqueeze(1) * freqs.unsqueeze(0);
  auto emb = torch::cat({torch::cos(args), torch::sin(args)}, -1);
  if (frequencies % 2) emb = torch::cat({emb, torch::zeros_like(emb.narrow(1, 0, 1))}, -1);
  return mlp->forward(emb);
}

RotaryImpl::RotaryImpl(int64_t head_dim, double base) {
  auto exps = torch::arange(0, head_dim, 2, torch::kFloat) / static_cast<double>(head_dim);
  inv_freq = register_buffer("inv_freq", 1.0 / torch::pow(base, exps));
}

torch::Tensor RotaryImpl::apply(const torch::Tensor& x, int64_t offset) const {
  const int64_t L = x.size(1);
  auto t = torch::arange(offset, offset + L, inv_freq.options());
  auto freqs = torch::outer(t, inv_freq);                         // [L, Dh/2]
  auto emb = torch::cat({freqs, freqs}, -1).view({1, L, 1, -1});  // [1, L, 1, Dh]
  auto cos = emb.cos().to(x.scalar_type()), sin = emb.sin().to(x.scalar_type());
  return x * cos + rotate_half(x) * sin;
}

DDiTBlockImpl::DDiTBlockImpl(int64_t idx, int64_t dim, int64_t heads, int64_t cond_dim, double p, bool is_causal)
    : index(idx), n_heads(heads), dropout(p), causal(is_causal) {
  norm1 = register_module("norm1", BiasFreeLayerNorm(dim));
  attn_qkv = register_module("attn_qkv", torch::nn::Linear(torch::nn::LinearOptions(dim, 3 * dim).bias(false)));
  attn_out = register_module("attn_out", torch::nn::Linear(torch::nn::LinearOptions(dim, dim).bias(false)));
  norm2 = register_module("norm2", BiasFreeLayerNorm(dim));
  mlp = register_module("mlp", torch::nn::Sequential(torch::nn::Linear(dim, 4 * dim),
                                                     torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh")),
                                                     torch::nn::Linear(4 * dim, dim)));
  adaLN_modulation = register_module("adaLN_modulation", torch::nn::Linear(cond_dim, 6 * dim));
  torch::NoGradGuard no_grad;
  adaLN_modulation->weight.zero_();
  adaLN_modulation->bias.zero_();
}

torch::Tensor DDiTBlockImpl::forward(const torch::Tensor& x_in, const Rotary& rotary, const torch::Tensor& c,
                                     const DropoutKey* key, bool fused) {
  const int64_t B = x_in.size(0), L = x_in.size(1), D = x_in.size(2), Dh = D / n_heads;
  auto mod = adaLN_modulation->forward(c).unsqueeze(1).chunk(6, 2);  // 6 x [B, 1, D]
  torch::Tensor x = fused ? layer_norm_modulate(x_in, norm1->weight, mod[0], mod[1])
                          : modulate(norm1->forward(x_in), mod[0], mod[1]);
  auto qkv = attn_qkv->forward(x).view({B, L, 3, n_heads, Dh});  // [B, L, 3, H, Dh]
  auto rope = [&](const torch::Tensor& t) { return fused ? sedd::rotary(t, rotary->inv_freq) : rotary->apply(t); };
  torch::Tensor attn;
  if (block_size > 0) {
    // x_t then x_0: the rotary positions restart for each half (x_t[i] and x_0[i] both sit at i).
    const int64_t n = L / 2;
    auto rope_halves = [&](const torch::Tensor& t) { return rope(t.reshape({2 * B, n, n_heads, Dh})).view({B, L, n_heads, Dh}); };
    auto q = rope_halves(qkv.select(2, 0)), k = rope_halves(qkv.select(2, 1)), v = qkv.select(2, 2);
    attn = block_diffusion_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_size, block_attention);
  } else {
    auto q = rope(qkv.select(2, 0)), k = rope(qkv.select(2, 1)), v = qkv.select(2, 2);
    // [B, H, L, Dh]; attention over the whole sequence (diffusion) or the earlier positions (autoregressive).
    attn = at::scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), {}, 0.0, causal);
  }
  return residual_tail(x_in, attn.transpose(1, 2).reshape({B, L, D}), mod, key, fused);
}

torch::Tensor DDiTBlockImpl::forward_on_context(const torch::Tensor& x_in, const Rotary& rotary, const torch::Tensor& c,
                                                int64_t offset, const torch::Tensor& k_ctx, const torch::Tensor& v_ctx,
                                                torch::Tensor* k_out, torch::Tensor* v_out) {
  const int64_t B = x_in.size(0), T = x_in.size(1), D = x_in.size(2), Dh = D / n_heads;
  auto mod = adaLN_modulation->forward(c).unsqueeze(1).chunk(6, 2);
  auto qkv = attn_qkv->forward(modulate(norm1->forward(x_in), mod[0], mod[1])).view({B, T, 3, n_heads, Dh});
  auto q = rotary->apply(qkv.select(2, 0), offset).transpose(1, 2);
  auto k = rotary->apply(qkv.select(2, 1), offset).transpose(1, 2);
  auto v = qkv.select(2, 2).transpose(1, 2);
  auto attn = context_attention(q, k_ctx, v_ctx, k, v);
  if (k_out) *k_out = k.contiguous();
  if (v_out) *v_out = v.contiguous();
  return residual_tail(x_in, attn.transpose(1, 2).reshape({B, T, D}), mod, nullptr, false);
}

torch::Tensor DDiTBlockImpl::residual_tail(const torch::Tensor& x_in, const torch::Tensor& attn,
                                           const std::vector<torch::Tensor>& mod, const DropoutKey* key, bool fused) {
  auto &gate_msa = mod[2], &shift_mlp = mod[3], &scale_mlp = mod[4], &gate_mlp = mod[5];
  const bool training = is_training();
  if (!fused) {
    torch::Tensor h = x_in + gate_msa * keyed_dropout(attn_out->forward(attn), dropout, training, key, 2 * index);
    auto branch = mlp->forward(modulate(norm2->forward(h), shift_mlp, scale_mlp));
    return h + gate_mlp * keyed_dropout(branch, dropout, training, key, 2 * index + 1);
  }
  // Fused: the MLP's second Linear runs without its bias, which the gated residual adds.
  torch::Tensor h = gated_residual(x_in, attn_out->forward(attn), {}, gate_msa, dropout, training, key, 2 * index);
  auto* fc1 = mlp[0]->as<torch::nn::LinearImpl>();
  auto* act = mlp[1]->as<torch::nn::GELUImpl>();
  auto* fc2 = mlp[2]->as<torch::nn::LinearImpl>();
  auto hidden = act->forward(fc1->forward(layer_norm_modulate(h, norm2->weight, shift_mlp, scale_mlp)));
  return gated_residual(h, F::linear(hidden, fc2->weight), fc2->bias, gate_mlp, dropout, training, key, 2 * index + 1);
}

FinalLayerImpl::FinalLayerImpl(int64_t hidden, int64_t out, int64_t cond_dim) {
  norm_final = register_module("norm_final", BiasFreeLayerNorm(hidden));
  linear = register_module("linear", torch::nn::Linear(hidden, out));
  adaLN_modulation = register_module("adaLN_modulation", torch::nn::Linear(cond_dim, 2 * hidden));
  torch::NoGradGuard no_grad;
  for (auto* lin : {&linear, &adaLN_modulation}) {
    (*lin)->weight.zero_();
    (*lin)->bias.zero_();
  }
}

torch::Tensor FinalLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& c, bool fused) {
  auto mod = adaLN_modulation->forward(c).unsqueeze(1).chunk(2, 2);
  return linear->forward(features(x, mod[0], mod[1], fused));
}

torch::Tensor FinalLayerImpl::features(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale,
                                       bool fused) {
  if (!fused) return modulate(norm_final->forward(x), shift, scale);
  if (x.dim() == 3) return layer_norm_modulate(x, norm_final->weight, shift, scale);
  // Chosen rows [R, D] with their own modulation [R, D]: R batch rows of length 1.
  return layer_norm_modulate(x.unsqueeze(1), norm_final->weight, shift.unsqueeze(1), scale.unsqueeze(1)).squeeze(1);
}

TokenEmbeddingImpl::TokenEmbeddingImpl(int64_t vocab_dim, int64_t dim, double normal_std) {
  embedding = register_parameter("embedding", torch::empty({vocab_dim, dim}));
  if (normal_std > 0) {
    torch::NoGradGuard ng;
    embedding.normal_(0, normal_std);
  } else {
    torch::nn::init::kaiming_uniform_(embedding, std::sqrt(5.0));
  }
}

DDiTImpl::DDiTImpl(ModelConfig c) : cfg(std::move(c)) {
  cfg.validate();
  vocab_embed =
      register_module("vocab_embed", TokenEmbedding(cfg.vocab_dim(), cfg.hidden_size, cfg.network().embedding_std));
  sigma_map = register_module("sigma_map", SigmaEmbedder(cfg.cond_dim));
  rotary_emb = register_module("rotary_emb", Rotary(cfg.head_dim()));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < cfg.n_blocks; ++i)
    blocks->push_back(DDiTBlock(i, cfg.hidden_size, cfg.n_heads, cfg.cond_dim, cfg.dropout, cfg.causal()));
  set_block_attention(BlockAttention::Split);
  output_layer = register_module("output_layer", FinalLayer(cfg.hidden_size, cfg.vocab_dim(), cfg.cond_dim));
}

bool DDiTImpl::uses_fused_kernels(const torch::Device& device) const {
  return fused_kernels && device.is_cuda() && fused_ops_active(device);
}

torch::Tensor DDiTImpl::forward(const torch::Tensor& indices, const torch::Tensor& sigma, const DropoutKey* key) {
  DDiTHidden hid = forward_hidden(indices, sigma, key);
  torch::Tensor raw;
  {
    CudaAutocast autocast(bf16 && hid.h.is_cuda());
    raw = at_least_float(output_layer->forward(hid.h, hid.c, uses_fused_kernels(hid.h.device())));
  }
  return finish(raw, indices, sigma);
}

torch::Tensor DDiTImpl::forward_raw(const torch::Tensor& indices, const torch::Tensor& sigma) {
  DDiTHidden hid = forward_hidden(indices, sigma);
  CudaAutocast autocast(bf16 && hid.h.is_cuda());
  return at_least_float(output_layer->forward(hid.h, hid.c, uses_fused_kernels(hid.h.device())));
}

DDiTHidden DDiTImpl::forward_hidden(const torch::Tensor& indices, const torch::Tensor& sigma, const DropoutKey* key) {
  torch::Tensor x = vocab_embed->forward(indices);
  // Without time conditioning the network sees sigma = 0; the absorbing score's dependence on
  // sigma is then the analytic scale_by_sigma shift alone (exact caching while sampling).
  torch::Tensor sigma_in = cfg.time_conditioning ? sigma : torch::zeros_like(sigma);
  torch::Tensor c = F::silu(sigma_map->forward(sigma_in));
  const bool fused = uses_fused_kernels(x.device());
  CudaAutocast autocast(bf16 && x.is_cuda());
  const bool checkpointing = checkpoint_every > 0 && torch::GradMode::is_enabled();
  for (size_t i = 0; i < blocks->size(); ++i) {
    auto* block = blocks[i]->as<DDiTBlock>();
    if (checkpointing && static_cast<int64_t>(i) % checkpoint_every == 0) {
      const auto params = block->parameters();  // a TensorList: autograd inputs of the node
      x = CheckpointedBlock::apply(block, &rotary_emb, x, c, key, fused, torch::TensorList(params));
    } else {
      x = block->forward(x, rotary_emb, c, key, fused);
    }
  }
  return {at_least_float(x), c};
}

torch::Tensor DDiTImpl::output_features(const DDiTHidden& hid, const torch::Tensor& rows) {
  const int64_t L = hid.h.size(1), D = hid.h.size(2);
  CudaAutocast autocast(bf16 && hid.h.is_cuda());
  auto mod = output_layer->adaLN_modulation->forward(hid.c).chunk(2, 1);  // 2 x [B, D]
  auto batch = torch::div(rows, L, "floor");
  auto h = hid.h.reshape({-1, D}).index_select(0, rows);
  return at_least_float(output_layer->features(h, mod[0].index_select(0, batch), mod[1].index_select(0, batch),
                                               uses_fused_kernels(h.device())));
}

torch::Tensor DDiTImpl::output_logits(const torch::Tensor& features) {
  CudaAutocast autocast(bf16 && features.is_cuda());
  return at_least_float(output_layer->linear->forward(features));
}

torch::Tensor DDiTImpl::score_shift(const torch::Tensor& sigma) const {
  if (!cfg.scale_by_sigma) return torch::zeros_like(sigma);
  // -log(e^sigma - 1) - log(dim - 1): the log-score of a uniform guess over the mask.
  auto esigm1 = torch::where(sigma < 0.5, torch::expm1(sigma), sigma.exp() - 1);
  return -esigm1.log() - std::log(static_cast<double>(cfg.vocab_dim() - 1));
}

torch::Tensor DDiTImpl::finish(const torch::Tensor& raw, const torch::Tensor& indices, const torch::Tensor& sigma) const {
  torch::Tensor x = raw;
  if (cfg.scale_by_sigma) x = x + score_shift(sigma.to(x.scalar_type())).view({-1, 1, 1});
  return torch::scatter(x, -1, indices.unsqueeze(-1), torch::zeros_like(x.narrow(-1, 0, 1)));
}

void DDiTImpl::set_block_attention(BlockAttention form) {
  const int64_t block = cfg.network().block_size;
  for (size_t i = 0; i < blocks->size(); ++i) {
    auto* b = blocks[i]->as<DDiTBlock>();
    b->block_size = block;
    b->block_attention = form;
  }
}

DDiTHidden DDiTImpl::forward_on_context(const torch::Tensor& tokens, const torch::Tensor& sigma, BlockContext& context,
                                        bool extend) {
  SEDD_CHECK(cfg.network().block_size > 0, "forward_on_context: a {} model has no block-diffusion attention",
             cfg.objective);
  const int64_t offset = context.length();
  torch::Tensor x = vocab_embed->forward(tokens);
  torch::Tensor c = F::silu(sigma_map->forward(cfg.time_conditioning ? sigma : torch::zeros_like(sigma)));
  CudaAutocast autocast(bf16 && x.is_cuda());
  const size_t layers = blocks->size();
  if (extend && context.k.empty()) context.k.resize(layers), context.v.resize(layers);
  for (size_t i = 0; i < layers; ++i) {
    auto* block = blocks[i]->as<DDiTBlock>();
    torch::Tensor k_ctx = offset > 0 ? context.k[i] : torch::Tensor(), v_ctx = offset > 0 ? context.v[i] : torch::Tensor();
    torch::Tensor k_new, v_new;
    x = block->forward_on_context(x, rotary_emb, c, offset, k_ctx, v_ctx, extend ? &k_new : nullptr,
                                  extend ? &v_new : nullptr);
    if (extend) {
      context.k[i] = offset > 0 ? torch::cat({k_ctx, k_new}, 2) : k_new;
      context.v[i] = offset > 0 ? torch::cat({v_ctx, v_new}, 2) : v_new;
    }
  }
  return {at_least_float(x), c};
}

int64_t DDiTImpl::parameter_count() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

double DDiTImpl::flops_per_token(int64_t seq_len) const {
  const double D = static_cast<double>(cfg.hidden_size), L = static_cast<double>(seq_len),
               V = static_cast<double>(cfg.vocab_dim()), C = static_cast<double>(cfg.cond_dim),
               F = static_cast<double>(sigma_map->frequencies), blocks = static_cast<double>(cfg.n_blocks);
  // Block diffusion runs the blocks over x_t and x_0 (2L positions, a 2L window) for each trained
  // token; the output layer reads the L positions of x_t.
  const double halves = cfg.network().block_size > 0 ? 2 : 1;
  const double per_token = halves * blocks * (24 * D * D + 4 * halves * L * D) + 2 * D * V;
  // The conditioning is computed once per sequence, not per position.
  const double per_sequence = 2 * (F * C + C * C) + 2 * C * (6 * blocks + 2) * D;
  return 3 * (per_token + per_sequence / L);
}

}  // namespace sedd
