// Keyed training times; see times.h.
#include "diffusion/times.h"

#include "diffusion/keyed_random.h"

namespace sedd {

torch::Tensor training_time(const torch::Tensor& u, double eps) { return (1 - eps) * u + eps; }

torch::Tensor time_uniforms(const std::string& mode, uint64_t seed, uint64_t step, const torch::Tensor& rows,
                            int64_t B) {
  RandomStream s{seed, purpose::kTrainTime, step};
  if (mode == "antithetic") {
    auto u = keyed_uniform(s, rows.remainder(B / 2), 1, torch::kDouble).squeeze(1);
    return torch::where(rows >= B / 2, 1 - u, u);
  }
  auto u = keyed_uniform(s, rows, 1, torch::kDouble).squeeze(1);
  return mode == "stratified" ? (rows.to(torch::kDouble) + u) / static_cast<double>(B) : u;
}


}  // namespace sedd
