// ZeRO-2 (train.zero_stage = 2, docs/DESIGN.md "ZeRO-2"): the same run as ZeRO-1 in float64 on 1,
// 2 and 3 ranks with and without gradient accumulation (real mpirun runs of sedd-train); the stage
// may change on resume; and, inside real MPI ranks, a stage-2 rank holds only its gradient shard
// after a step while the non-finite flag, gradient norm, clip factor, EMA and the kept gradient
// are those of stage 1.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "distributed/zero.h"
#include "io/hdf5.h"
#include "model/weights.h"
#include "recipes.h"
#include "test_util.h"
#include "train/checkpoint.h"

using namespace sedd;
using namespace sedd::test;

namespace {

std::string zero2_data(const TempDir& tmp) {
  torch::manual_seed(11);
  for (int i = 0; i < 2; ++i) {
    auto motif = torch::randint(39, {29});
    write_shard(tmp / fmt::format("z{}.h5", i), torch::cat({motif.repeat({50}), torch::randint(39, {800})}), 40, 39,
                "byte");
  }
  return tmp / "z*.h5";
}

// Batch 12: 12, 6 and 4 rows per rank on 1, 2 and 3 ranks; accumulation in micro-batches of 2.
std::string zero2_train(int np, const std::string& data, const std::string& dir, const std::string& extra) {
  return "SEDD_CORES=1 " +
         exact_tiny().set("train.batch_size", 12).set("train.bucket_elems", 3000).command(np, data, dir, extra);
}

// Largest relative difference of the logged float64 loss and gradient norm, step by step.
double zero2_log_diff(const std::vector<nlohmann::json>& a, const std::vector<nlohmann::json>& b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    for (const char* key : {"loss", "grad_norm"}) {
      const double x = a[i][key].get<double>(), y = b[i][key].get<double>();
      worst = std::max(worst, std::abs(x - y) / std::abs(x));
    }
  }
  return worst;
}

// The run folder's float64 state: Adam moments, logged losses, float32 weights and EMA.
struct Zero2Run {
  torch::Tensor moments;
  std::vector<nlohmann::json> log;
  StateDict weights, ema;
};

Zero2Run zero2_read(const std::string& dir) {
  return {checkpoint_moments(dir), run_metrics(dir), run_weights(dir, "/model"), run_weights(dir, "/ema")};
}

// a and b are the same run: float64 moments and losses within 1e-12 relative, float32 weights and
// EMA within one float32 rounding.
void zero2_expect_same(const Zero2Run& a, const Zero2Run& b, const std::string& what) {
  ASSERT_EQ(a.moments.scalar_type(), torch::kDouble);
  const double dm = moments_rel_diff(a.moments, b.moments), dl = zero2_log_diff(a.log, b.log);
  const double dw = max_abs_diff(a.weights, b.weights), de = max_abs_diff(a.ema, b.ema);
  std::cout << what << ": float64 moments " << dm << ", losses and gradient norms " << dl
            << " (relative); float32 weights " << dw << ", EMA " << de << "\n";
  EXPECT_LE(dm, 1e-12) << what;
  EXPECT_LE(dl, 1e-12) << what;
  EXPECT_LE(dw, 1e-6) << what;
  EXPECT_LE(de, 1e-6) << what;
}

}  // namespace

