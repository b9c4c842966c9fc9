// Keyed randomness. Every random draw of training, evaluation and sampling is one element
// (row, col) of a Philox stream keyed by (seed, purpose, step), where `row` names the thing the
// draw belongs to (a sequence of the global batch, a sample) and `col` the element inside it (a
// position, a vocabulary entry). A draw therefore never depends on the batch it was computed in,
// on the rank that computed it, on the world size or on the device: the CPU loops and the CUDA
// kernels below compute bit-identical uniforms (categorical draws can differ only where a uniform
// falls within rounding of a boundary of the cumulative weights, whose sums run in another order).
#pragma once
#include <torch/torch.h>

#include "diffusion/philox.h"

namespace sedd {

// What a stream is for: part of its key, so streams never overlap.
namespace purpose {
constexpr uint64_t kTrainTime = 1;      // row: sequence of the global batch
constexpr uint64_t kCorrupt = 2;        // row: sequence, col: position
constexpr uint64_t kRedraw = 3;         // uniform graph's replacement token; row: sequence, col: position
constexpr uint64_t kSample = 4;         // sampler's categorical draws; row: sample, col: position * dim
constexpr uint64_t kSampleStart = 5;    // sampler's start (uniform graph); row: sample, col: position
constexpr uint64_t kEvalTime = 6;       // likelihood-bound times; row: sequence, col: draw
constexpr uint64_t kEvalCorrupt = 7;    // row: sequence, col: draw * L + position (step = 0)
constexpr uint64_t kEvalRedraw = 8;
constexpr uint64_t kDropoutBase = 1000; // + dropout site; row: sequence, col: element of the row
}  // namespace purpose

struct RandomStream {
  uint64_t seed = 0;
  uint64_t purpose = 0;
  uint64_t step = 0;
  philox::Stream philox() const { return philox::make_stream(seed, purpose, step); }
};

// u[r, c] = U(stream, rows[r], col_offset[r] + c) in [0, 1): [R, cols], float64 (53 random bits)
// or float32 (24 bits), on rows' device. rows, col_offset: int64 [R] (col_offset may be undefined = 0).
torch::Tensor keyed_uniform(const RandomStream& s, const torch::Tensor& rows, int64_t cols, torch::ScalarType dtype,
                            const torch::Tensor& col_offset = {});

// One categorical draw per row from unnormalised, non-negative weights [R, K] (float32/float64)
// by the inverse of the cumulative weights: row r takes the first c whose running sum (float64)
// exceeds U(stream, rows[r], col_offset[r]) times the row's total. One uniform per row; entries of
// weight 0 are never drawn. A row whose total is not positive and finite (all zeros, a NaN) throws
// sedd::Error naming the row, its stream row and the step (on a device: one host sync per call).
// Returns int64 [R].
torch::Tensor keyed_categorical(const torch::Tensor& weights, const RandomStream& s, const torch::Tensor& rows,
                                const torch::Tensor& col_offset = {});

// True when the CUDA kernels of this file were built (else CUDA tensors take a host round trip).
bool keyed_random_has_cuda_kernels();

}  // namespace sedd
