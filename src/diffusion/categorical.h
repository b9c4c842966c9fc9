// Categorical sampling from unnormalised, non-negative weights along the last dimension with an
// explicit torch generator (reference and test utilities; training, evaluation and sampling use
// the keyed draws of keyed_random.h). Gumbel-max in the form argmax(w / E) with E ~ Exp(1): exact
// for any positive scale of w and free of log(0).
#pragma once
#include <torch/torch.h>

namespace sedd {

// weights [..., K] >= 0 (float32 or float64; the draw happens in the weights' dtype). Returns
// int64 indices [...]. A row whose total is not positive and finite (all zeros, a NaN) throws
// sedd::Error naming the row (one host sync per call).
torch::Tensor sample_categorical(const torch::Tensor& weights, torch::Generator& gen);

// Uniform [0,1) draws from the (CPU) generator, moved to `device`, in `dtype`.
torch::Tensor uniform_like(torch::IntArrayRef shape, torch::Generator& gen, torch::Dtype dtype,
                           torch::Device device);

}  // namespace sedd
