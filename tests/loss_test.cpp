// The fused, masked-rows output loss against the plain path (full logits, then the loss).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>

#include "diffusion/keyed_random.h"
#include "diffusion/times.h"
#include "objectives/output_loss.h"
#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "distributed/watchdog.h"
#include "distributed/zero.h"
#include "objectives/mdlm.h"
#include "objectives/rows.h"
#include "objectives/sedd.h"
#include "model/weights.h"
#include "test_util.h"

#ifdef SEDD_HAVE_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

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

namespace {

// The uniform score entropy (output_loss.h) of logits s [R, N] in out-of-place ops, so that
// autograd differentiates it (row_loss_from_logits zeroes the current token's exp in place).
torch::Tensor uniform_score_entropy(const torch::Tensor& s, const OutputLossRows& r) {
  const double n = static_cast<double>(s.size(1));
  auto others = torch::ones_like(s).scatter(1, r.current.unsqueeze(1), 0.0);
  auto M = (torch::exp(s) * others).sum(1) / n, m = (s * others).sum(1) / n;
  auto s_x0 = s.gather(1, r.target.unsqueeze(1)).squeeze(1);
  auto stay = M - r.b * m + (n - 1) / n * r.b * (r.b.log() - 1);
  auto move = M - (r.a * s_x0 + m) + ((-r.b.log() - 1) / r.b - (n - 2)) / n;
  return torch::where(r.target == r.current, stay, move);
}

}  // namespace

// The fused loss pads the token columns to a multiple of 8 (aligned rows for cuBLASLt); the
// padding columns take no part: with unaligned vocabularies (37, GPT-2's 50257) every row loss and
// the gradients of features, weight and bias equal the unpadded full-logits reference to 1e-12 in
// float64, over several chunks, and the weight's extra (mask) row gets no gradient.
TEST(FusedLossPadding, UnalignedVocabulariesEqualTheUnpaddedReference) {
  for (int64_t N : {37, 50257}) {
    torch::manual_seed(N);
    const int64_t R = N < 1000 ? 23 : 7, D = 12;
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    auto rand_rows = [&] {
      OutputLossRows rows;
      rows.target = torch::randint(N, {R}, torch::kLong);
      rows.current = torch::where(torch::rand({R}) < 0.4, rows.target, torch::randint(N, {R}, torch::kLong));
      rows.a = torch::rand({R}, opts) + 0.2;
      rows.b = torch::rand({R}, opts) * 0.8 + 0.1;
      return rows;
    };
    for (auto kind : {RowLoss::SeddAbsorb, RowLoss::SeddUniform, RowLoss::CrossEntropy}) {
      auto rows = rand_rows();
      // N + 1 weight rows, as the absorbing graph's mask column; N columns scored.
      auto features = (torch::randn({R, D}, opts) * 0.5).requires_grad_();
      auto weight = (torch::randn({N + 1, D}, opts) * 0.5).requires_grad_();
      auto bias = torch::randn({N + 1}, opts).requires_grad_();
      // Three rows per chunk: several chunks, the last one short.
      auto ours = fused_output_loss(kind, features, weight, bias, rows, N, false, 3 * N);
      ours.sum().backward();
      std::vector<torch::Tensor> g{features.grad().clone(), weight.grad().clone(), bias.grad().clone()};
      for (auto* t : {&features, &weight, &bias}) t->mutable_grad().zero_();
      auto logits = torch::addmm(bias.narrow(0, 0, N), features, weight.narrow(0, 0, N).t());  // [R, N]
      auto ref = row_loss_from_logits(kind, logits, rows, N);
      if (kind == RowLoss::SeddUniform) {
        auto differentiable = uniform_score_entropy(logits, rows);
        EXPECT_LT(rel_err(differentiable.detach(), ref.detach()), 1e-12) << "the test's uniform loss";
        ref = differentiable;
      }
      ref.sum().backward();
      const auto name = fmt::format("vocabulary {}, loss {}", N, static_cast<int>(kind));
      EXPECT_LT(rel_err(ours.detach(), ref.detach()), 1e-12) << name;
      EXPECT_LT(rel_err(g[0], features.grad()), 1e-12) << name;
      EXPECT_LT(rel_err(g[1], weight.grad()), 1e-12) << name;
      EXPECT_LT(rel_err(g[2], bias.grad()), 1e-12) << name;
      EXPECT_EQ(g[1].sizes(), weight.sizes()) << name;
      EXPECT_EQ(g[1][N].abs().sum().item<double>(), 0.0) << name << ": the mask row got a gradient";
      EXPECT_EQ(g[2][N].item<double>(), 0.0) << name;
      EXPECT_TRUE(torch::isfinite(ours).all().item<bool>()) << name;
    }
  }
}

