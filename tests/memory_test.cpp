// Activation checkpointing, the memory plan and long sequences: checkpointed gradients equal the
// plain ones bit for bit, sedd-train --plan's figures are consistent and fit, L = 2048 trains,
// samples and evaluates.
#include <gtest/gtest.h>

#include <ATen/autocast_mode.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>

#ifdef SEDD_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "data/shard.h"
#include "model/ddit.h"
#include "test_util.h"
#include "train/config.h"
#include "train/memory_plan.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// A tiny float64 model with every weight random (the zero-initialised adaLN layers would make the
// blocks identities and the comparison weak).
DDiT memtest_model(ModelConfig cfg) {
  torch::manual_seed(3);
  DDiT m(cfg);
  m->to(torch::kDouble);
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.normal_(0, 0.3);
  m->train();
  return m;
}

// Gradients of every parameter and of the token embedding's output path, for one forward+backward
// of a fixed objective with keyed dropout.
std::map<std::string, torch::Tensor> memtest_grads(DDiT& m, int64_t checkpoint_every, uint64_t dropout_seed = 5) {
  m->checkpoint_every = checkpoint_every;
  m->zero_grad();
  torch::manual_seed(11);
  const int64_t B = 3, L = 12;
  auto idx = torch::randint(m->cfg.vocab_dim(), {B, L});
  auto sigma = torch::rand({B}, torch::kDouble) + 0.1;
  DropoutKey key{dropout_seed, 9, torch::arange(10, 10 + B)};
  auto out = m->forward(idx, sigma, &key);
  auto w = torch::randn(out.sizes(), torch::kDouble);
  (out * w).sum().backward();
  std::map<std::string, torch::Tensor> g;
  for (auto& p : m->named_parameters()) g[p.key()] = p.value().grad().clone();
  return g;
}

// CPU autocast to bf16 for the guard's lifetime.
struct CpuAutocast {
  CpuAutocast() {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
    at::autocast::increment_nesting();
  }
  ~CpuAutocast() {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCPU, false);
  }
};

// memtest_grads of a float32 model (autocast leaves float64 alone) with CPU autocast around the
// forward only, or around the backward only.
std::map<std::string, torch::Tensor> memtest_autocast_grads(DDiT& m, int64_t checkpoint_every, bool autocast_forward) {
  m->checkpoint_every = checkpoint_every;
  m->zero_grad();
  torch::manual_seed(11);
  const int64_t B = 3, L = 12;
  auto idx = torch::randint(m->cfg.vocab_dim(), {B, L});
  auto sigma = torch::rand({B}) + 0.1;
  DropoutKey key{5, 9, torch::arange(10, 10 + B)};
  torch::Tensor out;
  {
    std::optional<CpuAutocast> autocast;
    if (autocast_forward) autocast.emplace();
    out = m->forward(idx, sigma, &key);
  }
  auto loss = (out * torch::randn(out.sizes())).sum();
  {
    std::optional<CpuAutocast> autocast;
    if (!autocast_forward) autocast.emplace();
    loss.backward();
  }
  std::map<std::string, torch::Tensor> g;
  for (auto& p : m->named_parameters()) g[p.key()] = p.value().grad().clone();
  return g;
}

// The checkpointing tests' model: 20 tokens, 16 wide, 2 heads, cond 8.
ModelConfig memtest_config(int64_t n_blocks, double dropout) {
  ModelConfig cfg;
  cfg.tokens = 20;
  cfg.hidden_size = 16;
  cfg.n_heads = 2;
  cfg.n_blocks = n_blocks;
  cfg.cond_dim = 8;
  cfg.dropout = dropout;
  return cfg;
}

std::string memtest_data(const TempDir& tmp, int64_t vocab, int64_t tokens) {
  torch::manual_seed(7);
  for (int i = 0; i < 2; ++i) {
    auto motif = torch::randint(vocab - 1, {37});
    auto body = torch::cat({motif.repeat({tokens / 74}), torch::randint(vocab - 1, {tokens / 2})});
    write_shard(tmp / fmt::format("d{}.h5", i), body, vocab, vocab - 1, "byte");
  }
  return tmp / "d*.h5";
}

}  // namespace

