// Categorical sampling; see categorical.h.
#include "diffusion/categorical.h"

#include "io/error.h"

namespace sedd {

torch::Tensor uniform_like(torch::IntArrayRef shape, torch::Generator& gen, torch::Dtype dtype,
                           torch::Device device) {
  torch::Tensor u = torch::rand(shape, gen, torch::TensorOptions().dtype(dtype));
  return device.is_cpu() ? u : u.to(device, /*non_blocking=*/true);
}

torch::Tensor sample_categorical(const torch::Tensor& weights, torch::Generator& gen) {
  auto dtype = weights.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  torch::Tensor w = weights.to(dtype);
  // argmax would return 0 for a row of zeros (and the NaN's index for a NaN): a plausible token
  // from no distribution. One check (one host sync) per call.
  if (w.numel() > 0) {
    torch::Tensor total = w.sum(-1, /*keepdim=*/false, torch::kDouble);
    torch::Tensor bad = (total > 0).logical_and_(torch::isfinite(total)).logical_not_();
    if (bad.any().item<bool>()) {
      const int64_t flat = bad.flatten().nonzero()[0][0].item<int64_t>();
      std::vector<int64_t> index(bad.dim());
      for (int64_t d = bad.dim() - 1, rest = flat; d >= 0; rest /= bad.size(d), --d) index[d] = rest % bad.size(d);
      fail("sample_categorical: the weights of row {} (of the {} rows shaped {}) sum to {}: all-zero, NaN or infinite "
           "probabilities have no token to draw",
           c10::str(c10::IntArrayRef(index)), bad.numel(), c10::str(bad.sizes()), total.flatten()[flat].item<double>());
    }
  }
  torch::Tensor u = uniform_like(w.sizes(), gen, dtype, w.device());
  torch::Tensor exp1 = 1e-10 - torch::log(u + 1e-10);  // Exp(1), bounded away from 0
  return (w / exp1).argmax(-1);
}

}  // namespace sedd
