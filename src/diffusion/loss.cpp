// Training objective; see loss.h.
#include "diffusion/loss.h"

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

torch::Tensor sequence_loss(const Graph& graph, const Noise& noise, const torch::Tensor& log_score,
                            const torch::Tensor& t, const torch::Tensor& xt, const torch::Tensor& x0) {
  auto tt = t.to(log_score.scalar_type());
  auto sigma = noise.total(tt), dsigma = noise.rate(tt);                       // [B]
  auto per_pos = graph.score_entropy(log_score, sigma.unsqueeze(-1), xt, x0);  // [B, L]
  return dsigma * per_pos.sum(-1);
}

}  // namespace sedd
