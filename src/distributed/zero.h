// ZeRO-1 sharded AdamW (DESIGN.md §6). The model's parameters are re-pointed into one flat,
// contiguous buffer padded to a multiple of the world size W, and their gradients into a second
// one; rank k owns slice k. A step: reduce-scatter the gradients (mean), global gradient norm
// from the shards (one scalar all-reduce), clipping, AdamW with decoupled weight decay on the
// own slice (moments exist only for that slice), EMA of the own slice, all-gather parameters.
// Gradient accumulation needs no communication: backward adds into the flat gradient buffer.
#pragma once
#include <torch/torch.h>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/runtime.h"

namespace sedd {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double grad_clip = 1.0;  // <= 0: no clipping
  double ema = 0.9999;     // <= 0: no EMA
  int64_t bucket_elems = int64_t{1} << 22;  // gradient bucket size for overlapped reduction
};

struct StepResult {
  double grad_norm = 0;    // before clipping
  bool skipped = false;    // non-finite gradient: nothing was updated
};

class ShardedAdamW {
 public:
  // Takes over the storage of `params` (in order). All ranks must pass the same shapes.
  ShardedAdamW(std::vector<torch::Tensor> params, Communicator& comm, AdamWConfig cfg);

  void zero_grad() { flat_grad_.zero_(); }
  // Call right before the last micro-batch's backward: from then on, each gradient bucket is
  // reduce-scattered as soon as backward has filled it, overlapping communication with the
  // rest of backward. Earlier micro-batches only accumulate (no communication).
  void overlap_next_backward();
  // Call after the last micro-batch's backward.
  StepResult step(double lr);
  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }
  int64_t buckets_launched_during_backward() const { return launched_early_; }

  int64_t numel() const { return numel_; }           // real parameters, without padding
  int64_t padded_numel() const { return flat_param_.numel(); }
  ShardRange own_range() const { return own_; }
  int64_t steps_taken() const { return steps_; }
  void set_steps_taken(int64_t s) { steps_ = s; }

  torch::Tensor& exp_avg() { return exp_avg_; }       // [own slice]
  torch::Tensor& exp_avg_sq() { return exp_avg_sq_; }
  torch::Tensor& ema_shard() { return ema_; }
  torch::Tensor flat_params() const { return flat_param_; }
  // The full EMA vector (collective: every rank must call it).
  torch::Tensor gather_ema();
  // Copies a full flat vector's own slice into the EMA shard (after loading a checkpoint).
  void load_ema(const torch::Tensor& full);
  // Bytes of optimizer state held by this rank (moments + EMA).
  int64_t state_bytes() const;
  double comm_seconds() const { return comm_seconds_; }  // wall time inside collectives so far

 private:
  Communicator& comm_;
  AdamWConfig cfg_;
  std::vector<torch::Tensor> params_;
  torch::Tensor flat_param_, flat_grad_;
  torch::Tensor exp_avg_, exp_avg_sq_, ema_, grad_shard_;
  ShardRange own_{0, 0};
  int64_t numel_ = 0, steps_ = 0;

  // Buckets: ranges of the flat buffer, launched in a fixed order (last parameters first, the
  // order backward produces them), so every rank starts the same collectives in the same order.
  struct Bucket {
    int64_t begin, end;
    int params;
  };
  void on_gradient(size_t param_index);
  void launch_ready_buckets(bool all);
  std::vector<Bucket> buckets_;
  std::vector<int> bucket_of_param_;
  std::vector<int> arrived_;         // per bucket, this backward
  std::vector<bool> param_seen_;
  size_t next_launch_ = 0;
  bool armed_ = false;
  int64_t launched_early_ = 0;
  std::vector<std::unique_ptr<Work>> in_flight_;
  double comm_seconds_ = 0;
};

}  // namespace sedd
