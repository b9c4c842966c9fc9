// TrainingConfig validation and the LR schedule; see config.h.
#include "train/config.h"

#include <cmath>
#include <cstdlib>
#include <type_traits>
#include <variant>

#include "io/error.h"
#include "objectives/objective.h"

namespace sedd {

namespace {

// Every numeric option is checked here, NaN and infinity included: a NaN compares false both ways,
// so a check like `x > 0` alone lets it through or (grad_clip) silently turns a feature off.
void check_finite(double v, const char* key) {
  SEDD_CHECK(std::isfinite(v), "{} must be a finite number, got {}", key, v);
}

void check_in(double v, const char* key, double lo, double hi, bool hi_open, const char* note = "") {
  check_finite(v, key);
  SEDD_CHECK(v >= lo && (hi_open ? v < hi : v <= hi), "{} must be in [{}, {}{}{}, got {}", key, lo, hi,
             hi_open ? ")" : "]", note, v);
}

}  // namespace

void TrainingConfig::validate(int world) const {
  SEDD_CHECK(!data.train.empty(), "data.train is required (a shard glob such as datasets/demo/train/*.h5)");
  SEDD_CHECK(data.seq_len >= 2, "data.seq_len must be at least 2, got {}", data.seq_len);
  SEDD_CHECK(data.prefetch >= 0, "data.prefetch must be >= 0 (0: no read-ahead), got {}", data.prefetch);
  SEDD_CHECK(train.steps > 0, "train.steps must be positive, got {}", train.steps);
  SEDD_CHECK(train.batch_size > 0, "train.batch_size must be positive, got {}", train.batch_size);
  SEDD_CHECK(train.batch_size % world == 0,
             "train.batch_size ({}) must be divisible by the number of ranks ({}); try {}", train.batch_size, world,
             (train.batch_size / world + 1) * world);
  // A negative value would silently mean 0 (no accumulation) in micro_batch().
  SEDD_CHECK(train.micro_batch_size >= 0, "train.micro_batch_size must be >= 0 (0: batch_size / ranks), got {}",
             train.micro_batch_size);
  int64_t rows = rows_per_rank(world), mb = micro_batch(world);
  SEDD_CHECK(mb > 0 && rows % mb == 0,
             "train.batch_size / ranks = {} must be divisible by train.micro_batch_size ({}); "
             "batch_size must equal ranks x micro_batch_size x accumulation steps",
             rows, mb);
  check_finite(train.lr, "train.lr");
  SEDD_CHECK(train.lr > 0, "train.lr must be positive, got {}", train.lr);
  SEDD_CHECK(train.warmup >= 0, "train.warmup must be >= 0, got {}", train.warmup);
  SEDD_CHECK(train.schedule == "constant" || train.schedule == "cosine",
             "train.schedule must be 'constant' or 'cosine', got '{}'", train.schedule);
  check_in(train.min_lr_ratio, "train.min_lr_ratio", 0, 1, false, " (the cosine floor as a fraction of train.lr)");
  check_finite(train.weight_decay, "train.weight_decay");
  SEDD_CHECK(train.weight_decay >= 0, "train.weight_decay must be >= 0 (0: none), got {}", train.weight_decay);
  check_in(train.beta1, "train.beta1", 0, 1, true);
  check_in(train.beta2, "train.beta2", 0, 1, true);
  check_finite(train.adam_eps, "train.adam_eps");
  SEDD_CHECK(train.adam_eps > 0, "train.adam_eps must be positive, got {}", train.adam_eps);
  // NaN would turn clipping off without a word (the clip applies only when grad_clip > 0).
  SEDD_CHECK(std::isfinite(train.grad_clip),
             "train.grad_clip must be a finite number (<= 0 turns clipping off), got {}", train.grad_clip);
  check_in(train.ema, "train.ema", 0, 1, true, " (0 disables it)");
  SEDD_CHECK(train.precision == "fp32" || train.precision == "bf16" || train.precision == "fp64",
             "train.precision must be fp32, bf16 or fp64, got '{}'", train.precision);
  SEDD_CHECK(train.log_every > 0, "train.log_every must be positive, got {}", train.log_every);
  SEDD_CHECK(train.eval_every >= 0, "train.eval_every must be >= 0 (0: never), got {}", train.eval_every);
  // Validation averages over eval_batches batches: 0 would divide 0 by 0 and drop the row.
  SEDD_CHECK(train.eval_batches > 0, "train.eval_batches must be positive, got {}", train.eval_batches);
  SEDD_CHECK(train.keep_ckpts > 0, "train.keep_ckpts must be at least 1, got {}", train.keep_ckpts);
  SEDD_CHECK(train.bucket_elems > 0, "train.bucket_elems must be positive, got {}", train.bucket_elems);
  SEDD_CHECK(train.zero_stage == 1 || train.zero_stage == 2,
             "train.zero_stage must be 1 (optimizer state sharded) or 2 (gradients too), got {}", train.zero_stage);
  SEDD_CHECK(train.zero2_reduce == "micro_batch" || train.zero2_reduce == "step",
             "train.zero2_reduce must be micro_batch or step, got '{}'", train.zero2_reduce);
  SEDD_CHECK(train.time_sampling == "iid" || train.time_sampling == "antithetic" || train.time_sampling == "stratified",
             "train.time_sampling must be iid, antithetic or stratified, got '{}'", train.time_sampling);
  SEDD_CHECK(train.clip_search_every >= 0, "diffusion.clip_search_every must be >= 0 (0: never), got {}",
             train.clip_search_every);
  SEDD_CHECK(train.clip_search_every == 0 || !objective_of(model).schedule_candidates(model).empty(),
             "diffusion.clip_search_every: '{}' has no schedule to search (bd3 with diffusion.block_size > 1 has)",
             model.objective_summary());
  SEDD_CHECK(train.clip_search_every == 0 || !data.valid.empty(),
             "diffusion.clip_search_every needs validation data (data.valid) to score the windows on");
  SEDD_CHECK(train.loss_mean == "sequence" || train.loss_mean == "token",
             "train.loss_mean must be sequence or token, got '{}'", train.loss_mean);
  SEDD_CHECK(train.time_sampling != "antithetic" || train.batch_size % 2 == 0,
             "train.time_sampling = antithetic pairs sequences: train.batch_size ({}) must be even", train.batch_size);
  check_finite(train.lambda_ce, "diffusion.lambda_ce");
  SEDD_CHECK(train.lambda_ce >= 0, "diffusion.lambda_ce must be >= 0, got {}", train.lambda_ce);
  SEDD_CHECK(train.loss_chunk_elems > 0, "train.loss_chunk_elems must be positive, got {}", train.loss_chunk_elems);
  check_finite(train.peak_tflops, "train.peak_tflops");
  SEDD_CHECK(train.peak_tflops >= 0, "train.peak_tflops must be >= 0 (0: from the GPU's name), got {}",
             train.peak_tflops);
  check_finite(dist.timeout_s, "dist.timeout_s");
  SEDD_CHECK(dist.timeout_s >= 0, "dist.timeout_s must be >= 0 (0: no timeout), got {}", dist.timeout_s);
  SEDD_CHECK(debug.nan_at_step >= 0, "debug.nan_at_step must be >= 0 (0: off), got {}", debug.nan_at_step);
  SEDD_CHECK(train.eval_every == 0 || !data.valid.empty(), "train.eval_every > 0 needs data.valid");
  SEDD_CHECK(run.device == "cpu" || run.device == "cuda" || run.device == "auto",
             "run.device must be cpu, cuda or auto, got '{}'", run.device);
  SEDD_CHECK(!(train.precision == "bf16" && run.device == "cpu"),
             "train.precision = bf16 needs a GPU (run.device = cuda or auto); CPU runs fp32");
  checkpoint_interval(train.activation_checkpointing);
  check_finite(plan.memory_gb, "plan.memory_gb");
  SEDD_CHECK(plan.memory_gb >= 0, "plan.memory_gb must be >= 0 (0: the GPU's memory), got {}", plan.memory_gb);
  SEDD_CHECK(plan.world_size >= 0, "plan.world_size must be >= 0 (0: the launched world size), got {}",
             plan.world_size);
  SEDD_CHECK(plan.vocab >= 0, "plan.vocab must be >= 0 (0: the data's vocabulary), got {}", plan.vocab);
  ModelConfig trained = model;  // the network's window is the data's sequence length
  trained.length = data.seq_len;
  trained.validate();
}

int64_t checkpoint_interval(const std::string& setting) {
  if (setting == "none") return 0;
  if (setting == "blocks") return 1;
  if (setting.rfind("every:", 0) == 0) {
    const std::string k = setting.substr(6);
    char* end = nullptr;
    const long long v = k.empty() ? 0 : std::strtoll(k.c_str(), &end, 10);
    if (!k.empty() && end && *end == '\0' && v >= 1) return v;
  }
  fail("train.activation_checkpointing must be none, blocks or every:K with K >= 1, got '{}'", setting);
}

namespace {

// The field behind each key an objective may default: one list serves reading and setting.
using SettingField = std::variant<bool*, double*, std::string*>;
SettingField objective_setting_field(TrainingConfig& c, const std::string& key) {
  if (key == "model.time_conditioning") return &c.model.time_conditioning;
  if (key == "model.scale_by_sigma") return &c.model.scale_by_sigma;
  if (key == "train.time_sampling") return &c.train.time_sampling;
  if (key == "train.warmup_from_zero") return &c.train.warmup_from_zero;
  if (key == "train.loss_mean") return &c.train.loss_mean;
  if (key == "train.schedule") return &c.train.schedule;
  if (key == "train.ema") return &c.train.ema;
  if (key == "train.beta2") return &c.train.beta2;
  if (key == "train.min_lr_ratio") return &c.train.min_lr_ratio;
  if (key == "diffusion.graph") return &c.model.graph;
  if (key == "diffusion.source") return &c.model.source;
  if (key == "diffusion.dfm_loss") return &c.model.dfm_loss;
  if (key == "diffusion.kappa_power") return &c.model.kappa_power;
  fail("{} is not a setting with an objective default", key);
}

}  // namespace

std::vector<std::pair<std::string, std::string>> objective_defaults(const ModelConfig& m) {
  return objective_of(m).defaults(m);
}

void set_objective_setting(TrainingConfig& c, const std::string& key, const std::string& value) {
  std::visit(
      [&](auto* field) {
        using T = std::remove_pointer_t<decltype(field)>;
        if constexpr (std::is_same_v<T, bool>) {
          SEDD_CHECK(value == "true" || value == "false", "{}: '{}' is not true or false", key, value);
          *field = value == "true";
        } else if constexpr (std::is_same_v<T, double>) {
          char* end = nullptr;
          const double v = std::strtod(value.c_str(), &end);
          SEDD_CHECK(end && *end == '\0' && !value.empty(), "{}: '{}' is not a number", key, value);
          *field = v;
        } else {
          *field = value;
        }
      },
      objective_setting_field(c, key));
}

std::string objective_setting(const TrainingConfig& c, const std::string& key) {
  TrainingConfig copy = c;  // the field lookup hands out pointers into a mutable config
  return std::visit(
      [](auto* field) -> std::string {
        using T = std::remove_pointer_t<decltype(field)>;
        if constexpr (std::is_same_v<T, bool>) return *field ? "true" : "false";
        else if constexpr (std::is_same_v<T, double>) return fmt::format("{}", *field);
        else return *field;
      },
      objective_setting_field(copy, key));
}

std::vector<std::string> apply_objective_defaults(TrainingConfig& c, const std::set<std::string>& given) {
  std::vector<std::string> set;
  for (const auto& [key, value] : objective_defaults(c.model)) {
    if (given.count(key)) continue;
    set_objective_setting(c, key, value);
    set.push_back(key);
  }
  return set;
}

double learning_rate(const TrainSection& t, int64_t step) {
  // MDLM's LambdaLR: lr * ((k - 1) / warmup) while k - 1 < warmup (the factor rounded first, as there).
  if (t.warmup_from_zero && t.warmup > 0 && step - 1 < t.warmup)
    return t.lr * (static_cast<double>(step - 1) / static_cast<double>(t.warmup));
  if (!t.warmup_from_zero && t.warmup > 0 && step <= t.warmup)
    return t.lr * static_cast<double>(step) / static_cast<double>(t.warmup);
  if (t.schedule == "constant") return t.lr;
  double span = std::max<int64_t>(1, t.steps - t.warmup);
  double progress = std::min(1.0, static_cast<double>(step - t.warmup) / span);
  double floor = t.lr * t.min_lr_ratio;
  return floor + (t.lr - floor) * 0.5 * (1 + std::cos(M_PI * progress));
}

}  // namespace sedd
