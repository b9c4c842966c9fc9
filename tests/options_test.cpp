// Training options: every numeric setting is refused with an error naming its key and value
// (NaN and infinity included), the run fingerprint checks the settings the objective uses, and
// each objective's paper settings are the defaults of the keys not given.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "data/token_stream.h"
#include "io/error.h"
#include "io/fs.h"
#include "train/config.h"
#include "train/fingerprint.h"
#include "recipes.h"
#include "test_util.h"

using namespace sedd;
using namespace sedd::test;

namespace {

constexpr double kOptionsNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kOptionsInf = std::numeric_limits<double>::infinity();

TrainingConfig options_good_config() {
  TrainingConfig c;
  c.data.train = "shards/*.h5";  // validate() does not open the data
  return c;
}

struct BadValue {
  const char* key;
  std::function<void(TrainingConfig&)> set;
  std::string shown;  // the value as the message prints it
};

// One case per (key, value): `field` is set to `value` on an otherwise valid config.
template <typename Field>
BadValue option_case(const char* key, Field* (*field)(TrainingConfig&), Field value) {
  return {key, [field, value](TrainingConfig& c) { *field(c) = value; }, fmt::format("{}", value)};
}

#define OPTIONS_FIELD(type, expr) +[](TrainingConfig& c) -> type* { return &c.expr; }

std::vector<BadValue> bad_values() {
  std::vector<BadValue> v;
  auto real = [&](const char* key, double* (*f)(TrainingConfig&), std::initializer_list<double> values) {
    for (double x : values) v.push_back(option_case<double>(key, f, x));
  };
  auto integer = [&](const char* key, int64_t* (*f)(TrainingConfig&), std::initializer_list<int64_t> values) {
    for (int64_t x : values) v.push_back(option_case<int64_t>(key, f, x));
  };
  // The list.
  real("train.weight_decay", OPTIONS_FIELD(double, train.weight_decay), {-0.1, kOptionsNaN, kOptionsInf});
  real("train.adam_eps", OPTIONS_FIELD(double, train.adam_eps), {0.0, -1e-8, kOptionsNaN, kOptionsInf});
  real("train.min_lr_ratio", OPTIONS_FIELD(double, train.min_lr_ratio), {-0.1, 1.5, kOptionsNaN, kOptionsInf});
  real("train.grad_clip", OPTIONS_FIELD(double, train.grad_clip), {kOptionsNaN, kOptionsInf, -kOptionsInf});
  real("diffusion.sigma_max", OPTIONS_FIELD(double, model.noise.sigma_max), {kOptionsInf, kOptionsNaN});
  integer("train.eval_batches", OPTIONS_FIELD(int64_t, train.eval_batches), {0, -1});
  // The other numeric options.
  real("train.lr", OPTIONS_FIELD(double, train.lr), {0.0, -1e-3, kOptionsNaN, kOptionsInf});
  real("train.beta1", OPTIONS_FIELD(double, train.beta1), {-0.1, 1.0, kOptionsNaN});
  real("train.beta2", OPTIONS_FIELD(double, train.beta2), {-0.1, 1.0, 2.0, kOptionsNaN});
  real("train.ema", OPTIONS_FIELD(double, train.ema), {-0.5, 1.0, kOptionsNaN});
  real("diffusion.lambda_ce", OPTIONS_FIELD(double, train.lambda_ce), {-1.0, kOptionsNaN, kOptionsInf});
  real("train.peak_tflops", OPTIONS_FIELD(double, train.peak_tflops), {-1.0, kOptionsNaN, kOptionsInf});
  real("dist.timeout_s", OPTIONS_FIELD(double, dist.timeout_s), {-1.0, kOptionsNaN, kOptionsInf});
  real("diffusion.sigma_min", OPTIONS_FIELD(double, model.noise.sigma_min), {kOptionsInf, kOptionsNaN});
  real("diffusion.eps", OPTIONS_FIELD(double, model.noise.eps), {0.0, 1.0, kOptionsInf, kOptionsNaN});
  real("model.dropout", OPTIONS_FIELD(double, model.dropout), {-0.1, 1.0, kOptionsNaN});
  integer("train.steps", OPTIONS_FIELD(int64_t, train.steps), {0, -5});
  integer("train.batch_size", OPTIONS_FIELD(int64_t, train.batch_size), {0, -8});
  integer("train.micro_batch_size", OPTIONS_FIELD(int64_t, train.micro_batch_size), {-1});
  integer("train.warmup", OPTIONS_FIELD(int64_t, train.warmup), {-1});
  integer("train.log_every", OPTIONS_FIELD(int64_t, train.log_every), {0, -1});
  integer("train.eval_every", OPTIONS_FIELD(int64_t, train.eval_every), {-1});
  integer("train.keep_ckpts", OPTIONS_FIELD(int64_t, train.keep_ckpts), {0});
  integer("train.bucket_elems", OPTIONS_FIELD(int64_t, train.bucket_elems), {0});
  integer("train.loss_chunk_elems", OPTIONS_FIELD(int64_t, train.loss_chunk_elems), {0});
  integer("data.seq_len", OPTIONS_FIELD(int64_t, data.seq_len), {1, 0});
  integer("debug.nan_at_step", OPTIONS_FIELD(int64_t, debug.nan_at_step), {-1});
  v.push_back({"data.prefetch", [](TrainingConfig& c) { c.data.prefetch = -1; }, "-1"});
  return v;
}

#undef OPTIONS_FIELD

}  // namespace