// Stage 2 reduces each bucket into the shard and frees it; with accumulation it either
// reduce-scatters every micro-batch (summing shards instead of full buffers: another rounding
// order, measured ~1e-16) or once. Every step's loss and gradient norm, the Adam moments and the
// weights are those of stage 1.
TEST(ZeroStageEquivalence, StageTwoEqualsStageOneOnOneTwoAndThreeRanks) {
  TempDir tmp;
  const std::string data = zero2_data(tmp);
  std::string out;
  for (int np : {1, 2, 3}) {
    for (const std::string accum : {"", "--train.micro_batch_size 2"}) {
      const std::string tag = fmt::format("W={}{}", np, accum.empty() ? "" : " with accumulation");
      const std::string base = tmp / fmt::format("s1_{}{}", np, accum.size());
      ASSERT_EQ(run(zero2_train(np, data, base, "--train.steps 4 --train.zero_stage 1 " + accum), &out), 0) << out;
      const Zero2Run one = zero2_read(base);
      ASSERT_EQ(one.log.size(), 4u);
      for (const std::string mode : {"micro_batch", "step"}) {
        if (accum.empty() && mode == "step") continue;  // one micro-batch: the two modes are one
        const std::string dir = tmp / fmt::format("s2_{}{}{}", np, accum.size(), mode);
        ASSERT_EQ(run(zero2_train(np, data, dir,
                                  "--train.steps 4 --train.zero_stage 2 --train.zero2_reduce " + mode + " " + accum),
                      &out),
                  0)
            << out;
        EXPECT_NE(out.find("ZeRO-2"), std::string::npos) << out;
        zero2_expect_same(one, zero2_read(dir), tag + ", stage 2 reducing per " + mode);
      }
    }
  }
}

// The optimizer state is the same in both stages (the shard layout is), and zero_stage is not part
// of the run fingerprint: a ZeRO-1 checkpoint continues under ZeRO-2 and back, giving the run that
// continues in its own stage.
TEST(ZeroStageResume, StageChangesOnResumeContinueTheSameRun) {
  TempDir tmp;
  const std::string data = zero2_data(tmp);
  std::string out;
  auto train = [&](const std::string& dir, int stage, int steps) {
    ASSERT_EQ(run(zero2_train(2, data, dir,
                              fmt::format("--train.steps {} --train.zero_stage {} --train.micro_batch_size 3", steps,
                                          stage)),
                  &out),
              0)
        << out;
  };
  train(tmp / "whole", 1, 6);  // uninterrupted
  train(tmp / "p1", 1, 3);
  train(tmp / "p2", 2, 3);
  zero2_expect_same(zero2_read(tmp / "p1"), zero2_read(tmp / "p2"), "3 steps, stage 1 vs stage 2");
  for (const char* from : {"p1", "p2"})
    for (int stage : {1, 2}) {
      const std::string dir = tmp / fmt::format("{}_then{}", from, stage);
      std::filesystem::copy(tmp / from, dir, std::filesystem::copy_options::recursive);
      train(dir, stage, 6);
      EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
    }
  // Resumed in the other stage = resumed in the same stage.
  zero2_expect_same(zero2_read(tmp / "p1_then1"), zero2_read(tmp / "p1_then2"), "ZeRO-1 checkpoint into ZeRO-2");
  zero2_expect_same(zero2_read(tmp / "p2_then2"), zero2_read(tmp / "p2_then1"), "ZeRO-2 checkpoint into ZeRO-1");
  // And the uninterrupted run: model.h5 holds float32 weights, so a resumed float64 run starts
  // from weights rounded to float32 (relative 6e-8); its steps stay that close.
  const Zero2Run whole = zero2_read(tmp / "whole"), resumed = zero2_read(tmp / "p1_then2");
  const auto& a = whole.log, &b = resumed.log;
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_NEAR(a[i]["loss"].get<double>(), b[i]["loss"].get<double>(), 1e-5 * std::abs(a[i]["loss"].get<double>()))
        << "step " << a[i]["step"];
  EXPECT_LE(max_abs_diff(whole.weights, resumed.weights), 1e-4);
}

