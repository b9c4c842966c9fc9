// What objectives share by default; see objective.h.
#include "objectives/objective.h"

#include <cmath>

#include "io/error.h"

namespace sedd {

torch::Tensor Objective::group_losses(DDiT&, const Process&, const torch::Tensor&, const TrainingDraw&) const {
  fail("objective '{}' searches no schedule", name());
}

std::string Objective::describe(const ModelConfig&) const { return name(); }

torch::Tensor Objective::exact_nll(const Process&, ScoreModel&, const torch::Tensor&, const torch::Tensor&,
                                   int64_t) const {
  fail("the {} objective's likelihood is a bound, not exact", name());
}

// p_base is the forward process at t = 1 started from uniformly random tokens: uniform for the
// uniform graph; for the absorbing graph e^-sigma(1) of its mass stays on random tokens.
double Objective::prior_nats_per_token(const Process& p) const {
  const double s1 = p.noise.total(torch::ones({1}, torch::kDouble)).item<double>();
  const double keep = std::exp(-s1), n = static_cast<double>(p.graph.tokens());
  if (p.graph.absorbing()) {
    // p_1(.|x0): keep on x0, (1-keep) on the mask. p_base: keep/n on each token, (1-keep) on the mask.
    return keep > 0 ? keep * std::log(n) : 0.0;
  }
  // p_1(.|x0) = keep onehot + (1-keep)/n; p_base uniform 1/n.
  const double on = keep + (1 - keep) / n, off = (1 - keep) / n;
  return on * std::log(on * n) + (n - 1) * (off > 0 ? off * std::log(off * n) : 0.0);
}

}  // namespace sedd