TEST(OptionsValidate, TheDefaultsAndTheEdgesOfEachRangeAreAccepted) {
  EXPECT_EQ(error_of([] { options_good_config().validate(1); }), "<no error>");
  // Values at the edges that mean something: clipping off, no EMA, no decay, a floor of 0 or 1.
  for (const auto& set : std::vector<std::function<void(TrainingConfig&)>>{
           [](TrainingConfig& c) { c.train.grad_clip = 0; },
           [](TrainingConfig& c) { c.train.grad_clip = -1; },
           [](TrainingConfig& c) { c.train.ema = 0; },
           [](TrainingConfig& c) { c.train.weight_decay = 0; },
           [](TrainingConfig& c) { c.train.min_lr_ratio = 0; },
           [](TrainingConfig& c) { c.train.min_lr_ratio = 1; },
           [](TrainingConfig& c) { c.train.beta1 = 0; },
           [](TrainingConfig& c) { c.train.warmup = 0; },
           [](TrainingConfig& c) { c.train.eval_every = 0; },
           [](TrainingConfig& c) { c.train.ckpt_every = -1; },
           [](TrainingConfig& c) { c.data.prefetch = 0; },
           [](TrainingConfig& c) { c.dist.timeout_s = 0; },
       }) {
    auto c = options_good_config();
    set(c);
    EXPECT_EQ(error_of([&] { c.validate(1); }), "<no error>");
  }
}

TEST(OptionsValidate, EveryBadNumericValueIsRefusedNamingTheKeyAndTheValue) {
  int checked = 0;
  for (const auto& b : bad_values()) {
    auto c = options_good_config();
    b.set(c);
    std::string msg = error_of([&] { c.validate(1); });
    EXPECT_NE(msg.find(b.key), std::string::npos) << b.key << " = " << b.shown << ": " << msg;
    EXPECT_NE(msg.find(b.shown), std::string::npos) << b.key << " = " << b.shown << ": " << msg;
    ++checked;
  }
  EXPECT_GE(checked, 60);
}

// sigma_max belongs to the geometric schedule, but an infinite one is refused whatever the schedule.
TEST(OptionsValidate, InfiniteSigmaMaxIsRefusedForEverySchedule) {
  for (const char* kind : {"geometric", "loglinear", "cosine"}) {
    auto c = options_good_config();
    c.model.noise.kind = kind;
    c.model.noise.sigma_max = kOptionsInf;
    std::string msg = error_of([&] { c.validate(1); });
    EXPECT_NE(msg.find("diffusion.sigma_max must be a finite number, got inf"), std::string::npos) << kind << ": " << msg;
  }
}

