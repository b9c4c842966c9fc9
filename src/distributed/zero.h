// ZeRO-1/2 sharded AdamW with bucketed, overlapped gradient reduction.
//
// The model's parameters are re-pointed into one flat buffer, their gradients into a second one.
// The buffers are cut into buckets of whole parameters (train.bucket_elems, formed from the last
// parameter backwards, the order backward produces gradients); each bucket is padded to W equal
// chunks and rank r owns chunk r of every bucket. So every bucket is one equal-chunk
// reduce-scatter (ncclReduceScatter / MPI_Ireduce_scatter_block), launched as soon as backward has
// accumulated its last gradient, while backward goes on; and one in-place all-gather after the
// update. The rank's shard (its chunks, concatenated) carries the AdamW moments and the EMA:
// optimizer memory per rank is 1/W of the unsharded one.
//
// ZeRO-2 (zero_stage = 2) shards the gradient as well. There is no flat gradient buffer: a
// bucket's gradient storage is allocated when backward first reaches one of its parameters (a
// pre-hook on the parameter's gradient accumulator points the parameters' .grad into it) and
// released as soon as its reduce-scatter has completed; at most max_buckets_in_flight reductions
// are outstanding (launching one more first retires the oldest). Gradient memory per rank is the
// fp32 shard plus the buckets being filled or reduced. With gradient accumulation the shard
// accumulates over micro-batches: either every micro-batch is reduce-scattered
// (reduce_every_micro_batch: memory stays at shard + buckets; M micro-batches cost M reductions
// instead of one) or the buckets stay allocated until the last micro-batch reduces them
// once (the full gradient is held during accumulation, as in ZeRO-1). Both stages share the shard
// layout, so optimizer state and checkpoints do not depend on the stage.
//
// A step never synchronises with the host: the global gradient norm is reduced on the device
// together with the training loss, the clip factor and a "non-finite" flag stay device tensors,
// and the fused AdamW kernel skips the update (and the EMA) when the flag is set. Callers read
// the returned tensors when they log.
#pragma once
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/runtime.h"

namespace sedd {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double grad_clip = 1.0;  // <= 0: no clipping
  double ema = 0.9999;     // <= 0: no EMA (it follows the weights)
  bool ema_warmup = true;  // decay min(ema, (1 + n) / (10 + n)) at the n-th update, as SEDD's trainer
  int64_t bucket_elems = int64_t{1} << 22;
  int zero_stage = 1;                   // 1: full gradient per rank; 2: only the rank's gradient shard
  bool reduce_every_micro_batch = false;  // stage 2 with accumulation: reduce each micro-batch (else once)
  int max_buckets_in_flight = 2;        // stage 2: reductions outstanding before the oldest is retired
};

struct ParamSpec {
  std::string name;
  torch::Tensor tensor;
  bool decay = true;  // decoupled weight decay applies (matrices; not biases, norms, embeddings)
};

// A step's results, as device tensors (reading them synchronises; do it when logging).
struct StepStats {
  torch::Tensor grad_norm;  // 0-dim float64: global gradient norm before clipping
  torch::Tensor skipped;    // 0-dim float32: 1 when a non-finite norm or loss skipped the update
  torch::Tensor loss_sum;   // 0-dim float64: the step's loss summed over ranks
  torch::Tensor clip_coef;  // 0-dim float64: the factor the gradient was multiplied by (1: not clipped)
};

class ShardedAdamW {
 public:
  // Takes over the storage of the parameters (in model order). All ranks pass the same shapes.
  ShardedAdamW(std::vector<ParamSpec> params, Communicator& comm, AdamWConfig cfg);
  ~ShardedAdamW();

  void zero_grad();
  // Call right before each micro-batch's backward. Stage 1 (and stage 2 reducing once): the last
  // micro-batch's buckets are reduce-scattered as soon as backward has filled them, earlier ones
  // only accumulate. Stage 2 reducing every micro-batch: every micro-batch's buckets are, and
  // the previous micro-batch's reductions are completed (accumulated into the shard) first.
  void begin_backward(bool last_micro_batch);
  // begin_backward(true) for the one micro-batch of a step.
  void overlap_next_backward();
  // Abandons this step's gradients: waits for buckets in flight, then zeroes the buffer.
  void discard();
  // After the last micro-batch's backward. `local_loss` (0-dim, on the device) is summed over
  // ranks along with the gradient norm; a non-finite result skips the update.
  StepStats step(double lr, const torch::Tensor& local_loss);

