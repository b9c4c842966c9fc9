// The fused, masked-rows output loss against the plain path (full logits, then the loss).
#include <gtest/gtest.h>

#include "diffusion/keyed_random.h"
#include "diffusion/output_loss.h"
#include "model/objective.h"

using namespace sedd;

namespace {

ModelConfig config(const std::string& graph, bool scale_by_sigma) {
  ModelConfig c;
  c.tokens = 29;
  c.graph = graph;
  c.hidden_size = 32;
  c.n_heads = 2;
  c.n_blocks = 2;
  c.cond_dim = 16;
  c.length = 12;
  c.scale_by_sigma = scale_by_sigma;
  return c;
}

DDiT random_model(const ModelConfig& c, torch::Dtype dtype) {
  torch::manual_seed(4);
  DDiT m(c);
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.normal_(0, 0.3);
  m->to(dtype);
  return m;
}

struct Batch {
  torch::Tensor x0, xt, t;
};

Batch make_batch(const Graph& g, const Noise& noise, int64_t B, int64_t L) {
  torch::manual_seed(8);
  Batch b;
  b.x0 = torch::randint(g.tokens(), {B, L}, torch::kLong);
  b.t = torch::linspace(0.05, 0.95, B, torch::kDouble);
  auto rows = torch::arange(B, torch::kLong);
  b.xt = g.corrupt(b.x0, noise.total(b.t), RandomStream{1, purpose::kCorrupt, 0}, RandomStream{1, purpose::kRedraw, 0},
                   rows);
  return b;
}

// Loss and every parameter's gradient, fused or plain.
std::pair<torch::Tensor, std::vector<torch::Tensor>> loss_and_grads(DDiT& m, const Graph& g, const Noise& noise,
                                                                    const Batch& b, bool fused, int64_t chunk) {
  m->zero_grad();
  LossOptions o;
  o.fused = fused;
  o.chunk_elems = chunk;
  auto loss = sedd_sequence_loss(m, g, noise, b.xt, b.x0, b.t, nullptr, o);
  loss.sum().backward();
  std::vector<torch::Tensor> grads;
  for (auto& p : m->parameters()) grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return {loss.detach(), grads};
}

double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / (b.abs().max() + 1e-30)).item<double>();
}

}  // namespace

TEST(FusedLoss, EqualsTheFullLogitsPathInValueAndGradient) {
  struct Case {
    const char* graph;
    bool scale;
  };
  for (Case c : {Case{"absorb", true}, Case{"absorb", false}, Case{"uniform", false}}) {
    for (auto dtype : {torch::kDouble, torch::kFloat}) {
      auto cfg = config(c.graph, c.scale);
      auto m = random_model(cfg, dtype);
      auto g = make_graph(cfg.graph, cfg.tokens);
      auto noise = make_noise(cfg.noise);
      auto b = make_batch(*g, *noise, 5, cfg.length);
      auto plain = loss_and_grads(m, *g, *noise, b, false, 1 << 20);
      // A chunk of 50 logits spans fewer than two rows: many chunks, as on a real vocabulary.
      auto fused = loss_and_grads(m, *g, *noise, b, true, 50);
      const double tol = dtype == torch::kDouble ? 1e-10 : 2e-5;
      EXPECT_LT(rel_err(fused.first, plain.first), tol) << c.graph << " scale " << c.scale;
      double worst = 0;
      for (size_t i = 0; i < plain.second.size(); ++i) worst = std::max(worst, rel_err(fused.second[i], plain.second[i]));
      EXPECT_LT(worst, dtype == torch::kDouble ? 1e-9 : 1e-4) << c.graph << " scale " << c.scale;
      std::cout << c.graph << (c.scale ? " (scale_by_sigma)" : "") << ", " << c10::toString(dtype)
                << ": loss rel. error " << rel_err(fused.first, plain.first) << ", worst gradient rel. error " << worst
                << "\n";
      EXPECT_GT(plain.first.abs().sum().item<double>(), 0.0);
    }
  }
}

TEST(FusedLoss, CrossEntropyRowsMatchTorch) {
  torch::manual_seed(2);
  auto features = torch::randn({37, 8}, torch::kDouble).requires_grad_();
  auto weight = torch::randn({11, 8}, torch::kDouble).requires_grad_();
  auto bias = torch::randn({11}, torch::kDouble).requires_grad_();
  auto target = torch::randint(10, {37}, torch::kLong);
  OutputLossRows rows;
  rows.target = target;
  // 10 columns used: the 11th (a mask column) takes no part, as in masked diffusion.
  auto ours = fused_output_loss(RowLoss::CrossEntropy, features, weight, bias, rows, 10, false, 7);
  ours.sum().backward();
  auto g = std::vector<torch::Tensor>{features.grad().clone(), weight.grad().clone(), bias.grad().clone()};
  for (auto* t : {&features, &weight, &bias}) t->mutable_grad().zero_();
  auto logits = torch::addmm(bias.narrow(0, 0, 10), features, weight.narrow(0, 0, 10).t());
  auto ref = torch::nn::functional::cross_entropy(logits, target,
                                                  torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
  ref.sum().backward();
  EXPECT_LT(rel_err(ours.detach(), ref.detach()), 1e-12);
  EXPECT_LT(rel_err(g[0], features.grad()), 1e-12);
  EXPECT_LT(rel_err(g[1], weight.grad()), 1e-12);
  EXPECT_LT(rel_err(g[2], bias.grad()), 1e-12);
  EXPECT_EQ(g[1][10].abs().sum().item<double>(), 0.0) << "the unused column got a gradient";
}

// bf16 matmuls with fp32 loss math on the GPU stay close to the fp32 reference.
TEST(FusedLossGpu, Bf16FusedLossTracksTheFp32Reference) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto cfg = config("absorb", true);
  cfg.hidden_size = 64;
  cfg.tokens = 500;
  auto m = random_model(cfg, torch::kFloat);
  auto g = make_graph(cfg.graph, cfg.tokens);
  auto noise = make_noise(cfg.noise);
  auto b = make_batch(*g, *noise, 8, cfg.length);
  auto plain = loss_and_grads(m, *g, *noise, b, false, 1 << 20);
  m->to(torch::kCUDA);
  m->bf16 = true;
  Batch bg{b.x0.cuda(), b.xt.cuda(), b.t.cuda()};
  auto fused = loss_and_grads(m, *g, *noise, bg, true, 1 << 12);
  double err = rel_err(fused.first.cpu(), plain.first);
  std::cout << "bf16 fused loss vs fp32 plain on CPU: relative error " << err << "\n";
  EXPECT_LT(err, 2e-2);
  EXPECT_GT(err, 0.0) << "bf16 did not engage";
}