namespace {

TrainingConfig options_objective_config(const char* objective) {
  auto c = options_good_config();
  c.model.objective = objective;
  c.model.scale_by_sigma = std::string(objective) == "sedd";
  if (std::string(objective) == "ar") c.model.time_conditioning = false;
  return c;
}

}  // namespace

// diffusion.lambda_ce changes the d3pm loss, so it is part of a d3pm run's fingerprint; it and
// diffusion.timesteps are not part of the other objectives' (which never read them).
TEST(OptionsFingerprint, LambdaCeAndTimestepsAreCheckedForD3pmOnly) {
  TempDir tmp;
  write_shard(tmp / "a.h5", torch::arange(400) % 40, 40, 39, "byte");
  TokenStreamConfig sc;
  sc.data = tmp / "a.h5";
  sc.seq_len = 16;
  sc.global_batch = 2;
  sc.prefetch = 0;
  TokenStream stream(sc);
  for (const char* objective : {"sedd", "mdlm", "d3pm", "ar"}) {
    const bool d3pm = std::string(objective) == "d3pm";
    auto base = options_objective_config(objective);
    ASSERT_EQ(error_of([&] { base.validate(1); }), "<no error>") << objective;
    auto saved = run_fingerprint(base, stream);
    EXPECT_EQ(saved.contains("diffusion.lambda_ce"), d3pm) << objective;
    EXPECT_EQ(saved.contains("diffusion.timesteps"), d3pm) << objective;
    auto settings = settings_fingerprint(base);
    settings["data.train"] = saved["data.train"];
    settings["tokenizer"] = saved["tokenizer"];
    EXPECT_EQ(saved, settings) << "run_fingerprint is the settings' fingerprint plus the data's";

    auto other = base;
    other.train.lambda_ce = 0.5;
    other.model.timesteps = 20;
    auto diffs = fingerprint_differences(saved, run_fingerprint(other, stream), {});
    if (d3pm) {
      ASSERT_EQ(diffs.size(), 2u) << objective;
      EXPECT_EQ(diffs[0], "diffusion.timesteps: checkpoint 1000, now 20");
      EXPECT_EQ(diffs[1], "diffusion.lambda_ce: checkpoint 0.01, now 0.5");
      EXPECT_TRUE(fingerprint_differences(saved, run_fingerprint(other, stream),
                                          parse_allowed_changes("diffusion.lambda_ce, diffusion.timesteps"))
                      .empty());
    } else {
      EXPECT_TRUE(diffs.empty()) << objective << ": " << (diffs.empty() ? "" : diffs[0]);
    }
  }
  // A checkpoint written before lambda_ce was recorded: said so for d3pm, nothing for the others.
  auto d3pm_now = run_fingerprint(options_objective_config("d3pm"), stream), old = d3pm_now;
  old.erase("diffusion.lambda_ce");
  auto diffs = fingerprint_differences(old, d3pm_now, {});
  ASSERT_EQ(diffs.size(), 1u);
  EXPECT_EQ(diffs[0], "diffusion.lambda_ce: not recorded in the checkpoint, now 0.01");
  auto sedd_now = run_fingerprint(options_objective_config("sedd"), stream), sedd_old = sedd_now;
  sedd_old["diffusion.timesteps"] = 1000;  // older fingerprints recorded it for every objective
  EXPECT_TRUE(fingerprint_differences(sedd_old, sedd_now, {}).empty());
}