TEST(CheckpointingSetting, ParsesNoneBlocksAndEveryK) {
  EXPECT_EQ(checkpoint_interval("none"), 0);
  EXPECT_EQ(checkpoint_interval("blocks"), 1);
  EXPECT_EQ(checkpoint_interval("every:3"), 3);
  for (const char* bad : {"every:0", "every:", "every:2x", "all", ""})
    EXPECT_NE(error_of([&] { checkpoint_interval(bad); }).find("train.activation_checkpointing"), std::string::npos)
        << bad;
}

// docs/DESIGN.md, "Activation checkpointing": the recomputed blocks redraw the same keyed dropout
// masks, so every gradient equals the plain path's to the last bit (float64, CPU).
TEST(CheckpointingGradients, BitIdenticalToThePlainPathWithDropout) {
  struct Variant {
    const char* name;
    ModelConfig cfg;
  };
  std::vector<Variant> variants;
  const ModelConfig base = memtest_config(3, 0.3);
  variants.push_back({"sedd", base});
  ModelConfig no_time = base;
  no_time.time_conditioning = false;
  variants.push_back({"sedd without time conditioning", no_time});
  ModelConfig ar = base;
  ar.objective = "ar";
  ar.scale_by_sigma = false;
  ar.time_conditioning = false;
  variants.push_back({"ar (causal)", ar});
  for (auto& v : variants) {
    DDiT m = memtest_model(v.cfg);
    auto plain = memtest_grads(m, 0);
    for (int64_t k : {1, 2}) {
      auto ckpt = memtest_grads(m, k);
      ASSERT_EQ(ckpt.size(), plain.size());
      for (const auto& [name, g] : plain) {
        ASSERT_TRUE(ckpt[name].defined()) << v.name << " " << name;
        EXPECT_TRUE(torch::equal(ckpt[name], g)) << v.name << " every:" << k << " " << name << " differs by "
                                                 << (ckpt[name] - g).abs().max().item<double>();
      }
    }
    // Dropout is on and matters: another dropout key gives other gradients.
    auto other = memtest_grads(m, 1, 6);
    EXPECT_FALSE(torch::equal(other.at("blocks.0.attn_qkv.weight"), plain.at("blocks.0.attn_qkv.weight"))) << v.name;
  }
}

// The recomputation runs under the forward's autocast state whatever the state around backward:
// a forward without autocast and a backward inside a CPU bf16 autocast region (the recomputation
// must switch autocast off), and a forward under autocast with a backward outside it (it must
// switch autocast on). Either way the gradients equal the plain path's bit for bit.
TEST(CheckpointingGradients, RecomputationKeepsTheForwardsAutocastState) {
  DDiT m = memtest_model(memtest_config(3, 0.3));
  m->to(torch::kFloat);
  for (bool autocast_forward : {false, true}) {
    const char* name = autocast_forward ? "autocast in forward" : "autocast in backward";
    auto plain = memtest_autocast_grads(m, 0, autocast_forward);
    for (int64_t k : {1, 2}) {
      auto ckpt = memtest_autocast_grads(m, k, autocast_forward);
      ASSERT_EQ(ckpt.size(), plain.size());
      for (const auto& [param, g] : plain) {
        ASSERT_TRUE(ckpt[param].defined()) << name << " " << param;
        EXPECT_TRUE(torch::equal(ckpt[param], g)) << name << ", every:" << k << " " << param << " differs by "
                                                  << (ckpt[param] - g).abs().max().item<double>();
      }
    }
    EXPECT_FALSE(at::autocast::is_autocast_enabled(at::kCPU)) << name << ": autocast left on";
  }
  // Autocast matters here: the forward under it gives other gradients.
  auto off = memtest_autocast_grads(m, 0, false), on = memtest_autocast_grads(m, 0, true);
  EXPECT_FALSE(torch::equal(off.at("blocks.0.attn_qkv.weight"), on.at("blocks.0.attn_qkv.weight")));
}

