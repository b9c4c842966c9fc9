// sedd-train end to end under real mpirun: rank-count equivalence, learning, options, resume.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/shard.h"
#include "distributed/communicator.h"
#include "io/fs.h"
#include "io/hdf5.h"
#include "model/weights.h"
#include "train/checkpoint.h"
#include "recipes.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

// Random-token shards with some structure (repeated motifs) so the loss can move.
std::string make_data(const TempDir& tmp, int64_t vocab = 40) {
  torch::manual_seed(7);
  for (int i = 0; i < 2; ++i) {
    auto motif = torch::randint(vocab - 1, {37});
    auto tokens = torch::cat({motif.repeat({60}), torch::randint(vocab - 1, {900})});
    write_shard(tmp / fmt::format("d{}.h5", i), tokens, vocab, vocab - 1, "byte");
  }
  return tmp / "d*.h5";
}

std::string train_cmd(int np, const std::string& data, const std::string& dir, const std::string& extra,
                      int hidden = 32) {
  return tiny_sedd()
      .set("model.hidden_size", hidden)
      .set("train.ema", "0.9")
      .set("train.bucket_elems", 4000)
      .command(np, data, dir, extra);
}

}  // namespace

// docs/DESIGN.md, "Distribution": W ranks with batch B/W each give the same weights as 1 rank with batch B.
TEST(TrainEquivalence, SameWeightsOnOneTwoAndFourRanks) {
  TempDir tmp;
  std::string data = make_data(tmp);
  std::string out;
  for (const char* accum : {"", "--train.micro_batch_size 1"}) {
    std::map<int, StateDict> weights, emas;
    std::map<int, torch::Tensor> moments;
    std::map<int, std::vector<nlohmann::json>> logs;
    for (int np : {1, 2, 4}) {
      std::string dir = tmp / fmt::format("run{}{}", np, accum[0] ? "acc" : "");
      ASSERT_EQ(run(train_cmd(np, data, dir, std::string("--train.steps 5 --train.precision fp64 ") + accum), &out), 0)
          << out;
      weights[np] = run_weights(dir);
      emas[np] = run_weights(dir, "/ema");
      moments[np] = checkpoint_moments(dir);
      logs[np] = run_metrics(dir);
    }
    // docs/cluster.md: W ranks match 1 rank in float64 to 1e-12. model.h5 stores float32 weights, so the float64
    // state is compared through the Adam moments (saved in float64, a function of every step's
    // gradients) and the logged float64 loss and gradient norm of every step. They are not bit for
    // bit equal: another rank count sums the batch in another order, which moves the last bits
    // (measured: moments 1e-17 apart, relative ~1e-15; losses and gradient norms a few ulps). The
    // bound, 1e-12 relative, is a thousand times that and far below any real difference (a
    // mis-keyed draw or a lost micro-batch moves them by 1e-3 or more). The float32 weights and EMA
    // round to the same bits (measured), one float32 ulp allowed.
    ASSERT_EQ(moments[1].scalar_type(), torch::kDouble);
    for (int np : {2, 4}) {
      double d = max_abs_diff(weights[1], weights[np]), e = max_abs_diff(emas[1], emas[np]);
      double dm = moments_rel_diff(moments[1], moments[np]), dl = 0;
      ASSERT_EQ(logs[1].size(), logs[np].size());
      for (size_t i = 0; i < logs[1].size(); ++i)
        for (const char* key : {"loss", "grad_norm"}) {
          const double x = logs[1][i][key].get<double>(), y = logs[np][i][key].get<double>();
          dl = std::max(dl, std::abs(x - y) / std::abs(x));
        }
      std::cout << "W=" << np << (accum[0] ? " with accumulation" : "") << ": max |dw| = " << d << ", EMA " << e
                << "; float64 Adam moments " << dm << ", losses and gradient norms " << dl << " (relative)\n";
      EXPECT_LE(d, 1e-6) << "W=" << np << " " << accum;
      EXPECT_LE(e, 1e-6) << "W=" << np << " " << accum;
      EXPECT_LE(dm, 1e-12) << "W=" << np << " " << accum;
      EXPECT_LE(dl, 1e-12) << "W=" << np << " " << accum;
    }
    // The run moved away from its initial weights (seed 0), so the comparison means something.
    h5::File f(resolve_model_file(tmp / "run1"), h5::Mode::Read);
    torch::manual_seed(0);
    DDiT init(read_model_config(f, "/"));
    StateDict init_sd;
    for (auto& [k, v] : state_dict(*init)) init_sd[k] = v.detach();
    EXPECT_GT(max_abs_diff(weights[1], init_sd), 1e-3);
  }
}