// The papers' settings that differ per objective are the defaults of the keys a user did not set;
// a key set on the command line or in a config file keeps its value.
TEST(OptionsObjectiveDefaults, EachObjectiveGetsItsPapersSettingsForTheKeysNotGiven) {
  struct Expect {
    const char* objective;
    const char* graph;
    bool time_conditioning, scale_by_sigma;
    const char* time_sampling;
    bool warmup_from_zero;
    const char* loss_mean;
  };
  for (const auto& e : std::vector<Expect>{{"sedd", "absorb", true, true, "iid", false, "sequence"},
                                           {"sedd", "uniform", true, false, "iid", false, "sequence"},
                                           {"mdlm", "absorb", false, false, "stratified", true, "token"},
                                           {"d3pm", "absorb", true, false, "iid", false, "sequence"},
                                           {"ar", "absorb", false, false, "iid", false, "sequence"}}) {
    auto c = options_good_config();
    c.model.objective = e.objective;
    c.model.graph = e.graph;
    // Values opposite to the expected ones: every key must be set by the defaults.
    c.model.time_conditioning = !e.time_conditioning;
    c.model.scale_by_sigma = !e.scale_by_sigma;
    c.train.time_sampling = "antithetic";
    c.train.warmup_from_zero = !e.warmup_from_zero;
    c.train.loss_mean = "neither";
    auto set = apply_objective_defaults(c, {});
    EXPECT_EQ(set.size(), 5u) << e.objective;
    EXPECT_EQ(c.train.loss_mean, e.loss_mean) << e.objective << " " << e.graph;
    EXPECT_EQ(c.model.time_conditioning, e.time_conditioning) << e.objective << " " << e.graph;
    EXPECT_EQ(c.model.scale_by_sigma, e.scale_by_sigma) << e.objective << " " << e.graph;
    EXPECT_EQ(c.train.time_sampling, e.time_sampling) << e.objective << " " << e.graph;
    EXPECT_EQ(c.train.warmup_from_zero, e.warmup_from_zero) << e.objective << " " << e.graph;
    EXPECT_EQ(error_of([&] { c.validate(1); }), "<no error>") << e.objective << " needs no other flag";
  }
  auto c = options_good_config();
  c.model.objective = "mdlm";
  c.model.time_conditioning = true;
  c.train.time_sampling = "antithetic";
  auto set = apply_objective_defaults(c, {"model.time_conditioning", "train.time_sampling"});
  EXPECT_EQ(set, (std::vector<std::string>{"model.scale_by_sigma", "train.warmup_from_zero", "train.loss_mean"}));
  EXPECT_TRUE(c.model.time_conditioning) << "given: kept";
  EXPECT_EQ(c.train.time_sampling, "antithetic") << "given: kept";
  EXPECT_FALSE(c.model.scale_by_sigma);
}

// MDLM's constant_warmup (a LambdaLR stepped after each optimizer step) runs step k at
// lr (k-1)/warmup: the first step at 0, the full rate from step warmup + 1; ours without
// warmup_from_zero runs step k at k/warmup (SEDD's).
TEST(OptionsObjectiveDefaults, WarmupFromZeroIsMdlmsScheduleOneStepLater) {
  TrainSection t;
  t.lr = 3e-4;
  t.warmup = 2500;
  t.warmup_from_zero = true;
  EXPECT_EQ(learning_rate(t, 1), 0.0);
  EXPECT_EQ(learning_rate(t, 2), 3e-4 * (1.0 / 2500));
  EXPECT_EQ(learning_rate(t, 2500), 3e-4 * (2499.0 / 2500));
  EXPECT_EQ(learning_rate(t, 2501), 3e-4);
  EXPECT_EQ(learning_rate(t, 9000), 3e-4);
  t.warmup_from_zero = false;
  EXPECT_EQ(learning_rate(t, 1), 3e-4 * 1 / 2500);
  EXPECT_EQ(learning_rate(t, 2500), 3e-4);
}

namespace {

std::string options_train(const std::string& data, const std::string& dir, const std::string& extra) {
  return tiny("mdlm")
      .set("data.prefetch", 0)
      .set("train.batch_size", 4)
      .set("model.hidden_size", 16)
      .set("model.n_blocks", 1)
      .set("model.cond_dim", 8)
      .erase("train.lr")
      .erase("train.warmup")
      .command(1, data, dir, extra);
}

nlohmann::json options_latest_fingerprint(const std::string& dir) {
  const std::string latest = fs::read_text(dir + "/checkpoints/latest");
  return nlohmann::json::parse(fs::read_text(dir + "/checkpoints/" + latest.substr(0, latest.find('\n')) +
                                             "/state.json"))["fingerprint"];
}

}  // namespace