// Checkpointing keeps only the blocks' inputs: a graph without the blocks' intermediate tensors.
TEST(CheckpointingGradients, OffWithoutGradAndOutputUnchanged) {
  const ModelConfig cfg = memtest_config(2, 0.0);
  DDiT m = memtest_model(cfg);
  auto idx = torch::randint(cfg.vocab_dim(), {2, 8});
  auto sigma = torch::full({2}, 0.5, torch::kDouble);
  auto plain = m->forward(idx, sigma);
  m->checkpoint_every = 1;
  auto ckpt = m->forward(idx, sigma);
  EXPECT_TRUE(torch::equal(plain, ckpt));
  EXPECT_TRUE(ckpt.requires_grad());
  torch::NoGradGuard ng;
  EXPECT_FALSE(m->forward(idx, sigma).requires_grad());
}

// The trainer's path (fused masked-rows loss, ZeRO hooks on the gradient accumulators, gradient
// accumulation, dropout): a run with checkpointing logs the same float64 losses and gradient norms
// as one without, bit for bit, and ends with the same Adam moments.
TEST(CheckpointingTraining, SameLossesBitForBitInFp64) {
  TempDir tmp;
  std::string data = memtest_data(tmp, 40, 3000), out;
  std::map<std::string, std::vector<nlohmann::json>> logs;
  std::map<std::string, torch::Tensor> moments;
  for (const char* setting : {"none", "blocks", "every:2"}) {
    std::string dir = tmp / fmt::format("run-{}", std::string(setting) == "every:2" ? "every2" : setting);
    std::string cmd = fmt::format(
        "{} -np 2 {}/sedd-train --data.train '{}' --run.dir {} --run.device cpu --data.seq_len 16 "
        "--model.hidden_size 32 --model.n_heads 2 --model.n_blocks 3 --model.cond_dim 16 --model.dropout 0.2 "
        "--train.batch_size 8 --train.micro_batch_size 2 --train.steps 4 --train.lr 3e-3 --train.warmup 2 "
        "--train.log_every 1 --train.precision fp64 --train.bucket_elems 4000 --train.activation_checkpointing {}",
        kMpirun, bin_dir(), data, dir, setting);
    ASSERT_EQ(run("SEDD_CORES=1 " + cmd, &out), 0) << out;
    logs[setting] = run_metrics(dir);
    moments[setting] = checkpoint_moments(dir);
  }
  ASSERT_EQ(logs["none"].size(), 4u);
  for (const char* setting : {"blocks", "every:2"}) {
    ASSERT_EQ(logs[setting].size(), logs["none"].size());
    for (size_t i = 0; i < logs["none"].size(); ++i)
      for (const char* key : {"loss", "grad_norm"})
        EXPECT_EQ(logs[setting][i][key].get<double>(), logs["none"][i][key].get<double>())
            << setting << " step " << i + 1 << " " << key;
    EXPECT_TRUE(torch::equal(moments[setting], moments["none"])) << setting;
  }
  // The loss moved: the comparison covers real updates.
  EXPECT_NE(logs["none"].front()["loss"].get<double>(), logs["none"].back()["loss"].get<double>());
}

TEST(MemoryPlanParameters, SizesMatchTheBuiltModel) {
  ModelConfig a;
  a.tokens = 37;
  a.hidden_size = 24;
  a.n_heads = 2;
  a.n_blocks = 3;
  a.cond_dim = 10;
  ModelConfig u = a;
  u.graph = "uniform";
  u.scale_by_sigma = false;
  ModelConfig ar = a;
  ar.objective = "ar";
  ar.scale_by_sigma = false;
  ar.time_conditioning = false;
  for (const auto& cfg : {a, u, ar}) {
    DDiT m(cfg);
    std::vector<int64_t> built;
    for (const auto& p : m->named_parameters()) built.push_back(p.value().numel());
    EXPECT_EQ(ddit_parameter_sizes(cfg), built) << cfg.objective << " " << cfg.graph;
  }
}

