// Block diffusion's attention; see block_attention.h.
#include "model/block_attention.h"

#include <map>
#include <mutex>
#include <tuple>

namespace sedd {

namespace {

// Block index of each of n positions.
torch::Tensor blocks_of(int64_t n, int64_t block) { return torch::div(torch::arange(n), block, "floor"); }

enum class Part { Full, X0Stream, XtStream };

// Additive masks (0 where attended, -inf elsewhere) in the queries' dtype and device, built once per
// shape: the memory-efficient CUDA kernel and the CPU fused kernel take them as they are.
torch::Tensor additive(Part part, int64_t n, int64_t block, const torch::Tensor& like) {
  using Key = std::tuple<int, int64_t, int64_t, int, int, int>;
  static std::mutex mutex;
  static std::map<Key, torch::Tensor> cache;
  const Key key{static_cast<int>(part), n, block, static_cast<int>(like.scalar_type()),
                static_cast<int>(like.device().type()), like.device().index()};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  torch::Tensor allowed;
  auto bq = blocks_of(n, block).unsqueeze(1), bk = blocks_of(n, block).unsqueeze(0);
  switch (part) {
    case Part::Full: allowed = block_diffusion_mask(n, block); break;
    case Part::X0Stream: allowed = bk <= bq; break;
    case Part::XtStream: allowed = torch::cat({bk == bq, bk < bq}, 1); break;
  }
  auto mask = torch::zeros(allowed.sizes(), torch::TensorOptions().dtype(like.scalar_type()))
                  .masked_fill_(allowed.logical_not(), -std::numeric_limits<double>::infinity())
                  .to(like.device());
  if (cache.size() > 64) cache.clear();  // bound the memory of many shapes
  cache.emplace(key, mask);
  return mask;
}

torch::Tensor sdpa(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& mask,
                   bool causal = false) {
  return at::scaled_dot_product_attention(q, k, v, mask.defined() ? std::optional<at::Tensor>(mask) : std::nullopt,
                                          0.0, causal);
}

}  // namespace

torch::Tensor block_diffusion_xt_rows(const torch::Tensor& rows, int64_t n) {
  return rows + torch::div(rows, n, "floor") * n;
}

torch::Tensor block_diffusion_mask(int64_t n, int64_t block) {
  auto pos = torch::arange(2 * n);
  auto x0 = pos >= n;
  auto blk = torch::div(torch::where(x0, pos - n, pos), block, "floor");
  auto q0 = x0.unsqueeze(1), k0 = x0.unsqueeze(0), bq = blk.unsqueeze(1), bk = blk.unsqueeze(0);
  auto diagonal = (bq == bk) & (q0 == k0);
  auto offset_causal = (bq > bk) & k0 & q0.logical_not();
  auto causal = (bq >= bk) & k0 & q0;
  return diagonal | offset_causal | causal;
}

torch::Tensor block_diffusion_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                        int64_t block, BlockAttention form) {
  const int64_t n = q.size(2) / 2;
  if (form == BlockAttention::Mask) return sdpa(q, k, v, additive(Part::Full, n, block, q));
  auto qt = q.narrow(2, 0, n), q0 = q.narrow(2, n, n);
  auto kt = k.narrow(2, 0, n), k0 = k.narrow(2, n, n);
  auto vt = v.narrow(2, 0, n), v0 = v.narrow(2, n, n);
  torch::Tensor o0, ot;
  if (block == n) {  // one block: both streams unmasked, and x_t never sees x_0
    o0 = sdpa(q0, k0, v0, {});
    ot = sdpa(qt, kt, vt, {});
  } else {
    o0 = block == 1 ? sdpa(q0, k0, v0, {}, /*causal=*/true) : sdpa(q0, k0, v0, additive(Part::X0Stream, n, block, q));
    ot = sdpa(qt, torch::cat({kt, k0}, 2), torch::cat({vt, v0}, 2), additive(Part::XtStream, n, block, q));
  }
  return torch::cat({ot, o0}, 2);
}

torch::Tensor context_attention(const torch::Tensor& q, const torch::Tensor& k_ctx, const torch::Tensor& v_ctx,
                                const torch::Tensor& k, const torch::Tensor& v) {
  if (!k_ctx.defined()) return sdpa(q, k, v, {});
  return sdpa(q, torch::cat({k_ctx, k}, 2), torch::cat({v_ctx, v}, 2), {});
}

}  // namespace sedd