namespace {

// An eight-layer float64 network on raw tensors: each layer (weight, bias) is one bucket.
std::vector<torch::Tensor> zero2_params(const torch::Device& device) {
  torch::manual_seed(5);  // the same on every rank
  auto o = torch::TensorOptions().dtype(torch::kDouble).device(device);
  std::vector<torch::Tensor> p;
  for (int layer = 0; layer < 8; ++layer) {
    p.push_back(torch::randn({12, 12}, o) * 0.4);
    p.push_back(torch::randn({12}, o) * 0.1);
  }
  for (auto& t : p) t.requires_grad_(true);
  return p;
}

torch::Tensor zero2_loss(const std::vector<torch::Tensor>& p, const torch::Tensor& x) {
  auto h = x;
  for (size_t i = 0; i < p.size(); i += 2) h = torch::tanh(h.matmul(p[i]) + p[i + 1]);
  return h.square().sum();
}

// Every rank's run, compared stage 1 against stage 2 (both accumulation modes).
void zero2_child(Runtime& rt, Communicator& comm) {
  const int W = comm.size(), r = comm.rank(), M = 2;  // micro-batches per step
  AdamWConfig c1;
  c1.bucket_elems = 100;
  c1.grad_clip = 1.0;
  c1.ema = 0.9;
  c1.weight_decay = 0.01;
  AdamWConfig c2a = c1, c2b = c1;
  c2a.zero_stage = c2b.zero_stage = 2;
  c2a.reduce_every_micro_batch = true;
  std::vector<std::vector<torch::Tensor>> params;
  std::vector<std::unique_ptr<ShardedAdamW>> opts;
  for (const auto& c : {c1, c2a, c2b}) {
    params.push_back(zero2_params(rt.device));
    std::vector<ParamSpec> specs;
    for (size_t i = 0; i < params.back().size(); ++i)
      specs.push_back({fmt::format("p{}", i), params.back()[i], params.back()[i].dim() >= 2});
    opts.push_back(std::make_unique<ShardedAdamW>(std::move(specs), comm, c));
    opts.back()->keep_gradient(true);
  }
  ASSERT_EQ(opts[0]->buckets(), 8);
  const int64_t elem = 8, shard_bytes = opts[0]->shard_numel() * elem;
  const int64_t full_bytes = opts[0]->flat_params().numel() * elem;
  EXPECT_EQ(opts[0]->gradient_bytes(), full_bytes + shard_bytes);
  for (int step = 1; step <= 4; ++step) {
    std::vector<StepStats> stats;
    for (size_t k = 0; k < opts.size(); ++k) {
      auto loss = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(rt.device));
      for (int m = 0; m < M; ++m) {
        torch::manual_seed(1000 * step + 10 * r + m);  // this rank's micro-batch
        auto x = torch::randn({3, 12}, torch::TensorOptions().dtype(torch::kDouble)).to(rt.device) * (step == 2 ? 4 : 1);
        opts[k]->begin_backward(m == M - 1);
        auto l = zero2_loss(params[k], x);
        (l / M).backward();
        loss += l.detach();
      }
      if (step == 3 && r == W - 1) loss += std::nan("");  // a non-finite loss on one rank skips the step
      stats.push_back(opts[k]->step(1e-2, loss));
      if (k == 0) continue;
      // After the step a stage-2 rank holds only its shard; no parameter keeps a gradient.
      EXPECT_EQ(opts[k]->gradient_bytes(), shard_bytes) << "stage 2, optimizer " << k;
      for (const auto& p : params[k]) EXPECT_FALSE(p.grad().defined());
    }
    EXPECT_EQ(stats[0].skipped.item<float>(), step == 3 ? 1.0f : 0.0f);
    if (step == 2) EXPECT_LT(stats[0].clip_coef.item<double>(), 1.0) << "step 2 clips";
    const auto g1 = opts[0]->last_gradient();
    const auto e1 = opts[0]->gather_ema();
    for (size_t k = 1; k < opts.size(); ++k) {
      EXPECT_EQ(stats[k].skipped.item<float>(), stats[0].skipped.item<float>());
      if (step != 3) {
        EXPECT_LE(max_rel_error(stats[k].grad_norm, stats[0].grad_norm), 1e-12);
        EXPECT_LE(max_rel_error(stats[k].clip_coef, stats[0].clip_coef), 1e-12);
        EXPECT_LE(max_rel_error(stats[k].loss_sum, stats[0].loss_sum), 1e-12);
        // Normwise: summing shards instead of buffers rounds differently, which an element that
        // cancels to near zero shows at more than 1e-12 of itself.
        const auto g = opts[k]->last_gradient();
        EXPECT_LE(((g - g1).abs().max() / g1.abs().max()).item<double>(), 1e-12) << "step " << step;
      } else {
        opts[k]->last_gradient();  // collective: every rank calls it
      }
      EXPECT_LE(max_rel_error(opts[k]->gather_ema(), e1), 1e-12) << "step " << step;
      for (size_t i = 0; i < params[0].size(); ++i)
        EXPECT_LE(max_rel_error(params[k][i].detach(), params[0][i].detach()), 1e-12) << "step " << step << " p" << i;
    }
  }
  // Peak gradient memory: reducing every micro-batch holds the shard, the two buckets in flight
  // with their receive buffers (the shard already holds a part) and the bucket backward fills;
  // reducing once holds every bucket during accumulation (the full gradient, as stage 1).
  const int64_t peak_every = opts[1]->peak_gradient_bytes(), peak_once = opts[2]->peak_gradient_bytes();
  const int64_t bucket_bytes = full_bytes / 8;  // eight buckets of one size
  EXPECT_LE(peak_every, shard_bytes + 3 * bucket_bytes + 2 * bucket_bytes / W);
  // At W = 1 a receive buffer is a whole bucket (shard + 5 buckets): the half-gradient bound
  // holds from two ranks on.
  if (W >= 2) EXPECT_LE(peak_every, shard_bytes + full_bytes / 2);
  EXPECT_GE(peak_once, shard_bytes + full_bytes);
  std::printf("rank %d of %d: gradient bytes after a step: stage 1 %lld, stage 2 %lld (its shard); peak stage 2 "
              "%lld (reduced every micro-batch), %lld (reduced once)\n",
              r, W, static_cast<long long>(opts[0]->gradient_bytes()),
              static_cast<long long>(opts[1]->gradient_bytes()), static_cast<long long>(peak_every),
              static_cast<long long>(peak_once));
  std::fflush(stdout);
  // discard() drops the step's buckets too.
  opts[1]->begin_backward(true);
  zero2_loss(params[1], torch::ones({2, 12}, torch::TensorOptions().dtype(torch::kDouble).device(rt.device)))
      .backward();
  opts[1]->discard();
  EXPECT_EQ(opts[1]->gradient_bytes(), shard_bytes);
  comm.barrier();
}

