// CUDA kernels of the keyed randomness; see keyed_random.h. They evaluate the same Philox
// elements as the CPU loops in keyed_random.cpp.
#include <cuda_runtime.h>

#include <cfloat>

#include "diffusion/keyed_random_kernels.h"

namespace sedd::cuda {

namespace {

template <typename T>
__global__ void uniform_kernel(philox::Stream s, const int64_t* rows, const int64_t* offs, int64_t n_rows,
                               int64_t cols, T* out) {
  const int64_t total = n_rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    const uint64_t row = static_cast<uint64_t>(rows[r]), col = static_cast<uint64_t>(offs[r] + c);
    if constexpr (sizeof(T) == 8) out[i] = s.uniform_double(row, col);
    else out[i] = s.uniform_float(row, col);
  }
}

// One block per row; each thread scans a strided subset, then (value, index) pairs reduce with
// ties going to the smaller index, as the CPU loop's strict '>' does.
constexpr int kThreads = 256;

__device__ __forceinline__ void better(double& v, int64_t& i, double ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) v = ov, i = oi;
}

template <typename T>
__global__ void categorical_kernel(philox::Stream s, const T* w, const int64_t* rows, const int64_t* offs,
                                   int64_t cols, int64_t* out) {
  const int64_t r = blockIdx.x;
  const uint64_t row = static_cast<uint64_t>(rows[r]);
  const T* wr = w + r * cols;
  double best = -1;
  int64_t arg = cols;  // larger than any real index: loses every tie
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    double e = -log(s.uniform_open_double(row, static_cast<uint64_t>(offs[r] + c)));
    better(best, arg, static_cast<double>(wr[c]) / e, c);
  }
  for (int off = 16; off > 0; off >>= 1) {
    double ov = __shfl_down_sync(0xffffffffu, best, off);
    int64_t oi = __shfl_down_sync(0xffffffffu, arg, off);
    better(best, arg, ov, oi);
  }
  __shared__ double vals[kThreads / 32];
  __shared__ int64_t idxs[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) vals[warp] = best, idxs[warp] = arg;
  __syncthreads();
  if (warp == 0) {
    best = lane < kThreads / 32 ? vals[lane] : -1;
    arg = lane < kThreads / 32 ? idxs[lane] : cols;
    for (int off = 16; off > 0; off >>= 1) {
      double ov = __shfl_down_sync(0xffffffffu, best, off);
      int64_t oi = __shfl_down_sync(0xffffffffu, arg, off);
      better(best, arg, ov, oi);
    }
    if (lane == 0) out[r] = arg < cols ? arg : 0;
  }
}

unsigned blocks_for(int64_t total) {
  int64_t b = (total + 255) / 256;
  return static_cast<unsigned>(b < 65535 * 8 ? (b > 0 ? b : 1) : 65535 * 8);
}

}  // namespace

void keyed_uniform(philox::Stream s, const int64_t* rows, const int64_t* offs, int64_t n_rows, int64_t cols, void* out,
                   bool double_out, cudaStream_t stream) {
  const unsigned blocks = blocks_for(n_rows * cols);
  if (double_out) uniform_kernel<double><<<blocks, 256, 0, stream>>>(s, rows, offs, n_rows, cols, static_cast<double*>(out));
  else uniform_kernel<float><<<blocks, 256, 0, stream>>>(s, rows, offs, n_rows, cols, static_cast<float*>(out));
}

void keyed_categorical(philox::Stream s, const void* weights, bool double_weights, const int64_t* rows,
                       const int64_t* offs, int64_t n_rows, int64_t cols, int64_t* out, cudaStream_t stream) {
  // One block per row: gridDim.x takes up to 2^31 - 1 blocks, far more rows than a batch holds.
  const unsigned grid = static_cast<unsigned>(n_rows);
  if (double_weights)
    categorical_kernel<double><<<grid, kThreads, 0, stream>>>(s, static_cast<const double*>(weights), rows, offs, cols, out);
  else
    categorical_kernel<float><<<grid, kThreads, 0, stream>>>(s, static_cast<const float*>(weights), rows, offs, cols, out);
}

}  // namespace sedd::cuda
