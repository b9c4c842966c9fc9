// Launchers of the fused DDiT-block CUDA kernels (fused_ops_kernels.cu). Plain C++ on raw device
// pointers, so the .cu file needs no torch headers; fused_ops.cpp checks shapes, dtypes, devices
// and contiguity and owns every allocation. Every tensor here is contiguous and row-major; x is
// [B, L, D] with row r = b * L + l. Arithmetic is float32 whatever the storage type.
#pragma once
#include <cstdint>

#include "diffusion/philox.h"

typedef struct CUstream_st* cudaStream_t;

namespace sedd::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1 };

// Widest D (elements per row) the row kernels take (vectorised: D % 4 == 0 and 16-byte aligned
// pointers); wider rows take the LibTorch path. The row launchers return false (launching nothing)
// for a row they cannot take.
int64_t fused_max_row_elems(bool vectorised);

// Blocks along L used by the backward kernels that reduce over L: the partial sums they write are
// [splits, B, D] float32; the caller sums them over splits (the second pass of the reduction).
int64_t fused_column_splits(int64_t B, int64_t L);

// Keyed dropout as seen by a kernel: element (l, d) of batch row b is kept when
// stream.uniform_float(rows[b], l * D + d) >= p, and then scaled by `scale` (= 1 / (1 - p)).
struct KeyedDropout {
  philox::Stream stream{};
  const int64_t* rows = nullptr;  // [B] global sequence indices; unused when !active
  float p = 0.f, scale = 1.f;
  bool active = false;
};

// y = layer_norm(x) * weight * (1 + scale[b]) + shift[b] (no bias, biased variance, eps), and the
// per-row mean and 1 / sqrt(var + eps) for the backward kernel. weight [D], shift/scale [B, D].
bool layer_norm_modulate_forward(const void* x, DType x_type, const float* weight, const float* shift,
                                 const float* scale, int64_t B, int64_t L, int64_t D, float eps, void* y,
                                 DType y_type, float* mean, float* rstd, cudaStream_t stream);

// g_x (x's type) from g (y's type), and the partial column sums over L of each split s:
// partial_g[s, b, d] = sum g, partial_gxhat[s, b, d] = sum g * xhat (xhat: the normalised x).
bool layer_norm_modulate_backward(const void* g, DType g_type, const void* x, DType x_type, const float* weight,
                                  const float* scale, const float* mean, const float* rstd, int64_t B, int64_t L,
                                  int64_t D, int64_t splits, void* g_x, float* partial_g, float* partial_gxhat,
                                  cudaStream_t stream);

// out = x + gate[b] * dropout(branch + bias) (out has x's type; bias [D] may be null; gate [B, D]).
void gated_residual_forward(const void* x, DType x_type, const void* branch, DType branch_type, const float* bias,
                            const float* gate, KeyedDropout dropout, int64_t B, int64_t L, int64_t D, void* out,
                            cudaStream_t stream);

// g_branch = g * gate[b] * keep * scale (branch's type) and the partial column sums over L of each
// split: partial_gbranch = sum g_branch (float32, before rounding), partial_ggate = sum g * dropout(branch + bias).
bool gated_residual_backward(const void* g, DType g_type, const void* branch, DType branch_type, const float* bias,
                             const float* gate, KeyedDropout dropout, int64_t B, int64_t L, int64_t D, int64_t splits,
                             void* g_branch, float* partial_gbranch, float* partial_ggate, cudaStream_t stream);

// Rotary embedding of x [B, L, H, Dh] (element strides stride_b, stride_l, stride_h; Dh contiguous)
// into out (contiguous [B, L, H, Dh], same type): the pair (j, j + Dh/2) of position l turns by
// angle l * inv_freq[j] (`inverse`: by minus that angle, which is the backward pass).
void rotary(const void* x, DType type, int64_t B, int64_t L, int64_t H, int64_t Dh, int64_t stride_b,
            int64_t stride_l, int64_t stride_h, const float* inv_freq, bool inverse, void* out, cudaStream_t stream);

// The error of the last launch on this thread (cudaGetLastError), or nullptr.
const char* fused_launch_error();

}  // namespace sedd::cuda