// The padding lives inside the fused loss only: after a fused training step on an unaligned
// vocabulary, the output layer, its gradient and the weight file keep the true shape.
TEST(FusedLossPadding, WeightFileKeepsTheTrueShape) {
  auto cfg = config("absorb", true);
  cfg.tokens = 37;  // 38 output rows with the mask
  auto m = random_model(cfg, torch::kDouble);
  auto g = make_graph(cfg.graph, cfg.tokens);
  auto noise = make_noise(cfg.noise);
  auto b = make_batch(*g, *noise, 4, cfg.length);
  loss_and_grads(m, *g, *noise, b, true, 50);
  const auto& linear = m->output_layer->linear;
  const std::vector<int64_t> shape{cfg.vocab_dim(), cfg.hidden_size};
  EXPECT_EQ(linear->weight.sizes().vec(), shape);
  EXPECT_EQ(linear->weight.grad().sizes().vec(), shape);
  EXPECT_EQ(linear->bias.grad().size(0), cfg.vocab_dim());
  test::TempDir tmp;
  const std::string path = tmp / "model.h5";
  save_model_file(path, cfg, state_dict(*m), {}, {});
  DDiT back = load_model_file(path, false);
  auto sd = state_dict(*back);
  EXPECT_EQ(sd.at("output_layer.linear.weight").sizes().vec(), shape);
  EXPECT_EQ(sd.at("output_layer.linear.bias").size(0), cfg.vocab_dim());
  EXPECT_TRUE(torch::allclose(sd.at("output_layer.linear.weight").to(torch::kDouble), linear->weight.detach(), 0, 1e-6));
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

// The bf16 fused loss keeps its logits in float32 (bf16 operands, float32 accumulation, the bias
// added in float32). Against a float64 reference on the same bf16-rounded operands every row's loss
// is within 1e-4 (relative); logits rounded to bf16 before exp/log (2^-9 |s| at |s| = 8..16) miss
// that tolerance by far, which the test checks too so that it can tell the two apart.
TEST(FusedLossGpu, Bf16LossKeepsItsLogitsInFloat32) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::manual_seed(21);
  const int64_t R = 256, D = 64, V = 300;
  auto f = torch::randn({R, D});
  f = f / f.norm(2, {1}, true);                                 // unit rows
  auto w = torch::randn({V, D}) * 8.0, bias = torch::randn({V});  // logits ~ N(0, 64): |s| up to ~25
  auto f_b = f.to(torch::kBFloat16).to(torch::kDouble), w_b = w.to(torch::kBFloat16).to(torch::kDouble);
  auto logits = torch::addmm(bias.to(torch::kDouble), f_b, w_b.t());
  const double tol = 1e-4;
  for (auto kind : {RowLoss::SeddAbsorb, RowLoss::CrossEntropy}) {
    OutputLossRows rows;
    rows.target = torch::randint(V, {R}, torch::kLong);
    rows.a = torch::zeros({R});
    rows.b = torch::full({R}, 0.5);
    auto ref = row_loss_from_logits(kind, logits, rows, V);
    auto rounded = row_loss_from_logits(kind, logits.to(torch::kBFloat16).to(torch::kDouble), rows, V);
    OutputLossRows dev{rows.target.cuda(), {}, rows.a.cuda(), rows.b.cuda()};
    auto ours = fused_output_loss(kind, f.cuda(), w.cuda(), bias.cuda(), dev, V, /*low_precision=*/true, 40 * V)
                    .cpu()
                    .to(torch::kDouble);
    const double err = test::max_rel_error(ours, ref, 1.0), rounded_err = test::max_rel_error(rounded, ref, 1.0);
    const char* name = kind == RowLoss::SeddAbsorb ? "score entropy" : "cross entropy";
    std::cout << name << ": bf16 fused loss error " << err << ", with bf16-rounded logits " << rounded_err << "\n";
    EXPECT_LT(err, tol) << name;
    EXPECT_GT(rounded_err, 10 * tol) << name << ": the test cannot tell rounded logits apart";
  }
}

// On the GPU the masked rows are gathered without nonzero(): in float32 the fused loss and its
// gradients equal the CPU's (same rows, summation order aside).
TEST(FusedLossGpu, MaskedRowsOnTheGpuGiveTheCpuLoss) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (bool scale : {true, false}) {
    auto cfg = config("absorb", scale);
    auto m = random_model(cfg, torch::kFloat);
    auto g = make_graph(cfg.graph, cfg.tokens);
    auto noise = make_noise(cfg.noise);
    auto b = make_batch(*g, *noise, 6, cfg.length);
    auto cpu = loss_and_grads(m, *g, *noise, b, true, 50);
    m->to(torch::kCUDA);
    auto gpu = loss_and_grads(m, *g, *noise, Batch{b.x0.cuda(), b.xt.cuda(), b.t.cuda()}, true, 50);
    EXPECT_LT(rel_err(gpu.first.cpu(), cpu.first), 1e-5) << "scale_by_sigma " << scale;
    for (size_t i = 0; i < cpu.second.size(); ++i)
      EXPECT_LT(rel_err(gpu.second[i].cpu(), cpu.second[i]), 1e-4) << "parameter " << i;
  }
}

