// CUDA kernels of the fused DDiT-block ops; see fused_ops_kernels.h and fused_ops.h.
//
// Layout shared by the kernels: a row is one position (b, l) of a [B, L, D] tensor. Threads
// handle VEC consecutive elements at once (VEC = 4 when D and the pointers allow: 16-byte float
// or 8-byte bf16 accesses), and a thread keeps its elements in registers between passes.
// Everything is computed in float32; storage is float32 or bf16. Reductions over D use warp
// shuffles and one shared-memory step; reductions over L (the gradients of per-batch-row
// vectors) keep per-thread column sums over a slice of L and write them to [splits, B, D]
// partials that the caller sums: two passes, no atomics, deterministic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <optional>

#include "model/fused_ops_kernels.h"

namespace sedd::cuda {

namespace {

// A row kernel's thread handles at most this many VEC-chunks of its row.
constexpr int kMaxChunks = 2;
// Row kernels launch up to this many threads per block (rows of fused_max_row_elems), so they are
// compiled with __launch_bounds__(kMaxThreads): at most 64 registers per thread. Without the bound
// the float32 backward kernels take ~70 and blocks above ~896 threads cannot launch.
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxGridX = 2147483647;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// N elements of T moved as one aligned access (LDG.128 for 4 floats, LDG.64 for 4 bf16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ void load(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(pk.v[k]);
}

template <int N, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int k = 0; k < N; ++k) pk.v[k] = from_float<T>(in[k]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

template <int N>
__device__ __forceinline__ void fill(float (&v)[N], float value) {
#pragma unroll
  for (int k = 0; k < N; ++k) v[k] = value;
}

// Sums each of v[0..N) over the block and hands every thread the totals. blockDim.x is a
// multiple of 32; every thread of the block must call it (it synchronises).
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N]) {
  __shared__ float partial[N][kMaxThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k)
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += partial[k][w];  // same order in every thread
    v[k] = s;
  }
  __syncthreads();  // `partial` is reused by the next call
}

// The keep-and-scale factors of VEC elements starting at column `col` of a dropout row: scale
// where the keyed uniform is >= p, else 0; 1 without dropout. With VEC = 4 the columns are one
// Philox block (col is a multiple of 4), so one generator call serves four elements.
template <int VEC>
__device__ __forceinline__ void keep_scale(const KeyedDropout& dp, uint64_t key_row, uint64_t col, float (&ks)[VEC]) {
  if (!dp.active) {
    fill(ks, 1.f);
    return;
  }
  if constexpr (VEC == 4) {
    const philox::Words w = dp.stream.block(key_row, col >> 2);
#pragma unroll
    for (int k = 0; k < 4; ++k) ks[k] = philox::to_float(w.w[k]) >= dp.p ? dp.scale : 0.f;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) ks[k] = dp.stream.uniform_float(key_row, col + k) >= dp.p ? dp.scale : 0.f;
  }
}

// ---- layer_norm_modulate ----------------------------------------------------------------------

// One block per row: the row stays in registers for the mean, the variance (two passes over the
// registers, so no catastrophic cancellation) and the output.
template <typename Tx, typename Ty, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_modulate_forward_kernel(const Tx* __restrict__ x,
        const float* __restrict__ weight, const float* __restrict__ shift, const float* __restrict__ scale, int64_t L,
        int D, float eps, Ty* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out) {
  const int64_t row = blockIdx.x, b = row / L;
  const int nvec = D / VEC;
  const Tx* xr = x + row * D;
  float v[kMaxChunks][VEC];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i < nvec) load<VEC>(xr + i * VEC, v[c]);
    else fill(v[c], 0.f);
  }
  float sum[1] = {0.f};
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c)
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[0] += v[c][k];
  block_sum(sum);
  const float mu = sum[0] / static_cast<float>(D);
  float sq[1] = {0.f};
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    if (threadIdx.x + c * blockDim.x >= nvec) continue;  // padding zeros are not (0 - mu)^2
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float dev = v[c][k] - mu;
      sq[0] += dev * dev;
    }
  }
  block_sum(sq);
  const float rs = rsqrtf(sq[0] / static_cast<float>(D) + eps);
  if (threadIdx.x == 0) {
    mean_out[row] = mu;
    rstd_out[row] = rs;
  }
  const float* sh = shift + b * D;
  const float* sc = scale + b * D;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i >= nvec) continue;
    float w[VEC], a[VEC], z[VEC], o[VEC];
    load<VEC>(weight + i * VEC, w);
    load<VEC>(sc + i * VEC, a);
    load<VEC>(sh + i * VEC, z);
