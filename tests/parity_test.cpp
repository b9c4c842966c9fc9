// Step parity with the authors' SEDD, MDLM and discrete flow matching trainers (docs/DESIGN.md,
// "Step parity"). sedd-parity replays the steps of tests/data/sedd_step_reference.h5,
// mdlm_step_reference.h5 and dfm_step_reference.h5 (written by the authors' code from our data,
// initial weights and draws: tests/data/make_sedd_step_reference.py, make_mdlm_step_reference.py,
// make_dfm_step_reference.py) with our trainer in float64, and every compared quantity must agree
// to 1e-12 relative: the first step alone, 50 steps with the masked-rows fused loss on 1 and 2 ranks
// (ZeRO-1 shards), and 50 steps with full logits; the MDLM trainer's 10 steps (warm-up from lr 0,
// clipping, AdamW, EMA) and Meta's flow matching trainer's 10 steps (generalized KL, cosine
// schedule, clipping, AdamW) likewise.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/hdf5.h"
#include "test_util.h"

namespace sedd {
namespace {

using test::bin_dir;
using test::kMpirun;

std::string step_reference() { return test::source_dir() + "/tests/data/sedd_step_reference.h5"; }
std::string mdlm_step_reference() { return test::source_dir() + "/tests/data/mdlm_step_reference.h5"; }
std::string dfm_step_reference() { return test::source_dir() + "/tests/data/dfm_step_reference.h5"; }

struct ParityRun {
  int rc = -1;
  std::string output;
  nlohmann::json report;
};

ParityRun parity(int ranks, const std::string& args, const std::string& reference = step_reference()) {
  test::TempDir dir;
  ParityRun r;
  r.rc = test::run(fmt::format("SEDD_CORES=2 {} -np {} {}/sedd-parity compare --reference {} --json {} {}", kMpirun,
                               ranks, bin_dir(), reference, dir / "report.json", args),
                   &r.output);
  if (std::filesystem::exists(dir / "report.json")) r.report = nlohmann::json::parse(std::ifstream(dir / "report.json"));
  return r;
}

// Every quantity of the step, compared as often as the reference allows, within 1e-12.
// `law_differences`: the parameters whose initialisation law is known to differ from the reference
// trainer's (sedd-parity's list, each name after a space; it then exits 1 with the steps equal).
void expect_equal_steps(const ParityRun& r, int64_t steps, int64_t snapshots, const std::string& law_differences = "") {
  ASSERT_EQ(r.rc, law_differences.empty() ? 0 : 1) << r.output;
  ASSERT_TRUE(r.report.is_object()) << r.output;
  EXPECT_TRUE(r.report["ok"].get<bool>()) << r.output;
  EXPECT_EQ(r.report["steps"].get<int64_t>(), steps);
  EXPECT_EQ(r.report["init_laws_differ"].get<std::string>(), law_differences) << r.output;
  const auto& q = r.report["quantities"];
  const int64_t params = q["initial_weights"]["compared"].get<int64_t>();
  EXPECT_EQ(params, 30) << "every parameter tensor of the 2-block model";
  for (const char* per_step : {"loss", "grad_norm", "clip_coef", "lr", "time_draws", "batches_and_mask_draws"})
    EXPECT_EQ(q[per_step]["compared"].get<int64_t>(), steps) << per_step;
  for (const char* full : {"gradient", "clipped_gradient", "update", "params", "ema"})
    EXPECT_EQ(q[full]["compared"].get<int64_t>(), snapshots * params) << full;
  for (const auto& [name, stat] : q.items())
    EXPECT_LE(stat["max_rel_error"].get<double>(), 1e-12) << name << " at step " << stat["worst_step"];
  // Draws and data are integers and uniforms handed over exactly: no rounding at all.
  EXPECT_EQ(q["batches_and_mask_draws"]["max_rel_error"].get<double>(), 0.0);
  EXPECT_EQ(q["time_draws"]["max_rel_error"].get<double>(), 0.0);
  EXPECT_EQ(q["data_windows"]["max_rel_error"].get<double>(), 0.0);
  EXPECT_EQ(q["initial_weights"]["max_rel_error"].get<double>(), 0.0);
}

TEST(StepParity, ReferenceCoversClippingWarmupAndEveryParameter) {
  h5::File f(step_reference(), h5::Mode::Read);
  auto clip = f.read("/authors/clip_coef", torch::kDouble), lr = f.read("/authors/lr", torch::kDouble);
  EXPECT_LT(clip.min().item<double>(), 1.0) << "some steps must clip";
  EXPECT_EQ(clip.max().item<double>(), 1.0) << "some steps must not clip";
  // Warm-up: lr rises as step / warmup (steps 1..10 of 3e-3) and holds from step 10 on; steps
  // 1..warmup+1 are all compared.
  EXPECT_NEAR(lr[0].item<double>(), 3e-4, 1e-18);
  EXPECT_NEAR(lr[9].item<double>(), 3e-3, 1e-18);
  EXPECT_NEAR(lr[10].item<double>(), 3e-3, 1e-18);
  EXPECT_GE(lr.size(0), 11);
  EXPECT_TRUE(f.exists("/authors/step_000001/gradient"));
  EXPECT_TRUE(f.has_attr("/", "source"));
}

TEST(StepParity, FirstStepEqualsTheAuthorsStep) {
  expect_equal_steps(parity(1, "--steps 1"), 1, 1);
  expect_equal_steps(parity(1, "--steps 1 --fused-loss false"), 1, 1);
}

TEST(StepParity, FiftyStepsWithTheFusedLossOnOneAndTwoRanks) {
  expect_equal_steps(parity(1, ""), 50, 4);
  expect_equal_steps(parity(2, ""), 50, 4);  // ZeRO-1: each rank owns half of every bucket
}

TEST(StepParity, FiftyStepsWithFullLogits) { expect_equal_steps(parity(2, "--fused-loss false"), 50, 4); }

// ZeRO-2 (each rank keeps only its gradient shard, buckets freed once reduced) is the same step.
TEST(StepParity, FiftyStepsWithZeroStageTwoOnTwoRanks) {
  const auto r = parity(2, "--zero-stage 2");
  expect_equal_steps(r, 50, 4);
  EXPECT_EQ(r.report["zero_stage"].get<int64_t>(), 2);
}

// Gradient accumulation (2 micro-batches of 2 rows on each of 2 ranks) is the same step as the
// authors' one batch of 8.
TEST(StepParity, GradientAccumulationGivesTheSameSteps) {
  expect_equal_steps(parity(2, "--micro-batch-size 2 --steps 11"), 11, 3);
}

// The check finds a difference, and names the first step and quantity where it appears.
TEST(StepParity, AFirstDifferenceIsFoundAndNamed) {
  test::TempDir dir;
  const std::string changed = dir / "changed.h5";
  std::filesystem::copy_file(step_reference(), changed);
  {
    h5::File f(changed, h5::Mode::ReadWrite);
    auto g = f.read("/authors/step_000011/gradient", torch::kDouble);
    g[5] += 1e-9 * g.norm();  // one gradient element of step 11
    f.overwrite("/authors/step_000011/gradient", g);
    auto lr = f.read("/authors/lr", torch::kDouble);
    lr[29] *= 1 + 1e-10;  // the learning rate of step 30
    f.overwrite("/authors/lr", lr);
  }
  auto r = parity(1, "", changed);
  EXPECT_EQ(r.rc, 1) << r.output;
  ASSERT_TRUE(r.report.is_object()) << r.output;
  EXPECT_FALSE(r.report["ok"].get<bool>());
  EXPECT_EQ(r.report["first_failure"]["step"].get<int64_t>(), 11);
  EXPECT_EQ(r.report["first_failure"]["quantity"].get<std::string>(), "gradient");
  EXPECT_GT(r.report["quantities"]["lr"]["max_rel_error"].get<double>(), 1e-12);
  EXPECT_EQ(r.report["quantities"]["lr"]["worst_step"].get<int64_t>(), 30);
  EXPECT_NE(r.output.find("FIRST DIFFERENCE: step 11, gradient"), std::string::npos) << r.output;
}

// The MDLM reference: their constant_warmup starts at lr 0 (step k at (k-1)/warmup), some steps
// clip at their gradient_clip_val = 1 and some do not, their loss is per token; and our run that
// produced it was given only diffusion.objective = mdlm: its recipe came from the defaults.
TEST(StepParity, MdlmReferenceCoversWarmupFromZeroClippingAndTheDefaults) {
  h5::File f(mdlm_step_reference(), h5::Mode::Read);
  auto clip = f.read("/authors/clip_coef", torch::kDouble), lr = f.read("/authors/lr", torch::kDouble);
  EXPECT_LT(clip.min().item<double>(), 1.0) << "some steps must clip";
  EXPECT_EQ(clip.max().item<double>(), 1.0) << "some steps must not clip";
  ASSERT_EQ(lr.size(0), 10);
  EXPECT_EQ(lr[0].item<double>(), 0.0);
  EXPECT_NEAR(lr[1].item<double>(), 3e-3 / 4, 1e-18);
  EXPECT_NEAR(lr[4].item<double>(), 3e-3, 1e-18);
  EXPECT_NEAR(lr[3].item<double>(), 3e-3 * 3 / 4, 1e-18);
  EXPECT_EQ(f.attr_string("/authors", "loss_per"), "token");
  const std::string settings = f.attr_string("/", "settings");
  for (const char* line : {"time_conditioning  = false        # mdlm default",
                           "scale_by_sigma     = false        # mdlm default",
                           "time_sampling      = stratified   # mdlm default",
                           "warmup_from_zero   = true         # mdlm default",
                           "loss_mean          = token        # mdlm default"})
    EXPECT_NE(settings.find(line), std::string::npos) << line << "\n" << settings;
  EXPECT_TRUE(f.exists("/authors/step_000001/update"));
}

TEST(StepParity, MdlmStepsEqualTheAuthorsSteps) {
  expect_equal_steps(parity(1, "", mdlm_step_reference()), 10, 4);
  expect_equal_steps(parity(2, "--fused-loss false", mdlm_step_reference()), 10, 4);
}

// The flow matching reference (Meta's examples/text trainer): their lr warms up as k / warmup (step
// 1 at lr / 4) and then follows a cosine down to 0.1 lr at the last step; some steps clip at their
// grad_clip = 1 and some do not; their loss is the generalized KL's mean over the B L positions; the
// path samples hold both masked and data tokens at times below 1 - 1e-3. Our run was given only
// diffusion.objective = dfm of the objective's recipe (the rest from its defaults), and the options
// that make our trainer theirs: cosine schedule, no EMA, beta2 0.95, no weight decay.
TEST(StepParity, DfmReferenceCoversCosineScheduleClippingBothPathStatesAndTheDefaults) {
  h5::File f(dfm_step_reference(), h5::Mode::Read);
  auto clip = f.read("/authors/clip_coef", torch::kDouble), lr = f.read("/authors/lr", torch::kDouble);
  EXPECT_LT(clip.min().item<double>(), 1.0) << "some steps must clip";
  EXPECT_EQ(clip.max().item<double>(), 1.0) << "some steps must not clip";
  ASSERT_EQ(lr.size(0), 10);
  EXPECT_NEAR(lr[0].item<double>(), 3e-3 / 4, 1e-18);
  EXPECT_NEAR(lr[3].item<double>(), 3e-3, 1e-18);
  EXPECT_NEAR(lr[6].item<double>(), 3e-4 + 2.7e-3 * 0.5 * (1 + std::cos(M_PI * 3 / 6)), 1e-17);  // half-way
  EXPECT_NEAR(lr[9].item<double>(), 3e-4, 1e-18);
  EXPECT_EQ(f.attr_string("/authors", "loss_per"), "token");
  auto x1 = f.read("/steps/x0", torch::kLong), xt = f.read("/steps/xt", torch::kLong), t = f.read("/steps/t", torch::kDouble);
  const int64_t mask = f.attr_int("/data", "vocab_size");
  EXPECT_TRUE(((xt == x1) | (xt == mask)).all().item<bool>()) << "x_t is the data token or the mask";
  EXPECT_GT((xt == mask).sum().item<int64_t>(), 0);
  EXPECT_GT((xt == x1).sum().item<int64_t>(), 0);
  EXPECT_LT(t.max().item<double>(), 1 - 1e-3);
  const std::string settings = f.attr_string("/", "settings");
  for (const char* line : {"objective          = dfm\n", "source             = mask         # dfm default",
                           "kappa_power        = 1            # dfm default",
                           "dfm_loss           = generalized_kl # dfm default",
                           "time_conditioning  = true         # dfm default",
                           "time_sampling      = iid          # dfm default",
                           "warmup_from_zero   = false        # dfm default",
                           "loss_mean          = token        # dfm default", "schedule           = cosine\n",
                           "min_lr_ratio       = 0.1\n", "beta2              = 0.95\n", "weight_decay       = 0\n",
                           "ema                = 0\n"})
    EXPECT_NE(settings.find(line), std::string::npos) << line << "\n" << settings;
  EXPECT_TRUE(f.exists("/authors/step_000001/update"));
  // Their text model's vocab_embed is a torch.nn.Embedding, N(0, 1); ours is SEDD's
  // kaiming_uniform_(a = sqrt 5), U(-1/sqrt(D), 1/sqrt(D)) (docs/DESIGN.md, "Step parity").
  auto embed = f.read("/init_law/vocab_embed.embedding", torch::kDouble);
  EXPECT_NEAR(embed.std().item<double>(), 1.0, 0.1);
}

// Known difference: the embedding's initialisation law (above); the steps themselves start from the
// same recorded weights.
TEST(StepParity, DfmStepsEqualTheAuthorsSteps) {
  expect_equal_steps(parity(1, "", dfm_step_reference()), 10, 4);
  expect_equal_steps(parity(2, "--fused-loss false", dfm_step_reference()), 10, 4);
}

TEST(StepParity, ANonReferenceFileIsRefusedNamingIt) {
  auto r = parity(1, "", test::golden_path());  // an HDF5 file without /authors
  EXPECT_EQ(r.rc, 2) << r.output;
  EXPECT_NE(r.output.find(test::golden_path() + ": not a parity reference"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace sedd