// Runs this test binary's `filter` as `np` MPI ranks with `env` set; returns the output.
std::string zero2_ranks(int np, const std::string& env, const std::string& filter) {
  std::string out;
  const int rc = run(fmt::format("{} -np {} -x {} -x SEDD_CORES=1 {} --gtest_filter={}", kMpirun, np, env,
                                 "/proc/" + std::to_string(::getpid()) + "/exe", filter),
                     &out);
  EXPECT_EQ(rc, 0) << out;
  return out;
}

}  // namespace

TEST(ZeroStageShard, StageTwoHoldsOnlyItsGradientShard) {
  if (std::getenv("SEDD_ZERO2_CHILD")) {
    auto& rt = child_runtime("cpu");
    auto comm = make_mpi_communicator();
    zero2_child(rt, *comm);
    return;
  }
  for (int np : {2, 3}) {
    const std::string out =
        zero2_ranks(np, "SEDD_ZERO2_CHILD=1", "ZeroStageShard.StageTwoHoldsOnlyItsGradientShard");
    EXPECT_NE(out.find(fmt::format("rank {} of {}: gradient bytes", np - 1, np)), std::string::npos) << out;
    EXPECT_EQ(out.find("Failure"), std::string::npos) << out;
    std::cout << out.substr(out.find("rank "), std::string::npos).substr(0, 400) << "\n";
  }
}