#pragma unroll
    for (int k = 0; k < VEC; ++k) o[k] = ((v[c][k] - mu) * rs * w[k]) * (1.f + a[k]) + z[k];
    store<VEC>(y + row * D + i * VEC, o);
  }
}

// Block (b, s) walks the rows l of split s of batch row b: per row the two sums over D of the
// input gradient (block reductions), and per thread the running column sums of g and g * xhat
// for the gradients of shift, scale and weight. a = weight * (1 + scale[b]) is loaded once.
template <typename Tg, typename Tx, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layer_norm_modulate_backward_kernel(const Tg* __restrict__ g,
        const Tx* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ scale,
        const float* __restrict__ mean, const float* __restrict__ rstd, int64_t L, int D, int64_t rows_per_split,
        Tx* __restrict__ g_x, float* __restrict__ partial_g, float* __restrict__ partial_gxhat) {
  const int64_t b = blockIdx.x, s = blockIdx.y, B = gridDim.x;
  const int nvec = D / VEC;
  const int64_t l_begin = s * rows_per_split, l_end = l_begin + rows_per_split < L ? l_begin + rows_per_split : L;
  float a[kMaxChunks][VEC], acc_g[kMaxChunks][VEC], acc_gx[kMaxChunks][VEC];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    fill(acc_g[c], 0.f);
    fill(acc_gx[c], 0.f);
    fill(a[c], 0.f);
    if (i >= nvec) continue;
    float w[VEC], sc[VEC];
    load<VEC>(weight + i * VEC, w);
    load<VEC>(scale + b * D + i * VEC, sc);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[c][k] = w[k] * (1.f + sc[k]);
  }
  for (int64_t l = l_begin; l < l_end; ++l) {
    const int64_t row = b * L + l;
    const float mu = mean[row], rs = rstd[row];
    float xh[kMaxChunks][VEC], dxh[kMaxChunks][VEC];
    float sums[2] = {0.f, 0.f};
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      fill(xh[c], 0.f);
      fill(dxh[c], 0.f);
      if (i >= nvec) continue;
      float xv[VEC], gv[VEC];
      load<VEC>(x + row * D + i * VEC, xv);
      load<VEC>(g + row * D + i * VEC, gv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        xh[c][k] = (xv[k] - mu) * rs;
        dxh[c][k] = gv[k] * a[c][k];
        sums[0] += dxh[c][k];
        sums[1] += dxh[c][k] * xh[c][k];
        acc_g[c][k] += gv[k];
        acc_gx[c][k] += gv[k] * xh[c][k];
      }
    }
    block_sum(sums);
    const float m1 = sums[0] / static_cast<float>(D), m2 = sums[1] / static_cast<float>(D);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      if (i >= nvec) continue;
      float o[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = rs * (dxh[c][k] - m1 - xh[c][k] * m2);
      store<VEC>(g_x + row * D + i * VEC, o);
    }
  }
  float* pg = partial_g + (s * B + b) * D;
  float* pgx = partial_gxhat + (s * B + b) * D;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i >= nvec) continue;
    store<VEC>(pg + i * VEC, acc_g[c]);
    store<VEC>(pgx + i * VEC, acc_gx[c]);
  }
}

// ---- gated_residual -------------------------------------------------------------------------