TEST(TrainLearning, TwoRanksLowerTheLossOnTheDemoCorpus) {
  TempDir tmp;
  std::string out;
  ASSERT_EQ(run(fmt::format("SEDD_BUILD={}/.. bash {}/datasets/make_demo.sh {}", bin_dir(), source_dir(), tmp / "demo"),
                &out), 0) << out;
  std::string cmd = fmt::format(
      "cd {} && {} -np 2 {}/sedd-train --config {}/configs/tiny.ini --run.dir {} --data.train '{}' --data.valid '{}' "
      "--train.steps 150 --train.eval_every 150 --train.ckpt_every 0",
      source_dir(), kMpirun, bin_dir(), source_dir(), tmp / "run", tmp / "demo/train/*.h5", tmp / "demo/valid/*.h5");
  ASSERT_EQ(run(cmd, &out), 0) << out;
  auto rows = run_metrics(tmp / "run");
  ASSERT_GE(rows.size(), 10u);
  double first = rows.front()["loss"].get<double>();
  double last = 0;
  for (size_t i = rows.size() - 3; i < rows.size(); ++i) last += rows[i]["loss"].get<double>() / 3;
  std::cout << "loss " << first << " -> " << last << " nats/token\n";
  EXPECT_LT(last, first - 1.0) << "the loss did not drop clearly";
  ASSERT_TRUE(rows.back().contains("valid_loss"));
  EXPECT_LT(rows.back()["valid_loss"].get<double>(), first - 0.5);
  for (const char* key : {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"})
    EXPECT_TRUE(rows.back().contains(key)) << key;
}

TEST(TrainOptions, BadConfigsGetOneClearErrorAndExitCode2) {
  TempDir tmp;
  std::string data = make_data(tmp);
  std::ofstream(tmp / "typo.ini") << "[train]\nlrr = 3e-4\n";
  std::string out;
  auto sedd_train = [&](int np, const std::string& args) {
    return run(fmt::format("{} -np {} {}/sedd-train {}", kMpirun, np, bin_dir(), args), &out);
  };
  EXPECT_EQ(sedd_train(1, "--config " + (tmp / "typo.ini")), 2);
  EXPECT_NE(out.find("typo.ini"), std::string::npos) << out;
  EXPECT_NE(out.find("train.lrr"), std::string::npos) << out;
  EXPECT_EQ(sedd_train(1, "--train.bogus 1"), 2);
  EXPECT_NE(out.find("train.bogus"), std::string::npos) << out;
  EXPECT_EQ(sedd_train(2, fmt::format("--data.train '{}' --train.batch_size 7", data)), 2);
  EXPECT_NE(out.find("train.batch_size (7) must be divisible by the number of ranks (2)"), std::string::npos) << out;
  EXPECT_EQ(sedd_train(1, fmt::format("--data.train '{}' --train.batch_size 8 --train.micro_batch_size 3", data)), 2);
  EXPECT_NE(out.find("micro_batch_size"), std::string::npos) << out;
  EXPECT_EQ(sedd_train(1, fmt::format("--data.train '{}' --run.device cpu --train.precision bf16", data)), 2);
  EXPECT_NE(out.find("bf16 needs a GPU"), std::string::npos) << out;
  EXPECT_EQ(sedd_train(1, fmt::format("--data.train '{}' --diffusion.graph uniform --model.scale_by_sigma true", data)),
            2);
  EXPECT_NE(out.find("scale_by_sigma"), std::string::npos) << out;
  // Missing data is bad input too: exit 2 on 2 ranks (not MPI_Abort's 1).
  EXPECT_EQ(sedd_train(2, fmt::format("--data.train '{}' --train.steps 2", tmp / "nothing*.h5")), 2);
  EXPECT_NE(out.find("matches no shard files"), std::string::npos) << out;
}

TEST(TrainCheckpoint, AnotherModelShapeIsRefusedAndTheCheckpointKept) {
  TempDir tmp;
  std::string data = make_data(tmp);
  std::string out, dir = tmp / "run";
  ASSERT_EQ(run(train_cmd(1, data, dir, "--train.steps 2"), &out), 0) << out;
  auto before = fs::read_text(dir + "/checkpoints/latest");
  EXPECT_EQ(run(train_cmd(1, data, dir, "--train.steps 4", /*hidden=*/64), &out), 2);
  EXPECT_NE(out.find("model.hidden_size: checkpoint 32, now 64"), std::string::npos) << out;
  EXPECT_EQ(fs::read_text(dir + "/checkpoints/latest"), before);
  EXPECT_TRUE(std::filesystem::exists(dir + "/checkpoints/step_2/model.h5"));
  // A damaged (truncated) model.h5 in the latest checkpoint: refused, naming the file.
  std::string model = dir + "/checkpoints/step_2/model.h5";
  std::filesystem::resize_file(model, std::filesystem::file_size(model) / 3);
  EXPECT_NE(run(train_cmd(1, data, dir, "--train.steps 4"), &out), 0);
  EXPECT_NE(out.find(model), std::string::npos) << out;
  EXPECT_NE(out.find("truncated"), std::string::npos) << out;
  EXPECT_EQ(fs::read_text(dir + "/checkpoints/latest"), before);
}

// A non-finite loss (injected on rank 0 at step 4) skips that step on every rank, is reported,
// and never reaches the weights, the EMA or the checkpoint.
TEST(TrainFaults, NonFiniteLossIsSkippedAndNeverReachesTheWeights) {
  TempDir tmp;
  std::string data = make_data(tmp), out, dir = tmp / "run";
  ASSERT_EQ(run(train_cmd(2, data, dir, "--train.steps 8 --debug.nan_at_step 4"), &out), 0) << out;
  EXPECT_NE(out.find("SKIPPED (non-finite)"), std::string::npos) << out;
  auto rows = run_metrics(dir);
  ASSERT_EQ(rows.size(), 8u);
  EXPECT_EQ(rows[3]["step"].get<int64_t>(), 4);
  EXPECT_EQ(rows[3].value("skipped", int64_t{0}), 1);
  for (size_t i = 0; i < rows.size(); ++i)
    if (i != 3) EXPECT_TRUE(std::isfinite(rows[i]["loss"].get<double>())) << "step " << i + 1;
  for (const char* group : {"/model", "/ema"})
    for (const auto& [k, v] : run_weights(dir, group))
      EXPECT_TRUE(torch::isfinite(v).all().item<bool>()) << group << "/" << k << " holds non-finite values";
  // The optimizer counted 7 updates in 8 steps.
  h5::File f(dir + "/checkpoints/step_8/optim/rank_0.h5", h5::Mode::Read);
  EXPECT_EQ(f.attr_int("/", "adam_steps"), 7);
}

namespace {
// The GPU life cycle's training command: bf16 on cuda:0 through the NCCL communicator.
std::string gpu_train_cmd(const std::string& data, const std::string& dir, int64_t steps, const std::string& extra = "") {
  return tiny_sedd()
      .set("run.device", "cuda")
      .set("train.precision", "bf16")
      .set("data.seq_len", 32)
      .set("model.hidden_size", 64)
      .set("model.cond_dim", 32)
      .set("train.batch_size", 16)
      .set("train.steps", steps)
      .set("train.warmup", 5)
      .set("train.ckpt_every", 10)
      .command(1, data, dir, extra);
}
}  // namespace

// The whole life of a GPU run: bf16 training with NCCL (mpirun -np 1), loss going down,
// checkpoint, SIGUSR1 -> exit 3, resume with the same losses, NaN skip, then sample and evaluate
// the GPU-trained checkpoint on the GPU.
TEST(TrainGpu, LifeCycleOnGpuTrainCheckpointPreemptResumeSampleEval) {
  if (!nccl_available()) GTEST_SKIP() << "no CUDA device (or a build without NCCL)";
  if (auto why = gpu_children_unavailable(); !why.empty()) GTEST_SKIP() << why;
  TempDir tmp;
  std::string data = make_data(tmp), out;
  const int64_t steps = 60;
  std::string straight = tmp / "straight";
  ASSERT_EQ(run(gpu_train_cmd(data, straight, steps), &out), 0) << out;
  EXPECT_NE(out.find("(nccl collectives)"), std::string::npos) << out;
  auto a = run_metrics(straight);
  ASSERT_EQ(a.size(), static_cast<size_t>(steps));
  EXPECT_TRUE(a.back().contains("mfu")) << "GPU runs report model FLOPs utilisation";
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) first += a[i]["loss"].get<double>() / 5, last += a[steps - 1 - i]["loss"].get<double>() / 5;
  std::cout << "GPU bf16 loss " << first << " -> " << last << "\n";
  EXPECT_LT(last, first - 0.3);

  // Pre-empt with SIGUSR1 after a checkpoint, resume, and compare per-step losses.
  std::string cut = tmp / "cut", bg = tmp / "bg";
  std::filesystem::create_directories(bg);
  std::system(fmt::format("( {} > {}/log 2>&1; echo $? > {}/rc ) &", gpu_train_cmd(data, cut, steps), bg, bg).c_str());
  for (int i = 0; i < 1200 && !std::filesystem::exists(cut + "/checkpoints/step_20"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::system(fmt::format("pkill -USR1 -f '^{}/sedd-train .*{}'", bin_dir(), cut).c_str());
  for (int i = 0; i < 1200 && !std::filesystem::exists(bg + "/rc"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_TRUE(std::filesystem::exists(bg + "/rc")) << "the pre-empted GPU run did not stop";
  EXPECT_EQ(std::stoi(fs::read_text(bg + "/rc")), 3) << fs::read_text(bg + "/log");
  ASSERT_EQ(run(gpu_train_cmd(data, cut, steps), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  auto b = run_metrics(cut);
  ASSERT_EQ(b.size(), a.size());
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double x = a[i]["loss"].get<double>(), y = b[i]["loss"].get<double>();
    worst = std::max(worst, std::abs(x - y) / std::abs(x));
  }
  std::cout << "GPU resume: worst per-step loss difference " << worst << " (relative)\n";
  // Keyed draws and a deterministic resume: equal up to bf16 kernel non-determinism.
  EXPECT_LE(worst, 1e-2);

  // A NaN at step 5 on the GPU: skipped, never in the saved weights.
  std::string nan_dir = tmp / "nan";
  ASSERT_EQ(run(gpu_train_cmd(data, nan_dir, 10, "--debug.nan_at_step 5"), &out), 0) << out;
  EXPECT_NE(out.find("SKIPPED"), std::string::npos) << out;
  for (const auto& [k, v] : run_weights(nan_dir)) EXPECT_TRUE(torch::isfinite(v).all().item<bool>()) << k;

  // Sample and evaluate the GPU-trained checkpoint on the GPU.
  ASSERT_EQ(run(fmt::format("{} -np 1 {}/sedd-sample --checkpoint {} --device cuda --num-samples 4 --steps 32 --out {}",
                            kMpirun, bin_dir(), cut, tmp / "s.jsonl"),
                &out),
            0)
      << out;
  EXPECT_EQ(std::count(std::istreambuf_iterator<char>(*std::make_unique<std::ifstream>(tmp / "s.jsonl")), {}, '\n'), 4);
  ASSERT_EQ(run(fmt::format("{} -np 1 {}/sedd-eval --checkpoint {} --device cuda --data '{}' --mc-samples 8 "
                            "--max-sequences 32 --json {}",
                            kMpirun, bin_dir(), cut, data, tmp / "e.json"),
                &out),
            0)
      << out;
  auto e = nlohmann::json::parse(fs::read_text(tmp / "e.json"));
  EXPECT_EQ(e["precision"], "bf16");
  EXPECT_TRUE(std::isfinite(e["nats_per_token"].get<double>()));
  EXPECT_LT(e["nats_per_token"].get<double>(), std::log(40.0) + 0.5);
}

// The in-process recipe runner (tests/recipes.h) is sedd-train on one rank: the same losses and
// the same weights, bit for bit, as the executable under mpirun.
TEST(TrainRecipe, InProcessRunEqualsTheExecutable) {
  TempDir tmp;
  const std::string data = make_data(tmp);
  const Recipe recipe = exact_tiny().set("train.steps", 3);
  std::string out;
  ASSERT_EQ(run(recipe.command(1, data, tmp / "exe"), &out), 0) << out;
  ASSERT_EQ(train_in_process(recipe, data, tmp / "in"), 3);
  const auto a = run_metrics(tmp / "exe"), b = run_metrics(tmp / "in");
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), a.size());
  for (size_t k = 0; k < a.size(); ++k) EXPECT_EQ(a[k]["loss"].get<double>(), b[k]["loss"].get<double>()) << "step " << k + 1;
  EXPECT_EQ(max_abs_diff(run_weights(tmp / "exe"), run_weights(tmp / "in")), 0.0);
  EXPECT_EQ(max_abs_diff(run_weights(tmp / "exe", "/ema"), run_weights(tmp / "in", "/ema")), 0.0);
  // a bad setting is reported as sedd-train reports it
  std::string why = "<no error>";
  try {
    train_in_process(recipe, data, tmp / "bad", "--train.batch_size 0");
  } catch (const std::exception& e) {
    why = e.what();
  }
  EXPECT_NE(why.find("train.batch_size"), std::string::npos) << why;
}

// Decoupled weight decay acts on matrices only: after one step with and without decay (the same
// gradients), biases, LayerNorm and modulation vectors and the token embedding are identical, and
// every other matrix differs.
TEST(TrainDecay, WeightDecayTouchesOnlyMatrices) {
  TempDir tmp;
  std::string data = make_data(tmp), out;
  for (const char* wd : {"0", "0.5"})
    ASSERT_EQ(run(train_cmd(1, data, tmp / fmt::format("wd{}", wd),
                            fmt::format("--train.steps 1 --train.precision fp64 --train.weight_decay {}", wd)),
                  &out),
              0)
        << out;
  auto a = run_weights(tmp / "wd0"), b = run_weights(tmp / "wd0.5");
  int decayed = 0, kept = 0;
  for (const auto& [name, v] : a) {
    if (name.find("inv_freq") != std::string::npos) continue;  // a buffer
    bool matrix = v.dim() >= 2 && name != "vocab_embed.embedding";
    double d = (v - b.at(name)).abs().max().item<double>();
    // The adaLN and output layers start at zero, where decay has nothing to act on in one step.
    bool zero_init = name.find("adaLN_modulation") != std::string::npos || name.rfind("output_layer.linear", 0) == 0;
    if (matrix && !zero_init) {
      EXPECT_GT(d, 0.0) << name << " was not decayed";
      ++decayed;
    } else if (!matrix) {
      EXPECT_EQ(d, 0.0) << name << " was decayed";
      ++kept;
    }
  }
  EXPECT_GT(decayed, 4);
  EXPECT_GT(kept, 4);
}