// The same on one GPU through NCCL (bucket storage from the caching allocator, reductions on the
// communication stream).
TEST(ZeroStageGpu, NcclStageTwoEqualsStageOne) {
  if (!nccl_available()) GTEST_SKIP() << "no CUDA device (or a build without NCCL)";
  if (auto why = gpu_children_unavailable(); !why.empty()) GTEST_SKIP() << why;
  if (std::getenv("SEDD_ZERO2_GPU_CHILD")) {
    auto& rt = child_runtime("cuda");
    auto comm = make_nccl_communicator(rt.device.index());
    zero2_child(rt, *comm);
    return;
  }
  const std::string out = zero2_ranks(1, "SEDD_ZERO2_GPU_CHILD=1", "ZeroStageGpu.NcclStageTwoEqualsStageOne");
  EXPECT_NE(out.find("rank 0 of 1: gradient bytes"), std::string::npos) << out;
}

// sedd-bench-train --bench.zero_stages: per-rank gradient bytes of each stage and their ratios to
// the first stage's, in one run; a stage it does not know is refused (exit 2).
TEST(ZeroStageBench, ReportsPerRankGradientBytesOfEachStage) {
  TempDir tmp;
  std::string out;
  auto bench = [&](const std::string& stages, const std::string& json) {
    return run(fmt::format("TMPDIR={} SEDD_CORES=1 {} -np 2 {}/sedd-bench-train --bench.shapes tiny "
                           "--model.hidden_size 32 --model.n_heads 2 --model.n_blocks 1 --data.seq_len 16 "
                           "--train.batch_size 8 --train.micro_batch_size 2 --train.bucket_elems 2000 --bench.vocab 40 "
                           "--bench.steps 1 --bench.warmup 1 --bench.checkpointing none --bench.zero_stages {} {}",
                           tmp.path, kMpirun, bin_dir(), stages, json),
               &out);
  };
  EXPECT_EQ(bench("1,3", ""), 2) << out;
  EXPECT_NE(out.find("train.zero_stage"), std::string::npos) << out;
  EXPECT_EQ(bench("1,2:sometimes", ""), 2) << out;
  EXPECT_NE(out.find("train.zero2_reduce"), std::string::npos) << out;
  ASSERT_EQ(bench("1,2:micro_batch,2:step", "--json " + (tmp / "z.json")), 0) << out;
  const auto j = nlohmann::json::parse(std::ifstream(tmp / "z.json"));
  ASSERT_EQ(j.size(), 3u) << j;
  EXPECT_EQ(j[0]["zero_stage"], 1);
  EXPECT_EQ(j[1]["zero2_reduce"], "micro_batch");
  EXPECT_EQ(j[2]["zero2_reduce"], "step");
  // Stage 1 holds the full (padded) gradient and its shard, stage 2 the shard: on 2 ranks the
  // shard is half the full gradient, so a third of stage 1's bytes.
  for (int i : {1, 2}) {
    const double after = j[i]["zero_vs_first_stage"]["gradient_mb_per_rank_after_step"].get<double>();
    EXPECT_NEAR(after, 1.0 / 3.0, 1e-9) << j[i];
    EXPECT_EQ(j[i]["zero_vs_first_stage"]["optimizer_state_mb_per_rank"].get<double>(), 1.0);
    EXPECT_GT(j[i]["zero_vs_first_stage"]["tokens_per_s"].get<double>(), 0);
  }
  // Reducing every micro-batch keeps the peak below stage 1's; reducing once holds every bucket
  // during accumulation: the same peak.
  EXPECT_LT(j[1]["zero_vs_first_stage"]["gradient_mb_per_rank_peak"].get<double>(), 1.0) << j[1];
  EXPECT_DOUBLE_EQ(j[2]["zero_vs_first_stage"]["gradient_mb_per_rank_peak"].get<double>(), 1.0) << j[2];
  EXPECT_NE(out.find("tiny/z2:micro_batch/none vs tiny/z1/none: tokens/s x"), std::string::npos) << out;
}