namespace {

#ifdef SEDD_HAVE_CUDA
// The child of TrainingStepsDoNotSynchronise: one rank with NCCL and the watchdog as sedd-train
// runs it, training steps as Trainer::run makes them (two micro-batches, keyed draws and dropout,
// the fused loss and kernels, bf16, ZeRO-1). Step 1 warms up (the fused-op self-check, allocator,
// cuBLAS); steps 2..N run with c10's sync debug mode set to error, so any call that makes the host
// wait for the device (item(), nonzero(), a blocking copy, a stream synchronisation) throws.
void train_steps_without_sync() {
  auto& rt = test::child_runtime("cuda");
  Watchdog dog(60, rt.rank, rt.host);
  auto comm = make_nccl_communicator(rt.device.index(), &dog);
  const int64_t B = 8, L = 64, steps = 5;
  const uint64_t seed = 3;
  for (std::string objective : {"sedd", "mdlm", "d3pm"}) {
    auto cfg = config("absorb", objective == "sedd");
    cfg.objective = objective;
    cfg.tokens = 500;
    cfg.hidden_size = 64;
    cfg.length = L;
    cfg.dropout = 0.1;
    cfg.timesteps = 100;
    auto m = random_model(cfg, torch::kFloat);
    m->to(rt.device);
    m->bf16 = true;
    auto g = make_graph(cfg.graph, cfg.tokens);
    auto noise = make_noise(cfg.noise);
    std::vector<ParamSpec> params;
    for (auto& p : m->named_parameters()) params.push_back({p.key(), p.value(), p.value().dim() >= 2});
    AdamWConfig ac;
    ac.bucket_elems = 1 << 14;
    ShardedAdamW opt(std::move(params), *comm, ac);
    LossOptions lo;
    lo.chunk_elems = 1 << 14;
    std::vector<torch::Tensor> batches;  // pinned host batches, as the data reader hands them over
    for (int64_t s = 0; s < steps; ++s) batches.push_back(torch::randint(cfg.tokens, {B, L}, torch::kLong).pin_memory());
    torch::Tensor loss_sum;
    for (int64_t step = 1; step <= steps; ++step) {
      if (step == 2) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
      auto x0 = batches[step - 1].to(rt.device, /*non_blocking=*/true);
      auto loss = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(rt.device));
      for (int64_t first = 0; first < B; first += B / 2) {
        if (first + B / 2 >= B) opt.overlap_next_backward();
        auto rows = torch::arange(first, first + B / 2, torch::TensorOptions().dtype(torch::kLong).device(rt.device));
        auto u = time_uniforms("stratified", seed, step, rows, B);
        LossDraws draws{seed, static_cast<uint64_t>(step), rows, u};
        DropoutKey key{seed, static_cast<uint64_t>(step), rows};
        auto total = training_loss(m, *g, *noise, x0.narrow(0, first, B / 2), draws, &key, lo).sum();
        (total * (1.0 / B)).backward();
        loss += total.detach().to(torch::kDouble);
      }
      loss_sum = opt.step(1e-3, loss).loss_sum;
    }
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
    const double last = loss_sum.item<double>();
    std::cout << objective << ": steps 2.." << steps << " queued without a host synchronisation; last loss " << last
              << "\n";
    EXPECT_TRUE(std::isfinite(last)) << objective;
  }
}
#endif

}  // namespace

// Item of the step contract: after the first step, a training step never makes the host wait for
// the device (the masked rows' count is the one planned wait, on an event behind the corruption,
// which c10's sync debug mode does not count). Runs in a child process: MPI and NCCL of their own.
TEST(FusedLossGpu, TrainingStepsDoNotSynchronise) {
  if (!nccl_available()) GTEST_SKIP() << "no CUDA device or no NCCL in this build";
  if (auto why = test::gpu_children_unavailable(); !why.empty()) GTEST_SKIP() << why;
#ifdef SEDD_HAVE_CUDA
  if (std::getenv("SEDD_SYNC_CHILD")) {
    train_steps_without_sync();
    return;
  }
  std::string out;
  int rc = test::run(fmt::format("env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE SEDD_SYNC_CHILD=1 {} "
                                 "--gtest_filter=FusedLossGpu.TrainingStepsDoNotSynchronise",
                                 "/proc/" + std::to_string(::getpid()) + "/exe"),
                     &out);
  std::cout << out;
  EXPECT_EQ(rc, 0) << "a training step synchronised with the device (or failed); see the child's output above";
  EXPECT_NE(out.find("d3pm: steps 2..5 queued without a host synchronisation"), std::string::npos);
#endif
}
