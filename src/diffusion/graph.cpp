// Absorbing and uniform graphs; math in docs/DESIGN.md, "Graphs", and graph.h.
#include "diffusion/graph.h"

#include "diffusion/categorical.h"
#include "io/error.h"

namespace sedd {

namespace F = torch::nn::functional;

torch::Tensor exp_minus_one(const torch::Tensor& sigma) {
  return torch::where(sigma < 0.5, torch::expm1(sigma), torch::exp(sigma) - 1);
}

torch::Tensor Graph::one_hot(const torch::Tensor& x, torch::Dtype dtype) const {
  return F::one_hot(x, dim()).to(dtype);
}

torch::Tensor Graph::reverse_rate(const torch::Tensor& x, const torch::Tensor& score) const {
  torch::Tensor r = transp_rate(x, score.scalar_type()) * score;  // [..., dim]
  torch::Tensor idx = x.unsqueeze(-1);
  r.scatter_(-1, idx, torch::zeros_like(r));
  r.scatter_(-1, idx, -r.sum(-1, /*keepdim=*/true));
  return r;
}

torch::Tensor Graph::sample_rate(const torch::Tensor& x, const torch::Tensor& rate,
                                 torch::Generator& gen) const {
  return sample_categorical(one_hot(x, rate.scalar_type()) + rate, gen);
}

namespace {
// The clean-token distribution [..., N] widened to [..., dim] (a zero mask column for absorbing).
torch::Tensor widen(const torch::Tensor& p0, int64_t dim) {
  if (p0.size(-1) == dim) return p0;
  auto shape = p0.sizes().vec();
  shape.back() = dim - p0.size(-1);
  return torch::cat({p0, torch::zeros(shape, p0.options())}, -1);
}

torch::Tensor normalise(const torch::Tensor& w) { return w / w.sum(-1, /*keepdim=*/true).clamp_min(1e-300); }
}  // namespace

torch::Tensor Graph::posterior(const torch::Tensor& xt, const torch::Tensor& x0, const torch::Tensor& sigma_s,
                               const torch::Tensor& sigma_t) const {
  return normalise(transp_transition(xt, sigma_t - sigma_s) * transition(x0, sigma_s));
}

torch::Tensor Graph::model_posterior(const torch::Tensor& xt, const torch::Tensor& p0, const torch::Tensor& sigma_s,
                                     const torch::Tensor& sigma_t) const {
  return normalise(transp_transition(xt, sigma_t - sigma_s) * transition_of(widen(p0, dim()), sigma_s));
}

std::unique_ptr<Graph> make_graph(const std::string& kind, int64_t tokens) {
  SEDD_CHECK(tokens >= 2, "graph: the vocabulary needs at least 2 tokens, got {}", tokens);
  if (kind == "absorb") return std::make_unique<AbsorbingGraph>(tokens);
  if (kind == "uniform") return std::make_unique<UniformGraph>(tokens);
  fail("diffusion.graph must be 'absorb' or 'uniform', got '{}'", kind);
}

// ---------------------------------------------------------------------------------------------
// Absorbing: Q[j, i] = rate i -> j; every token moves to the mask at rate 1.

AbsorbingGraph::AbsorbingGraph(int64_t tokens) : Graph(tokens) {}

torch::Tensor AbsorbingGraph::rate(const torch::Tensor& x, torch::Dtype dtype) const {
  return one_hot(torch::full_like(x, mask_id()), dtype) - one_hot(x, dtype);
}

torch::Tensor AbsorbingGraph::transp_rate(const torch::Tensor& x, torch::Dtype dtype) const {
  return -one_hot(x, dtype) + (x == mask_id()).to(dtype).unsqueeze(-1);
}

torch::Tensor AbsorbingGraph::transition(const torch::Tensor& x, const torch::Tensor& sigma) const {
  // Column x of exp(sigma Q): stay with e^-sigma, else the mask.
  torch::Tensor s = sigma.unsqueeze(-1);
  torch::Tensor keep = torch::exp(-s);
  return keep * one_hot(x, sigma.scalar_type()) +
         (-torch::expm1(-s)) * one_hot(torch::full_like(x, mask_id()), sigma.scalar_type());
}

torch::Tensor AbsorbingGraph::transp_transition(const torch::Tensor& x, const torch::Tensor& sigma) const {
  // Row x of exp(sigma Q): e^-sigma on the diagonal; the mask row also gathers 1 - e^-sigma from all.
  torch::Tensor s = sigma.unsqueeze(-1);
  torch::Tensor edge = torch::exp(-s) * one_hot(x, sigma.scalar_type());
  torch::Tensor from_all = torch::where(x == mask_id(), 1 - torch::exp(-sigma), torch::zeros_like(sigma));
  return edge + from_all.unsqueeze(-1);
}

torch::Tensor AbsorbingGraph::sample_transition(const torch::Tensor& x0, const torch::Tensor& sigma,
                                                torch::Generator& gen) const {
  torch::Tensor move_chance = -torch::expm1(-sigma.to(torch::kDouble)).to(x0.device());
  torch::Tensor u = uniform_like(x0.sizes(), gen, torch::kDouble, x0.device());
  return torch::where(u < move_chance, torch::full_like(x0, mask_id()), x0);
}

torch::Tensor AbsorbingGraph::corrupt(const torch::Tensor& x0, const torch::Tensor& sigma, const RandomStream& move,
                                      const RandomStream&, const torch::Tensor& rows,
                                      const torch::Tensor& col_offset) const {
  auto u = keyed_uniform(move, rows, x0.size(1), torch::kDouble, col_offset);
  auto move_chance = -torch::expm1(-sigma.to(torch::kDouble)).unsqueeze(1);
  return torch::where(u < move_chance, torch::full_like(x0, mask_id()), x0);
}

torch::Tensor AbsorbingGraph::sample_limit(torch::IntArrayRef shape, torch::Generator&,
                                           torch::Device device) const {
  return torch::full(shape, mask_id(), torch::TensorOptions().dtype(torch::kLong).device(device));
}

torch::Tensor AbsorbingGraph::staggered_score(const torch::Tensor& score, const torch::Tensor& dsigma) const {
  torch::Tensor ds = dsigma.to(score.scalar_type()).unsqueeze(-1);  // [..., 1]
  torch::Tensor extra = (1 - torch::exp(ds)) * score.sum(-1, /*keepdim=*/true);
  torch::Tensor out = score * torch::exp(ds);
  torch::Tensor mask_col = one_hot(torch::full_like(score.select(-1, 0), mask_id(), torch::kLong),
                                   score.scalar_type());
  return out + extra * mask_col;
}

torch::Tensor AbsorbingGraph::transition_of(const torch::Tensor& probs, const torch::Tensor& sigma) const {
  // Every token keeps its mass with e^-sigma and hands the rest to the mask.
  auto keep = torch::exp(-sigma.to(probs.scalar_type())).unsqueeze(-1);
  auto tokens = probs.narrow(-1, 0, tokens_), mask = probs.narrow(-1, tokens_, 1);
  return torch::cat({tokens * keep, mask + (1 - keep) * tokens.sum(-1, /*keepdim=*/true)}, -1);
}

torch::Tensor AbsorbingGraph::score_entropy(const torch::Tensor& log_score, const torch::Tensor& sigma,
                                            const torch::Tensor& x, const torch::Tensor& x0) const {
  auto dtype = log_score.scalar_type();
  torch::Tensor masked = x == mask_id();                               // [...]
  // Zero the scores of unmasked positions first: their loss is 0 and exp() of an arbitrary
  // value must not put inf/NaN into the gradient through where().
  torch::Tensor s = torch::where(masked.unsqueeze(-1), log_score, torch::zeros_like(log_score));
  torch::Tensor esigm1 = exp_minus_one(sigma.to(dtype)).expand_as(x.to(dtype));
  torch::Tensor ratio = 1 / esigm1;                                    // r = 1 / (e^sigma - 1)
  torch::Tensor neg = ratio * s.gather(-1, x0.unsqueeze(-1)).squeeze(-1);
  torch::Tensor pos = s.narrow(-1, 0, tokens_).exp().sum(-1);
  torch::Tensor cst = ratio * (ratio.log() - 1);
  return torch::where(masked, pos - neg + cst, torch::zeros_like(pos));
}

// ---------------------------------------------------------------------------------------------
// Uniform: Q = 11^T / N - I (symmetric, so transp_* equal their untransposed forms).

UniformGraph::UniformGraph(int64_t tokens) : Graph(tokens) {}

torch::Tensor UniformGraph::rate(const torch::Tensor& x, torch::Dtype dtype) const {
  const double n = static_cast<double>(dim());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.push_back(dim());
  torch::Tensor edge = torch::full(shape, 1.0 / n, torch::TensorOptions().dtype(dtype).device(x.device()));
  return edge.scatter(-1, x.unsqueeze(-1), -(n - 1) / n);
}

torch::Tensor UniformGraph::transp_rate(const torch::Tensor& x, torch::Dtype dtype) const {
  return rate(x, dtype);
}

torch::Tensor UniformGraph::transition(const torch::Tensor& x, const torch::Tensor& sigma) const {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.push_back(dim());
  torch::Tensor off = (-torch::expm1(-sigma)).unsqueeze(-1) / static_cast<double>(dim());
  torch::Tensor trans = off.expand(shape).clone();
  torch::Tensor idx = x.unsqueeze(-1);
  trans.scatter_(-1, idx, torch::zeros_like(trans));
  trans.scatter_(-1, idx, 1 - trans.sum(-1, /*keepdim=*/true));
  return trans;
}

torch::Tensor UniformGraph::transp_transition(const torch::Tensor& x, const torch::Tensor& sigma) const {
  return transition(x, sigma);
}

torch::Tensor UniformGraph::sample_transition(const torch::Tensor& x0, const torch::Tensor& sigma,
                                              torch::Generator& gen) const {
  torch::Tensor move_chance = -torch::expm1(-sigma.to(torch::kDouble)).to(x0.device());
  torch::Tensor u = uniform_like(x0.sizes(), gen, torch::kDouble, x0.device());
  torch::Tensor redraw = torch::randint(dim(), x0.sizes(), gen, torch::TensorOptions().dtype(torch::kLong))
                             .to(x0.device());
  return torch::where(u < move_chance, redraw, x0);
}

torch::Tensor UniformGraph::corrupt(const torch::Tensor& x0, const torch::Tensor& sigma, const RandomStream& move,
                                    const RandomStream& redraw, const torch::Tensor& rows,
                                    const torch::Tensor& col_offset) const {
  auto u = keyed_uniform(move, rows, x0.size(1), torch::kDouble, col_offset);
  auto move_chance = -torch::expm1(-sigma.to(torch::kDouble)).unsqueeze(1);
  auto token = (keyed_uniform(redraw, rows, x0.size(1), torch::kDouble, col_offset) * static_cast<double>(dim()))
                   .floor()
                   .clamp_max(static_cast<double>(dim() - 1))
                   .to(torch::kLong);
  return torch::where(u < move_chance, token, x0);
}

torch::Tensor UniformGraph::sample_limit(torch::IntArrayRef shape, torch::Generator& gen,
                                         torch::Device device) const {
  return torch::randint(dim(), shape, gen, torch::TensorOptions().dtype(torch::kLong)).to(device);
}

torch::Tensor UniformGraph::staggered_score(const torch::Tensor& score, const torch::Tensor& dsigma) const {
  torch::Tensor epow = torch::exp(-dsigma.to(score.scalar_type())).unsqueeze(-1);
  return ((epow - 1) / (static_cast<double>(dim()) * epow)) * score.sum(-1, /*keepdim=*/true) + score / epow;
}

torch::Tensor UniformGraph::transition_of(const torch::Tensor& probs, const torch::Tensor& sigma) const {
  auto keep = torch::exp(-sigma.to(probs.scalar_type())).unsqueeze(-1);
  return probs * keep + (1 - keep) * probs.sum(-1, /*keepdim=*/true) / static_cast<double>(dim());
}

torch::Tensor UniformGraph::score_entropy(const torch::Tensor& log_score, const torch::Tensor& sigma,
                                          const torch::Tensor& x, const torch::Tensor& x0) const {
  auto dtype = log_score.scalar_type();
  const double n = static_cast<double>(dim());
  torch::Tensor esigm1 = exp_minus_one(sigma.to(dtype));
  // rho = 1 - N/(e+N), written as e/(e+N): the difference form cancels to 0 in float32 at small sigma.
  torch::Tensor ratio = esigm1 / (esigm1 + n);
  torch::Tensor s_x = log_score.gather(-1, x.unsqueeze(-1)).squeeze(-1);
  torch::Tensor s_x0 = log_score.gather(-1, x0.unsqueeze(-1)).squeeze(-1);
  torch::Tensor stay = x == x0;

  torch::Tensor neg = log_score.mean(-1) - s_x / n;                    // m
  neg = torch::where(stay, ratio * neg, s_x0 / esigm1 + neg);
  torch::Tensor cst = torch::where(stay, (n - 1) / n * ratio * (ratio.log() - 1),
                                   ((-ratio.log() - 1) / ratio - (n - 2)) / n);
  torch::Tensor sexp = log_score.exp();
  torch::Tensor pos = sexp.mean(-1) - sexp.gather(-1, x.unsqueeze(-1)).squeeze(-1) / n;  // M
  return pos - neg + cst;
}

}  // namespace sedd