// The plan's state figures follow ShardedAdamW's layout: checked against a real optimizer's byte
// counts through the trainer's own log line (parameters, gradient buffer per rank).
TEST(MemoryPlanFigures, ConsistentAndCheckpointingAndZero2Shrink) {
  TrainingConfig c;
  c.data.train = "x";
  c.data.seq_len = 64;
  c.model.tokens = 100;
  c.model.hidden_size = 64;
  c.model.n_heads = 4;
  c.model.n_blocks = 4;
  c.train.batch_size = 8;
  c.train.bucket_elems = 20000;
  c.plan.memory_gb = 1;
  int64_t sum = 0;
  for (int64_t n : ddit_parameter_sizes(c.model)) sum += n;
  for (int world : {1, 2, 4}) {
    MemoryPlan z1 = plan_memory(c, world, false, 0);
    c.train.zero_stage = 2;
    MemoryPlan z2 = plan_memory(c, world, false, 0);
    c.train.zero_stage = 1;
    EXPECT_EQ(z1.parameters, sum);
    EXPECT_EQ(z1.param_bytes, 4 * z1.flat_elems);
    EXPECT_GE(z1.flat_elems, sum);
    EXPECT_EQ(z1.flat_elems, z1.shard_elems * world);
    EXPECT_EQ(z1.moment_bytes, 2 * 4 * z1.shard_elems);
    EXPECT_EQ(z1.ema_bytes, 4 * z1.shard_elems);
    EXPECT_EQ(z1.grad_bytes, 4 * (z1.flat_elems + z1.shard_elems));
    EXPECT_LT(z1.activation_checkpointed_bytes, z1.activation_plain_bytes);
    EXPECT_EQ(z1.total_bytes(), z1.state_bytes() + z1.activation_bytes);
    if (world > 1) EXPECT_LT(z2.grad_bytes, z1.grad_bytes) << world;
    // The largest micro-batch is the largest that fits.
    TrainingConfig more = c;
    more.train.batch_size = z1.largest_micro_batch * world;
    EXPECT_LE(static_cast<double>(plan_memory(more, world, false, 0).total_bytes()), 1e9);
    more.train.batch_size = (z1.largest_micro_batch + 1) * world;
    EXPECT_GT(static_cast<double>(plan_memory(more, world, false, 0).total_bytes()), 1e9);
  }
}

namespace {
nlohmann::json memtest_plan(const std::string& config, const std::string& extra, std::string* out) {
  const std::string cmd = fmt::format(
      "{}/sedd-train --config {}/configs/{} --plan --plan.world_size 8 --plan.memory_gb 80 --plan.vocab 50257 {} 2>&1",
      bin_dir(), source_dir(), config, extra);
  EXPECT_EQ(run(cmd, out), 0) << cmd << "\n" << *out;
  std::smatch m;
  static const std::regex json_line(R"(\[plan\] json (\{.*\}))");
  if (!std::regex_search(*out, m, json_line)) return nlohmann::json::object();
  return nlohmann::json::parse(m[1].str());
}
}  // namespace