// Elementwise: x + gate * (keep * scale) * (branch + bias). The products and sums are rounded
// one at a time (__fmul_rn/__fadd_rn: no FMA contraction), in the order of the LibTorch
// composition, so float32 results equal it bit for bit.
template <typename Tx, typename Tb, int VEC>
__global__ void gated_residual_forward_kernel(const Tx* __restrict__ x, const Tb* __restrict__ branch,
                                              const float* __restrict__ bias, const float* __restrict__ gate,
                                              KeyedDropout dp, int64_t rows, int64_t L, int D, Tx* __restrict__ out) {
  const int nvec = D / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / L, l = row - b * L;
    const uint64_t key_row = dp.active ? static_cast<uint64_t>(dp.rows[b]) : 0;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const int d = i * VEC;
      const int64_t e = row * D + d;
      float xv[VEC], bv[VEC], gv[VEC], bias_v[VEC], ks[VEC], o[VEC];
      load<VEC>(x + e, xv);
      load<VEC>(branch + e, bv);
      load<VEC>(gate + b * D + d, gv);
      if (bias) load<VEC>(bias + d, bias_v);
      else fill(bias_v, 0.f);
      keep_scale<VEC>(dp, key_row, static_cast<uint64_t>(l * D + d), ks);
#pragma unroll
      for (int k = 0; k < VEC; ++k)
        o[k] = __fadd_rn(xv[k], __fmul_rn(gv[k], __fmul_rn(__fadd_rn(bv[k], bias_v[k]), ks[k])));
      store<VEC>(out + e, o);
    }
  }
}

// Block (b, s) walks the rows of split s of batch row b; the dropout mask is recomputed from the
// key. gate[b] and bias stay in registers; column sums feed the gate and bias gradients.
template <typename Tg, typename Tb, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    gated_residual_backward_kernel(const Tg* __restrict__ g,
        const Tb* __restrict__ branch, const float* __restrict__ bias, const float* __restrict__ gate, KeyedDropout dp,
        int64_t L, int D, int64_t rows_per_split, Tb* __restrict__ g_branch, float* __restrict__ partial_gbranch,
        float* __restrict__ partial_ggate) {
  const int64_t b = blockIdx.x, s = blockIdx.y, B = gridDim.x;
  const int nvec = D / VEC;
  const int64_t l_begin = s * rows_per_split, l_end = l_begin + rows_per_split < L ? l_begin + rows_per_split : L;
  const uint64_t key_row = dp.active ? static_cast<uint64_t>(dp.rows[b]) : 0;
  float gate_r[kMaxChunks][VEC], bias_r[kMaxChunks][VEC], acc_b[kMaxChunks][VEC], acc_g[kMaxChunks][VEC];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    fill(acc_b[c], 0.f);
    fill(acc_g[c], 0.f);
    fill(gate_r[c], 0.f);
    fill(bias_r[c], 0.f);
    if (i >= nvec) continue;
    load<VEC>(gate + b * D + i * VEC, gate_r[c]);
    if (bias) load<VEC>(bias + i * VEC, bias_r[c]);
  }
  for (int64_t l = l_begin; l < l_end; ++l) {
    const int64_t row = b * L + l;
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      const int i = threadIdx.x + c * blockDim.x;
      if (i >= nvec) continue;
      const int d = i * VEC;
      float gv[VEC], bv[VEC], ks[VEC], gb[VEC];
      load<VEC>(g + row * D + d, gv);
      load<VEC>(branch + row * D + d, bv);
      keep_scale<VEC>(dp, key_row, static_cast<uint64_t>(l * D + d), ks);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        gb[k] = __fmul_rn(__fmul_rn(gv[k], gate_r[c][k]), ks[k]);
        acc_b[c][k] += gb[k];
        acc_g[c][k] += gv[k] * __fmul_rn(__fadd_rn(bv[k], bias_r[c][k]), ks[k]);
      }
      store<VEC>(g_branch + row * D + d, gb);
    }
  }
  float* pb = partial_gbranch + (s * B + b) * D;
  float* pg = partial_ggate + (s * B + b) * D;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int i = threadIdx.x + c * blockDim.x;
    if (i >= nvec) continue;
    store<VEC>(pb + i * VEC, acc_b[c]);
    store<VEC>(pg + i * VEC, acc_g[c]);
  }
}