// sedd-train: `--diffusion.objective mdlm` alone trains the MDLM recipe and startup says which
// values are the objective's defaults. A run trained under other values of these keys (as every
// mdlm run was before they became the defaults) resumes with the same command line and keeps its
// checkpoint's values; giving a key another value explicitly is refused like any fingerprint change.
TEST(OptionsObjectiveDefaults, SeddTrainAppliesThemAndAResumedRunKeepsItsCheckpointsValues) {
  TempDir tmp;
  write_shard(tmp / "a.h5", torch::arange(2000) % 40, 40, 39, "byte");
  std::string out;
  const std::string fresh = tmp / "fresh";
  ASSERT_EQ(run(options_train(tmp / "a.h5", fresh, "--train.steps 1"), &out), 0) << out;
  EXPECT_NE(out.find("time_conditioning  = false        # mdlm default"), std::string::npos) << out;
  EXPECT_NE(out.find("time_sampling      = stratified   # mdlm default"), std::string::npos) << out;
  EXPECT_NE(out.find("warmup_from_zero   = true         # mdlm default"), std::string::npos) << out;
  EXPECT_NE(out.find("scale_by_sigma     = false        # mdlm default"), std::string::npos) << out;
  EXPECT_NE(out.find("loss_mean          = token        # mdlm default"), std::string::npos) << out;
  auto f = options_latest_fingerprint(fresh);
  EXPECT_EQ(f["model.time_conditioning"], false);
  EXPECT_EQ(f["train.time_sampling"], "stratified");

  // A run started with the earlier values, then resumed by the same command line without them.
  const std::string old = tmp / "old";
  ASSERT_EQ(run(options_train(tmp / "a.h5", old,
                              "--train.steps 2 --model.time_conditioning true --train.time_sampling iid "
                              "--model.scale_by_sigma false"),
                &out),
            0)
      << out;
  {  // Its settings as a checkpoint written before warmup_from_zero and loss_mean existed records them.
    const std::string latest = fs::read_text(old + "/checkpoints/latest");
    const std::string state = old + "/checkpoints/" + latest.substr(0, latest.find('\n')) + "/state.json";
    auto j = nlohmann::json::parse(fs::read_text(state));
    std::string config;
    for (const auto& line : fs::split_nonempty(j["config"].get<std::string>(), '\n'))
      if (line.rfind("warmup_from_zero", 0) != 0 && line.rfind("loss_mean", 0) != 0) config += line + "\n";
    ASSERT_NE(config, j["config"].get<std::string>());
    j["config"] = config;
    std::ofstream(state) << j.dump(1);
  }
  ASSERT_EQ(run(options_train(tmp / "a.h5", old, "--train.steps 3"), &out), 0) << out;
  EXPECT_NE(out.find("resumed from"), std::string::npos) << out;
  EXPECT_NE(out.find("time_conditioning  = true         # the checkpoint's value (the mdlm default is false)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("time_sampling      = iid          # the checkpoint's value (the mdlm default is stratified)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("loss_mean          = sequence     # the checkpoint's value (the mdlm default is token)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("warmup_from_zero   = false        # the checkpoint's value (the mdlm default is true)"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("scale_by_sigma     = false        # mdlm default"), std::string::npos) << out;
  f = options_latest_fingerprint(old);
  EXPECT_EQ(f["model.time_conditioning"], true);
  EXPECT_EQ(f["train.time_sampling"], "iid");

  // Given explicitly with another value: refused, naming the key, nothing written.
  const std::string latest = fs::read_text(old + "/checkpoints/latest");
  EXPECT_EQ(run(options_train(tmp / "a.h5", old, "--train.steps 4 --model.time_conditioning false"), &out), 2) << out;
  EXPECT_NE(out.find("model.time_conditioning: checkpoint true, now false"), std::string::npos) << out;
  EXPECT_EQ(fs::read_text(old + "/checkpoints/latest"), latest);
}