// sedd-train --plan on the shipped configs: SEDD-medium fits an 80 GB GPU at the paper's batch
// (512 x 1024 over 8 ranks) with ZeRO-1 and ZeRO-2 and checkpointing, the 1B config with
// checkpointing and ZeRO-2; the figures are consistent with the model the config builds.
TEST(MemoryPlanConfigs, MediumAnd1bFitAn80GbGpuAtEightRanks) {
  TempDir tmp;
  std::string out;
  for (const char* config : {"sedd-medium.ini", "sedd-1b.ini"}) {
    std::map<std::string, nlohmann::json> plans;
    for (const char* stage : {"1", "2"})
      for (const char* ckpt : {"none", "blocks"})
        plans[std::string(stage) + ckpt] =
            memtest_plan(config,
                         fmt::format("--train.zero_stage {} --train.activation_checkpointing {} --run.dir {}", stage,
                                     ckpt, tmp / "never"),
                         &out);
    const auto& p = plans["2blocks"];
    ASSERT_TRUE(p.contains("parameters")) << out;
    ModelConfig mc;
    mc.tokens = 50257;
    mc.hidden_size = p["hidden_size"];
    mc.n_heads = p["n_heads"];
    mc.n_blocks = p["n_blocks"];
    mc.cond_dim = p["cond_dim"];
    int64_t sum = 0;
    for (int64_t n : ddit_parameter_sizes(mc)) sum += n;
    EXPECT_EQ(p["parameters"].get<int64_t>(), sum) << config;
    EXPECT_EQ(p["param_bytes"].get<int64_t>(), 4 * p["flat_elems"].get<int64_t>()) << config;
    EXPECT_EQ(p["micro_batch"].get<int64_t>() * 8 * (64 / p["micro_batch"].get<int64_t>()), 512) << config;
    EXPECT_EQ(p["seq_len"].get<int64_t>(), 1024);
    EXPECT_LT(plans["2blocks"]["grad_bytes"].get<int64_t>(), plans["1blocks"]["grad_bytes"].get<int64_t>()) << config;
    EXPECT_LT(plans["1blocks"]["activation_bytes"].get<int64_t>(), plans["1none"]["activation_bytes"].get<int64_t>());
    for (const auto& [k, v] : plans) {
      int64_t parts = 0;
      for (const char* f : {"param_bytes", "grad_bytes", "moment_bytes", "ema_bytes", "master_bytes",
                            "autocast_weight_bytes", "reserve_bytes", "activation_bytes"})
        parts += v[f].get<int64_t>();
      EXPECT_EQ(v["total_bytes"].get<int64_t>(), parts) << config << " " << k;
      EXPECT_EQ(v["fits"].get<bool>(), v["total_bytes"].get<double>() <= 80e9) << config << " " << k;
    }
    EXPECT_TRUE(plans["2blocks"]["fits"].get<bool>()) << config;
    if (std::string(config) == "sedd-medium.ini") {
      EXPECT_TRUE(plans["1blocks"]["fits"].get<bool>());
      EXPECT_NEAR(p["parameters"].get<double>(), 4.24e8, 0.01e8);
    } else {
      EXPECT_GE(p["parameters"].get<double>(), 1e9);
      EXPECT_LE(p["parameters"].get<double>(), 1.3e9);
      EXPECT_FALSE(plans["2none"]["fits"].get<bool>());  // the plan tells checkpointing is what makes it fit
    }
  }
  EXPECT_FALSE(std::filesystem::exists(tmp / "never")) << "--plan must not create the run folder";
  // Without data at hand and without plan.vocab: one clear error, exit 2.
  int rc = run(fmt::format("{}/sedd-train --config {}/configs/sedd-medium.ini --plan --plan.memory_gb 80 2>&1",
                           bin_dir(), source_dir()),
               &out);
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("plan.vocab"), std::string::npos) << out;
}

// Long sequences at a small width: L = 2048 and 4096 train with checkpointing (the run prints its
// memory plan), sample and evaluate; the rotary tables follow the length.
TEST(LongContext, TrainsSamplesAndEvaluatesAt2048And4096) {
  TempDir tmp;
  std::string data = memtest_data(tmp, 40, 40000), out;
  for (int64_t L : {2048, 4096}) {
    const std::string dir = tmp / fmt::format("run{}", L);
    ASSERT_EQ(run(fmt::format("SEDD_CORES=2 {} -np 1 {}/sedd-train --data.train '{}' --run.dir {} --run.device cpu "
                              "--data.seq_len {} --model.hidden_size 32 --model.n_heads 2 --model.n_blocks 2 "
                              "--model.cond_dim 16 --train.batch_size 2 --train.steps 2 --train.log_every 1 "
                              "--train.activation_checkpointing blocks",
                              kMpirun, bin_dir(), data, dir, L),
                  &out),
              0)
        << out;
    EXPECT_NE(out.find("[plan] memory per rank: 1 ranks"), std::string::npos) << out;
    EXPECT_NE(out.find(fmt::format("micro-batch 2 x {} tokens", L)), std::string::npos) << out;
    auto rows = run_metrics(dir);
    ASSERT_EQ(rows.size(), 2u);
    EXPECT_TRUE(std::isfinite(rows.back()["loss"].get<double>()));
    ASSERT_EQ(run(fmt::format("SEDD_CORES=2 {} -np 1 {}/sedd-sample --checkpoint {} --device cpu --num-samples 1 "
                              "--steps 4 --out {}",
                              kMpirun, bin_dir(), dir, tmp / "s.jsonl"),
                  &out),
              0)
        << out;
    std::ifstream in(tmp / "s.jsonl");
    std::string line;
    ASSERT_TRUE(std::getline(in, line));
    EXPECT_EQ(nlohmann::json::parse(line)["ids"].size(), static_cast<size_t>(L));
    if (L == 2048) {
      ASSERT_EQ(run(fmt::format("SEDD_CORES=2 {} -np 1 {}/sedd-eval --checkpoint {} --device cpu --data '{}' "
                                "--mc-samples 2 --max-sequences 2 --json {}",
                                kMpirun, bin_dir(), dir, data, tmp / "e.json"),
                    &out),
                0)
          << out;
      std::ifstream ej(tmp / "e.json");
      auto e = nlohmann::json::parse(ej);
      const double nats = e["datasets"][0]["nats_per_token"].get<double>();
      EXPECT_TRUE(std::isfinite(nats) && nats > 0) << e.dump();
      EXPECT_EQ(e["datasets"][0]["tokens"].get<int64_t>(), 2 * L) << e.dump();
    }
  }
}