// ---- rotary ---------------------------------------------------------------------------------

// Blocks walk positions (b, l); a thread turns VEC pairs (j, j + half) of one head. The angle is
// the float32 product l * inv_freq[j] (as torch::outer computes it) and sincosf is the accurate
// one (no fast math: positions reach thousands of radians).
template <typename T, int VEC>
__global__ void rotary_kernel(const T* __restrict__ x, int64_t rows, int64_t L, int H, int half, int64_t stride_b,
                              int64_t stride_l, int64_t stride_h, const float* __restrict__ inv_freq, float sign,
                              T* __restrict__ out) {
  const int per_head = half / VEC, items = H * per_head, Dh = 2 * half;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / L, l = row - b * L;
    const T* xr = x + b * stride_b + l * stride_l;
    T* orow = out + row * H * Dh;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int h = it / per_head, j = (it - h * per_head) * VEC;
      float lo[VEC], hi[VEC], f[VEC], ylo[VEC], yhi[VEC];
      load<VEC>(xr + h * stride_h + j, lo);
      load<VEC>(xr + h * stride_h + j + half, hi);
      load<VEC>(inv_freq + j, f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float sn, cs;
        sincosf(__fmul_rn(static_cast<float>(l), f[k]), &sn, &cs);
        sn *= sign;
        // x * cos + rotate_half(x) * sin, rounded as the LibTorch composition rounds it.
        ylo[k] = __fadd_rn(__fmul_rn(lo[k], cs), -__fmul_rn(hi[k], sn));
        yhi[k] = __fadd_rn(__fmul_rn(hi[k], cs), __fmul_rn(lo[k], sn));
      }
      store<VEC>(orow + h * Dh + j, ylo);
      store<VEC>(orow + h * Dh + j + half, yhi);
    }
  }
}

// ---- launch helpers -------------------------------------------------------------------------

template <typename F>
void with_type(DType t, F&& f) {
  if (t == DType::kBFloat16) f(__nv_bfloat16{});
  else f(float{});
}

int elem_bytes(DType t) { return t == DType::kBFloat16 ? 2 : 4; }

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Streaming multiprocessors of the current device (cached per device).
int sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev >= 0 && dev < 64 && cache[dev].load() > 0) return cache[dev].load();
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 1;
  if (dev >= 0 && dev < 64) cache[dev].store(n);
  return n;
}

// Threads of a row kernel: every thread gets at most kMaxChunks chunks, a warp at least.
unsigned row_threads(int64_t nvec) {
  int64_t t = (nvec + kMaxChunks - 1) / kMaxChunks;
  t = (t + 31) / 32 * 32;
  return static_cast<unsigned>(t < 32 ? 32 : (t > kMaxThreads ? kMaxThreads : t));
}

// Grid of a grid-stride row loop: enough blocks to fill the device, no more than rows.
unsigned stride_grid(int64_t rows, unsigned threads) {
  const int64_t want = static_cast<int64_t>(sm_count()) * (2048 / threads) * 2;
  return static_cast<unsigned>(rows < want ? rows : want);
}

}  // namespace

int64_t fused_max_row_elems(bool vectorised) { return int64_t{kMaxThreads} * kMaxChunks * (vectorised ? 4 : 1); }

int64_t fused_column_splits(int64_t B, int64_t L) {
  if (B <= 0 || L <= 0) return 1;
  const int64_t target = 8LL * sm_count();  // blocks: a few per multiprocessor
  int64_t splits = (target + B - 1) / B;
  if (splits > L) splits = L;
  if (splits > 65535) splits = 65535;  // gridDim.y
  if (splits < 1) splits = 1;
  const int64_t rows_per = (L + splits - 1) / splits;
  return (L + rows_per - 1) / rows_per;
}

