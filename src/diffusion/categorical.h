// Categorical sampling from unnormalised, non-negative weights along the last dimension.
// Gumbel-max in the form argmax(w / E) with E ~ Exp(1): exact for any positive scale of w and
// free of log(0). Randomness comes from an explicit generator so runs are reproducible.
#pragma once
#include <torch/torch.h>

namespace sedd {

// weights [..., K] >= 0 (float32 or float64; the draw happens in the weights' dtype, so pass
// float64 weights for float64 sampling). Returns int64 indices [...].
torch::Tensor sample_categorical(const torch::Tensor& weights, torch::Generator& gen);

// Row i of weights [B, ...] drawn with gens[i] (the draws of a row never depend on the batch).
torch::Tensor sample_categorical_rows(const torch::Tensor& weights, std::vector<torch::Generator>& gens);

// Uniform [0,1) draws with the generator on CPU, moved to `like`'s device, in `dtype`.
torch::Tensor uniform_like(torch::IntArrayRef shape, torch::Generator& gen, torch::Dtype dtype,
                           torch::Device device);

// A CPU generator keyed by (seed, a, b), e.g. (run seed, step, global sequence index): the
// draws of a sequence never depend on which rank handles it or on the world size.
torch::Generator keyed_generator(uint64_t seed, uint64_t a, uint64_t b);

}  // namespace sedd
