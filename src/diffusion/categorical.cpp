// Categorical sampling; see categorical.h.
#include "diffusion/categorical.h"

namespace sedd {

torch::Tensor uniform_like(torch::IntArrayRef shape, torch::Generator& gen, torch::Dtype dtype,
                           torch::Device device) {
  torch::Tensor u = torch::rand(shape, gen, torch::TensorOptions().dtype(dtype));
  return device.is_cpu() ? u : u.to(device, /*non_blocking=*/true);
}

torch::Tensor sample_categorical(const torch::Tensor& weights, torch::Generator& gen) {
  auto dtype = weights.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  torch::Tensor w = weights.to(dtype);
  torch::Tensor u = uniform_like(w.sizes(), gen, dtype, w.device());
  torch::Tensor exp1 = 1e-10 - torch::log(u + 1e-10);  // Exp(1), bounded away from 0
  return (w / exp1).argmax(-1);
}

}  // namespace sedd