bool layer_norm_modulate_forward(const void* x, DType x_type, const float* weight, const float* shift,
                                 const float* scale, int64_t B, int64_t L, int64_t D, float eps, void* y,
                                 DType y_type, float* mean, float* rstd, cudaStream_t stream) {
  const int64_t rows = B * L;
  if (rows == 0 || D == 0) return true;
  const bool vec = D % 4 == 0 && aligned(x, 4 * elem_bytes(x_type)) && aligned(y, 4 * elem_bytes(y_type)) &&
                   aligned(weight, 16) && aligned(shift, 16) && aligned(scale, 16);
  if (D > fused_max_row_elems(vec) || rows > kMaxGridX) return false;
  const unsigned threads = row_threads(vec ? D / 4 : D);
  with_type(x_type, [&](auto xt) {
    using Tx = decltype(xt);
    with_type(y_type, [&](auto yt) {
      using Ty = decltype(yt);
      auto kernel = vec ? &layer_norm_modulate_forward_kernel<Tx, Ty, 4> : &layer_norm_modulate_forward_kernel<Tx, Ty, 1>;
      kernel<<<static_cast<unsigned>(rows), threads, 0, stream>>>(static_cast<const Tx*>(x), weight, shift, scale, L,
                                                                  static_cast<int>(D), eps, static_cast<Ty*>(y), mean,
                                                                  rstd);
    });
  });
  return true;
}

namespace {

// Launch shape of the row-split backward kernels: block (b, k) handles rows
// [k * rows_per_split, (k + 1) * rows_per_split) of sample b and writes its partial parameter
// gradients. Empty where the shape is beyond these kernels (the caller takes the plain path).
struct SplitLaunch {
  unsigned threads;
  int64_t rows_per_split;
  dim3 grid;
};
std::optional<SplitLaunch> split_launch(bool vec, int64_t B, int64_t L, int64_t D, int64_t splits) {
  if (D > fused_max_row_elems(vec) || B > kMaxGridX || splits < 1 || splits > 65535) return std::nullopt;
  return SplitLaunch{row_threads(vec ? D / 4 : D), (L + splits - 1) / splits,
                     dim3(static_cast<unsigned>(B), static_cast<unsigned>(splits))};
}

}  // namespace

bool layer_norm_modulate_backward(const void* g, DType g_type, const void* x, DType x_type, const float* weight,
                                  const float* scale, const float* mean, const float* rstd, int64_t B, int64_t L,
                                  int64_t D, int64_t splits, void* g_x, float* partial_g, float* partial_gxhat,
                                  cudaStream_t stream) {
  if (B == 0 || L == 0 || D == 0) return true;
  const bool vec = D % 4 == 0 && aligned(g, 4 * elem_bytes(g_type)) && aligned(x, 4 * elem_bytes(x_type)) &&
                   aligned(g_x, 4 * elem_bytes(x_type)) && aligned(weight, 16) && aligned(scale, 16) &&
                   aligned(partial_g, 16) && aligned(partial_gxhat, 16);
  const auto launch = split_launch(vec, B, L, D, splits);
  if (!launch) return false;
  with_type(g_type, [&](auto gt) {
    using Tg = decltype(gt);
    with_type(x_type, [&](auto xt) {
      using Tx = decltype(xt);
      auto kernel =
          vec ? &layer_norm_modulate_backward_kernel<Tg, Tx, 4> : &layer_norm_modulate_backward_kernel<Tg, Tx, 1>;
      kernel<<<launch->grid, launch->threads, 0, stream>>>(static_cast<const Tg*>(g), static_cast<const Tx*>(x), weight,
                                                           scale, mean, rstd, L, static_cast<int>(D),
                                                           launch->rows_per_split, static_cast<Tx*>(g_x), partial_g,
                                                           partial_gxhat);
    });
  });
  return true;
}

