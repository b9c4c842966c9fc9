// TrainingConfig: every setting of a training run, grouped as the INI sections are
// ([run], [data], [model], [diffusion], [train]). validate() rejects impossible combinations
// with a message that names the keys and suggests a fix, before anything is built.
#pragma once
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace sedd {

struct RunSection {
  std::string dir = "runs/default";
  uint64_t seed = 0;
  std::string device = "auto";   // cpu | cuda | auto
};

struct DataSection {
  std::string train;             // shard glob(s)
  std::string valid;             // optional
  int64_t seq_len = 128;
  int prefetch = 2;
};

struct TrainSection {
  int64_t steps = 1000;
  int64_t batch_size = 32;       // global, all ranks together
  int64_t micro_batch_size = 0;  // per rank; 0 = batch_size / ranks (no accumulation)
  double lr = 3e-4;
  int64_t warmup = 100;
  // Step k of the warmup runs at lr k/warmup (SEDD's), or (k-1)/warmup when true: the first step at
  // lr 0, as MDLM's constant_warmup (transformers' LambdaLR, stepped after each optimizer step).
  bool warmup_from_zero = false;
  // The loss whose gradient a step takes: the batch mean of the per-sequence sums (sequence: SEDD's
  // code) or the mean over the batch's tokens (token: MDLM's token_nll). With clipping (and Adam's
  // eps) the two train differently: the first gradient is seq_len times the second.
  std::string loss_mean = "sequence";
  std::string schedule = "constant";  // constant | cosine
  double min_lr_ratio = 0.1;          // cosine floor as a fraction of lr
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;
  double grad_clip = 1.0;
  double ema = 0.9999;
  std::string precision = "fp32";     // fp32 | bf16 (CUDA) | fp64 (CPU checks)
  int64_t log_every = 10;
  int64_t eval_every = 0;             // 0: never
  int64_t eval_batches = 4;
  // bd3: every this many steps the clipped window is chosen again from the search's candidates, by
  // the variance of the per-block loss over eval_batches validation batches, with the EMA weights
  // (0: never; the window stays diffusion.clip).
  int64_t clip_search_every = 0;
  int64_t ckpt_every = 0;             // 0: only at the end; < 0: never (benchmarks)
  int64_t keep_ckpts = 3;
  int64_t bucket_elems = int64_t{1} << 22;  // gradient bucket reduced while backward still runs
  int zero_stage = 1;                 // 1: optimizer state sharded; 2: the gradient too (docs/DESIGN.md)
  std::string zero2_reduce = "step";  // stage 2 with accumulation: micro_batch | step (when to reduce-scatter)
  std::string time_sampling = "iid";  // iid | antithetic | stratified (over the global batch)
  bool fused_loss = true;             // masked-rows projection fused with the loss (else full logits)
  bool fused_kernels = true;          // GPU: fused CUDA kernels for the block's elementwise chains
  int64_t loss_chunk_elems = int64_t{1} << 26;  // logits per chunk of the fused loss
  double peak_tflops = 0;             // MFU denominator per GPU; 0: from the GPU's name
  double lambda_ce = 0.01;            // d3pm: weight of the auxiliary cross entropy (hybrid loss)
  std::string init_from;              // model.h5 whose raw weights start the run (ignored on resume)
  // none | blocks | every:K: which blocks recompute their activations in backward (blocks = every:1).
  std::string activation_checkpointing = "none";
};

// Memory plan settings (sedd-train --plan and the plan printed at the start of a run).
struct PlanSection {
  double memory_gb = 0;               // memory per rank to fit; 0: the GPU's (CPU runs: physical memory)
  int world_size = 0;                 // --plan only: ranks to plan for; 0: the launched world size
  int64_t vocab = 0;                  // --plan only: vocabulary size when data.train is not at hand (0: the data's)
};

struct ResumeSection {
  std::string allow;                  // fingerprint keys that may differ from the checkpoint's (comma list)
};

struct DistSection {
  double timeout_s = 600;             // watchdog: a collective without progress this long ends the job
};

// Fault injection for tests of the failure paths (never set in real runs).
struct DebugSection {
  int64_t nan_at_step = 0;            // > 0: rank 0's loss at this step is NaN (the step must be skipped)
};

struct TrainingConfig {
  RunSection run;
  DataSection data;
  ModelConfig model;                  // model.tokens comes from the data
  TrainSection train;
  ResumeSection resume;
  DistSection dist;
  DebugSection debug;
  PlanSection plan;

  void validate(int world) const;
  int64_t rows_per_rank(int world) const { return train.batch_size / world; }
  int64_t micro_batch(int world) const {
    return train.micro_batch_size > 0 ? train.micro_batch_size : rows_per_rank(world);
  }
};

// train.activation_checkpointing as the block interval K of DDiTImpl::checkpoint_every: none -> 0,
// blocks -> 1, every:K -> K. Throws sedd::Error naming the key for anything else.
int64_t checkpoint_interval(const std::string& setting);

// The settings whose paper value depends on the objective (docs/training.md, "Objectives"), as (key, value)
// in option spelling: sedd (Lou et al.) conditions on time, scales the absorbing score by sigma and
// draws times iid; mdlm (Sahoo et al.) has no time input and draws stratified times (their
// antithetic_sampling: t_k = (k + U_k) / B), starts its warmup at lr 0 and takes the gradient of the
// per-token mean loss; d3pm conditions on time; ar has no time input.
std::vector<std::pair<std::string, std::string>> objective_defaults(const ModelConfig& model);
// Sets each objective default whose key is not in `given` (the keys set on the command line or in
// a config file); returns the keys it set.
std::vector<std::string> apply_objective_defaults(TrainingConfig& c, const std::set<std::string>& given);
// Sets one of the keys objective_defaults() names from its text ("true", "stratified", ...), and
// reads it back as text.
void set_objective_setting(TrainingConfig& c, const std::string& key, const std::string& value);
std::string objective_setting(const TrainingConfig& c, const std::string& key);

// Learning rate at `step` (1-based): linear warmup (see warmup_from_zero), then constant or cosine decay.
double learning_rate(const TrainSection& t, int64_t step);

}  // namespace sedd