namespace {
// Gradients (flattened, float64) of a random objective on CUDA, and the step's peak allocation.
torch::Tensor memtest_gpu_grads(DDiT& m, int64_t checkpoint_every, bool bf16, double* peak_bytes) {
  m->checkpoint_every = checkpoint_every;
  m->bf16 = bf16;
  m->zero_grad();
  torch::manual_seed(11);
  const int64_t B = 4, L = 256;
  auto idx = torch::randint(m->cfg.vocab_dim(), {B, L}).to(torch::kCUDA);
  auto sigma = (torch::rand({B}) + 0.1).to(torch::kCUDA);
  DropoutKey key{5, 9, torch::arange(10, 10 + B).to(torch::kCUDA)};
  auto w = torch::randn({B, L, m->cfg.vocab_dim()}).to(torch::kCUDA);
  torch::cuda::synchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  const double base = static_cast<double>(c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current);
  (m->forward(idx, sigma, &key) * w).sum().backward();
  torch::cuda::synchronize();
  *peak_bytes = static_cast<double>(c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak) - base;
  std::vector<torch::Tensor> g;
  for (auto& p : m->parameters()) g.push_back(p.grad().flatten().to(torch::kCPU, torch::kDouble));
  return torch::cat(g);
}
}  // namespace

// On a GPU the recomputation runs under the forward's autocast state and with the fused kernels:
// checkpointed gradients match the plain ones far closer than bf16 differs from fp32, and the
// step's peak allocation shrinks.
TEST(CheckpointingGpu, AutocastAndFusedKernelsInTheRecomputation) {
#ifdef SEDD_HAVE_CUDA
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  ModelConfig cfg;
  cfg.tokens = 50;
  cfg.hidden_size = 128;
  cfg.n_heads = 4;
  cfg.n_blocks = 4;
  cfg.cond_dim = 32;
  cfg.dropout = 0.2;
  torch::manual_seed(3);
  DDiT m(cfg);
  {
    torch::NoGradGuard ng;
    for (auto& p : m->parameters()) p.normal_(0, 0.1);
  }
  m->to(torch::kCUDA);
  m->train();
  double peak_plain = 0, peak_ckpt = 0, unused = 0;
  auto fp32 = memtest_gpu_grads(m, 0, false, &unused);
  auto fp32_ckpt = memtest_gpu_grads(m, 1, false, &unused);
  auto bf16 = memtest_gpu_grads(m, 0, true, &peak_plain);
  auto bf16_ckpt = memtest_gpu_grads(m, 1, true, &peak_ckpt);
  auto rel = [](const torch::Tensor& a, const torch::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
  const double d32 = rel(fp32_ckpt, fp32), d16 = rel(bf16_ckpt, bf16), precision_gap = rel(bf16, fp32);
  std::cout << "GPU (fused kernels " << (m->uses_fused_kernels(torch::Device(torch::kCUDA, 0)) ? "on" : "off")
            << "): checkpointed vs plain gradient, relative: fp32 " << d32 << ", bf16 " << d16
            << "; bf16 vs fp32 " << precision_gap << "; step peak " << peak_plain / 1e6 << " MB plain, "
            << peak_ckpt / 1e6 << " MB checkpointed\n";
  EXPECT_LT(d32, 1e-5);
  EXPECT_GT(precision_gap, 0.0);
  EXPECT_LT(d16, 0.1 * precision_gap) << "the recomputation did not run under the forward's autocast";
  EXPECT_LT(peak_ckpt, 0.8 * peak_plain);
#else
  GTEST_SKIP() << "built without CUDA";
#endif
}
