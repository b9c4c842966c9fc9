// Training objective; see loss.h.
#include "diffusion/loss.h"

namespace sedd {

torch::Tensor training_time(const torch::Tensor& u, double eps) { return (1 - eps) * u + eps; }

torch::Tensor sequence_loss(const Graph& graph, const Noise& noise, const torch::Tensor& log_score,
                            const torch::Tensor& t, const torch::Tensor& xt, const torch::Tensor& x0) {
  auto tt = t.to(log_score.scalar_type());
  auto sigma = noise.total(tt), dsigma = noise.rate(tt);                       // [B]
  auto per_pos = graph.score_entropy(log_score, sigma.unsqueeze(-1), xt, x0);  // [B, L]
  return dsigma * per_pos.sum(-1);
}

}  // namespace sedd
