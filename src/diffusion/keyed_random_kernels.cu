// CUDA kernels of the keyed randomness; see keyed_random.h. They evaluate the same Philox
// elements as the CPU loops in keyed_random.cpp.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

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
  // A launch that failed would leave `out` uninitialised: never let it pass as random numbers.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess)
    throw std::runtime_error(std::string("keyed_uniform: CUDA kernel launch failed: ") + cudaGetErrorString(err));
}

}  // namespace sedd::cuda
