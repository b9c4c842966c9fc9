// D3PM's discrete chain; see discrete.h.
#include "diffusion/discrete.h"

namespace sedd {

torch::Tensor discrete_sigma(const Noise& noise, const torch::Tensor& step, int64_t T) {
  auto t = step.to(torch::kDouble);
  auto s = noise.total(t / static_cast<double>(T));
  return torch::where(t > 0, s, torch::zeros_like(s));
}

torch::Tensor discrete_step(const torch::Tensor& u, int64_t T) {
  return (u * static_cast<double>(T)).floor().clamp(0, static_cast<double>(T - 1)).to(torch::kLong) + 1;
}

torch::Tensor transition_matrix(const Graph& graph, double sigma) {
  auto states = torch::arange(graph.dim(), torch::kLong);
  return graph.transition(states, torch::full({graph.dim()}, sigma, torch::kDouble));
}

}  // namespace sedd