void gated_residual_forward(const void* x, DType x_type, const void* branch, DType branch_type, const float* bias,
                            const float* gate, KeyedDropout dropout, int64_t B, int64_t L, int64_t D, void* out,
                            cudaStream_t stream) {
  const int64_t rows = B * L;
  if (rows == 0 || D == 0) return;
  const bool vec = D % 4 == 0 && aligned(x, 4 * elem_bytes(x_type)) && aligned(out, 4 * elem_bytes(x_type)) &&
                   aligned(branch, 4 * elem_bytes(branch_type)) && aligned(gate, 16) && (!bias || aligned(bias, 16));
  const int64_t nvec = vec ? D / 4 : D;
  const unsigned threads = nvec >= 256 ? 256u : static_cast<unsigned>((nvec + 31) / 32 * 32);
  const unsigned grid = stride_grid(rows, threads);
  with_type(x_type, [&](auto xt) {
    using Tx = decltype(xt);
    with_type(branch_type, [&](auto bt) {
      using Tb = decltype(bt);
      auto kernel = vec ? &gated_residual_forward_kernel<Tx, Tb, 4> : &gated_residual_forward_kernel<Tx, Tb, 1>;
      kernel<<<grid, threads, 0, stream>>>(static_cast<const Tx*>(x), static_cast<const Tb*>(branch), bias, gate,
                                           dropout, rows, L, static_cast<int>(D), static_cast<Tx*>(out));
    });
  });
}

bool gated_residual_backward(const void* g, DType g_type, const void* branch, DType branch_type, const float* bias,
                             const float* gate, KeyedDropout dropout, int64_t B, int64_t L, int64_t D, int64_t splits,
                             void* g_branch, float* partial_gbranch, float* partial_ggate, cudaStream_t stream) {
  if (B == 0 || L == 0 || D == 0) return true;
  const bool vec = D % 4 == 0 && aligned(g, 4 * elem_bytes(g_type)) && aligned(branch, 4 * elem_bytes(branch_type)) &&
                   aligned(g_branch, 4 * elem_bytes(branch_type)) && aligned(gate, 16) && (!bias || aligned(bias, 16)) &&
                   aligned(partial_gbranch, 16) && aligned(partial_ggate, 16);
  const auto launch = split_launch(vec, B, L, D, splits);
  if (!launch) return false;
  with_type(g_type, [&](auto gt) {
    using Tg = decltype(gt);
    with_type(branch_type, [&](auto bt) {
      using Tb = decltype(bt);
      auto kernel = vec ? &gated_residual_backward_kernel<Tg, Tb, 4> : &gated_residual_backward_kernel<Tg, Tb, 1>;
      kernel<<<launch->grid, launch->threads, 0, stream>>>(static_cast<const Tg*>(g), static_cast<const Tb*>(branch),
                                                           bias, gate, dropout, L, static_cast<int>(D),
                                                           launch->rows_per_split, static_cast<Tb*>(g_branch),
                                                           partial_gbranch, partial_ggate);
    });
  });
  return true;
}

void rotary(const void* x, DType type, int64_t B, int64_t L, int64_t H, int64_t Dh, int64_t stride_b,
            int64_t stride_l, int64_t stride_h, const float* inv_freq, bool inverse, void* out, cudaStream_t stream) {
  const int64_t rows = B * L, half = Dh / 2;
  if (rows == 0 || H == 0 || half == 0) return;
  const int64_t w = 4 * elem_bytes(type);
  const bool vec = half % 4 == 0 && stride_b % 4 == 0 && stride_l % 4 == 0 && stride_h % 4 == 0 && aligned(x, w) &&
                   aligned(out, w) && aligned(inv_freq, 16);
  const int64_t items = H * (vec ? half / 4 : half);
  const unsigned threads = items >= 256 ? 256u : static_cast<unsigned>((items + 31) / 32 * 32);
  const unsigned grid = stride_grid(rows, threads);
  const float sign = inverse ? -1.f : 1.f;
  with_type(type, [&](auto tt) {
    using T = decltype(tt);
    auto kernel = vec ? &rotary_kernel<T, 4> : &rotary_kernel<T, 1>;
    kernel<<<grid, threads, 0, stream>>>(static_cast<const T*>(x), rows, L, static_cast<int>(H), static_cast<int>(half),
                                         stride_b, stride_l, stride_h, inv_freq, sign, static_cast<T*>(out));
  });
}

const char* fused_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace sedd::cuda
