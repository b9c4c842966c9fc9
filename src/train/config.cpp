// TrainingConfig validation and the LR schedule; see config.h.
#include "train/config.h"

#include <cmath>

#include "io/error.h"

namespace sedd {

void TrainingConfig::validate(int world) const {
  SEDD_CHECK(!data.train.empty(), "data.train is required (a shard glob such as datasets/demo/train/*.h5)");
  SEDD_CHECK(data.seq_len >= 2, "data.seq_len must be at least 2, got {}", data.seq_len);
  SEDD_CHECK(train.steps > 0, "train.steps must be positive, got {}", train.steps);
  SEDD_CHECK(train.batch_size > 0, "train.batch_size must be positive, got {}", train.batch_size);
  SEDD_CHECK(train.batch_size % world == 0,
             "train.batch_size ({}) must be divisible by the number of ranks ({}); try {}", train.batch_size, world,
             (train.batch_size / world + 1) * world);
  int64_t rows = rows_per_rank(world), mb = micro_batch(world);
  SEDD_CHECK(mb > 0 && rows % mb == 0,
             "train.batch_size / ranks = {} must be divisible by train.micro_batch_size ({}); "
             "batch_size must equal ranks x micro_batch_size x accumulation steps",
             rows, mb);
  SEDD_CHECK(train.lr > 0, "train.lr must be positive, got {}", train.lr);
  SEDD_CHECK(train.warmup >= 0, "train.warmup must be >= 0");
  SEDD_CHECK(train.schedule == "constant" || train.schedule == "cosine",
             "train.schedule must be 'constant' or 'cosine', got '{}'", train.schedule);
  SEDD_CHECK(train.beta1 >= 0 && train.beta1 < 1 && train.beta2 >= 0 && train.beta2 < 1,
             "train.beta1 and train.beta2 must be in [0, 1)");
  SEDD_CHECK(train.ema < 1, "train.ema must be < 1 (0 disables it), got {}", train.ema);
  SEDD_CHECK(train.precision == "fp32" || train.precision == "bf16" || train.precision == "fp64",
             "train.precision must be fp32, bf16 or fp64, got '{}'", train.precision);
  SEDD_CHECK(train.log_every > 0, "train.log_every must be positive");
  SEDD_CHECK(train.keep_ckpts > 0, "train.keep_ckpts must be at least 1");
  SEDD_CHECK(train.bucket_elems > 0, "train.bucket_elems must be positive, got {}", train.bucket_elems);
  SEDD_CHECK(train.time_sampling == "iid" || train.time_sampling == "antithetic" || train.time_sampling == "stratified",
             "train.time_sampling must be iid, antithetic or stratified, got '{}'", train.time_sampling);
  SEDD_CHECK(train.time_sampling != "antithetic" || train.batch_size % 2 == 0,
             "train.time_sampling = antithetic pairs sequences: train.batch_size ({}) must be even", train.batch_size);
  SEDD_CHECK(train.lambda_ce >= 0, "diffusion.lambda_ce must be >= 0, got {}", train.lambda_ce);
  SEDD_CHECK(train.loss_chunk_elems > 0, "train.loss_chunk_elems must be positive");
  SEDD_CHECK(train.peak_tflops >= 0, "train.peak_tflops must be >= 0 (0: from the GPU's name)");
  SEDD_CHECK(dist.timeout_s >= 0, "dist.timeout_s must be >= 0 (0: no timeout), got {}", dist.timeout_s);
  SEDD_CHECK(train.eval_every == 0 || !data.valid.empty(), "train.eval_every > 0 needs data.valid");
  SEDD_CHECK(run.device == "cpu" || run.device == "cuda" || run.device == "auto",
             "run.device must be cpu, cuda or auto, got '{}'", run.device);
  SEDD_CHECK(!(train.precision == "bf16" && run.device == "cpu"),
             "train.precision = bf16 needs a GPU (run.device = cuda or auto); CPU runs fp32");
  model.validate();
}

double learning_rate(const TrainSection& t, int64_t step) {
  if (t.warmup > 0 && step <= t.warmup) return t.lr * static_cast<double>(step) / static_cast<double>(t.warmup);
  if (t.schedule == "constant") return t.lr;
  double span = std::max<int64_t>(1, t.steps - t.warmup);
  double progress = std::min(1.0, static_cast<double>(step - t.warmup) / span);
  double floor = t.lr * t.min_lr_ratio;
  return floor + (t.lr - floor) * 0.5 * (1 + std::cos(M_PI * progress));
}

}  // namespace sedd
