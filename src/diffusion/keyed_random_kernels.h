// Launchers of the keyed-random CUDA kernels (keyed_random_kernels.cu). Plain C++ on raw device
// pointers, so the .cu file needs no torch headers; keyed_random.cpp checks shapes and dtypes.
#pragma once
#include <cstdint>

#include "diffusion/philox.h"

typedef struct CUstream_st* cudaStream_t;

namespace sedd::cuda {

// out[r * cols + c] = uniform(rows[r], col_offset[r] + c); double_out selects float64/float32.
// Throws std::runtime_error (with CUDA's message) when the launch fails.
void keyed_uniform(philox::Stream s, const int64_t* rows, const int64_t* col_offset, int64_t n_rows, int64_t cols,
                   void* out, bool double_out, cudaStream_t stream);

}  // namespace sedd::cuda