  int64_t numel() const { return numel_; }              // real parameter elements
  torch::Tensor flat_params() const { return flat_param_; }  // the buffer the parameters live in
  int64_t shard_numel() const { return shard_numel_; }  // this rank's chunks, padding included
  int64_t buckets() const { return static_cast<int64_t>(buckets_.size()); }
  int64_t buckets_launched_during_backward() const { return launched_early_; }
  double comm_seconds() const { return comm_seconds_; }  // host time spent in collectives
  int64_t state_bytes() const;                           // moments + EMA held by this rank
  int zero_stage() const { return cfg_.zero_stage; }
  // Gradient storage this rank holds now: the shard, plus the full flat buffer (stage 1) or the
  // buckets currently allocated and the receive buffers of reductions in flight (stage 2).
  int64_t gradient_bytes() const;
  // The most gradient_bytes() has been since construction (stage 2: tracked at every allocation).
  int64_t peak_gradient_bytes() const;

  // Checkpoints. A piece maps `count` shard elements starting at `shard_offset` to the parameter
  // elements [param_index, param_index + count) of the unpadded, model-ordered parameter vector;
  // this index space does not depend on the world size, so state re-shards on load.
  struct Piece {
    int64_t param_index, count, shard_offset;
  };
  const std::vector<Piece>& own_pieces() const { return pieces_; }
  torch::Tensor& exp_avg() { return exp_avg_; }
  torch::Tensor& exp_avg_sq() { return exp_avg_sq_; }
  torch::Tensor& ema_shard() { return ema_; }
  double steps_taken() const;          // optimizer updates applied so far (reads the device)
  void set_steps_taken(double steps);
  // The full EMA as an unpadded, model-ordered vector [numel] (collective: every rank calls it).
  torch::Tensor gather_ema();
  // Step-by-step checks (sedd-parity): keep a copy of each step's reduced gradient before
  // clipping; last_gradient() gathers it as an unpadded, model-ordered vector (collective).
  void keep_gradient(bool on) { keep_gradient_ = on; }
  torch::Tensor last_gradient();
  // Loads the own pieces of a full unpadded vector into the EMA shard.
  void load_ema(const torch::Tensor& full);

 private:
  struct Bucket {
    size_t first_param, end_param;  // parameters [first, end) in model order
    int64_t flat_offset;            // start in the flat buffers
    int64_t numel, chunk;           // real elements; per-rank chunk (W chunks >= numel)
    int64_t shard_offset;           // this rank's chunk inside the shard
  };
  struct Group {  // fused AdamW operands sharing one weight decay
    double weight_decay;
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
  };
  torch::Tensor bucket_view(const torch::Tensor& flat, const Bucket& b) const;
  torch::Tensor own_chunk(const torch::Tensor& flat, const Bucket& b) const;
  void reset_ema();  // the EMA shard := the rank's chunks of the current weights
  // A shard-shaped vector of every rank, gathered into the unpadded model order (collective).
  torch::Tensor gather_shard(const torch::Tensor& shard, const std::string& what);
  void on_gradient(size_t param_index);
  void launch(size_t bucket);
  void launch_ready_buckets(bool all);
  void wait_in_flight();
  // Stage 2: the bucket's gradient storage, allocated (zeros) with the parameters' .grad pointing
  // into it; and its release once reduced.
  void allocate_bucket(size_t bucket);
  void release_bucket(size_t bucket);
  void release_all_buckets();
  void count_bytes(int64_t delta);

  Communicator& comm_;
  AdamWConfig cfg_;
  std::vector<ParamSpec> params_;
  std::vector<int64_t> flat_offset_of_param_, param_index_of_param_;
  torch::Tensor flat_param_, flat_grad_;
  torch::Tensor grad_shard_, exp_avg_, exp_avg_sq_, ema_;
  torch::Tensor step_count_;  // 0-dim float32 on the device: updates applied (fused AdamW's step)
  int64_t numel_ = 0, shard_numel_ = 0;
  std::vector<Bucket> buckets_;
  std::vector<Piece> pieces_;
  std::vector<Group> groups_;

  std::vector<int> bucket_of_param_, arrived_;
  std::vector<bool> param_seen_;
  // The parameters' gradient accumulators carry our post-accumulation hooks; kept alive here.
  using Accumulator = decltype(torch::autograd::impl::grad_accumulator(std::declval<torch::Tensor>()));
  std::vector<Accumulator> accumulators_;
  size_t next_launch_ = 0;
  bool armed_ = false;
  int64_t launched_early_ = 0;
  // A reduction in flight: the bucket it reduces (its storage is released when it is retired,
  // stage 2) and, when the shard already holds this step's part of the bucket, the buffer it
  // receives into (added to the shard when retired).
  struct InFlight {
    std::unique_ptr<Work> work;
    size_t bucket;
    torch::Tensor received;
  };
  void retire(InFlight& f);
  std::vector<InFlight> in_flight_;
  std::vector<torch::Tensor> bucket_grad_;  // stage 2: allocated buckets (undefined when released)
  std::vector<int> reductions_;             // per bucket: reduce-scatters launched this step
  int64_t live_gradient_bytes_ = 0, peak_gradient_bytes_ = 0;  // stage 2: buckets + receive buffers
  double comm_seconds_ = 0;
  bool keep_gradient_ = false;
  torch::Tensor last_gradient_;
};

}  // namespace sedd
