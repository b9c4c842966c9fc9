// Categorical sampling; see categorical.h.
#include "diffusion/categorical.h"

namespace sedd {

torch::Tensor uniform_like(torch::IntArrayRef shape, torch::Generator& gen, torch::Dtype dtype,
                           torch::Device device) {
  // Draws always happen on CPU from the keyed generator, so a run's randomness is the same on
  // any device and any number of ranks.
  torch::Tensor u = torch::rand(shape, gen, torch::TensorOptions().dtype(dtype));
  return device.is_cpu() ? u : u.to(device, /*non_blocking=*/true);
}

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
}  // namespace

torch::Generator keyed_generator(uint64_t seed, uint64_t a, uint64_t b) {
  return at::make_generator<at::CPUGeneratorImpl>(splitmix64(seed ^ splitmix64(a ^ splitmix64(b))));
}

torch::Tensor sample_categorical_rows(const torch::Tensor& weights, std::vector<torch::Generator>& gens) {
  auto dtype = weights.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  std::vector<torch::Tensor> u;
  u.reserve(gens.size());
  for (auto& g : gens) u.push_back(torch::rand(weights.sizes().slice(1), g, torch::TensorOptions().dtype(dtype)));
  torch::Tensor uniforms = torch::stack(u).to(weights.device());
  torch::Tensor exp1 = 1e-10 - torch::log(uniforms + 1e-10);
  return (weights.to(dtype) / exp1).argmax(-1);
}

torch::Tensor sample_categorical(const torch::Tensor& weights, torch::Generator& gen) {
  auto dtype = weights.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  torch::Tensor w = weights.to(dtype);
  torch::Tensor u = uniform_like(w.sizes(), gen, dtype, w.device());
  torch::Tensor exp1 = 1e-10 - torch::log(u + 1e-10);  // Exp(1), bounded away from 0
  return (w / exp1).argmax(-1);
}

}  // namespace sedd
