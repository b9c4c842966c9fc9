// The memory plan of a training run: bytes per rank for the trainer's persistent state (weights,
// gradients, AdamW moments, EMA) and for one micro-batch's activations with and without activation
// checkpointing, and the largest micro-batch that fits a memory budget. The state figures follow
// what ShardedAdamW allocates (flat buffers padded per bucket, the rank's shard); the activation
// figures count the tensors the DDiT forward keeps for backward (docs/DESIGN.md, "Memory plan").
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "train/config.h"

namespace sedd {

// Parameter sizes of DDiT(cfg) in named_parameters() order (no model is built).
std::vector<int64_t> ddit_parameter_sizes(const ModelConfig& cfg);

struct MemoryPlan {
  int world = 1, zero_stage = 1;
  int64_t micro_batch = 0, seq_len = 0, checkpoint_every = 0;
  int64_t hidden_size = 0, n_heads = 0, n_blocks = 0, cond_dim = 0, vocab_dim = 0;  // the model planned for
  bool gpu = false;                    // planned for a GPU (bf16 autocast, CUDA reserve)
  int64_t parameters = 0;              // real parameter elements
  int64_t flat_elems = 0, shard_elems = 0, largest_bucket_elems = 0;
  int64_t stage2_buckets_live = 0;     // ZeRO-2: buckets allocated at once at most
  int64_t element_bytes = 4;           // weights, gradients and optimizer state (fp64: 8)
  // Persistent per rank.
  int64_t param_bytes = 0;             // the flat parameter buffer (padded)
  int64_t grad_bytes = 0;              // stage 1: flat gradient + shard; stage 2: shard + buckets in flight
  int64_t moment_bytes = 0;            // AdamW exp_avg + exp_avg_sq shards
  int64_t ema_bytes = 0;               // EMA shard
  int64_t master_bytes = 0;            // fp32 master copies: none (the weights are fp32 themselves)
  int64_t autocast_weight_bytes = 0;   // bf16: the cast copies of the matrices autocast keeps for backward
  int64_t reserve_bytes = 0;           // GPU: CUDA context, NCCL and allocator slack
  // Activations of one micro-batch (peak during forward + backward).
  int64_t activation_plain_bytes = 0;         // no checkpointing
  int64_t activation_checkpointed_bytes = 0;  // every block checkpointed (train.activation_checkpointing = blocks)
  int64_t activation_bytes = 0;               // with the run's setting
  double memory_bytes = 0;             // the budget
  std::string memory_source;           // where the budget came from
  int64_t largest_micro_batch = 0;     // with the run's setting; 0: not even one sequence fits
  int64_t largest_micro_batch_checkpointed = 0;

  int64_t state_bytes() const {
    return param_bytes + grad_bytes + moment_bytes + ema_bytes + master_bytes + autocast_weight_bytes + reserve_bytes;
  }
  int64_t total_bytes() const { return state_bytes() + activation_bytes; }
  bool fits() const { return static_cast<double>(total_bytes()) <= memory_bytes; }
  // A multi-line table for the log ("[plan] ..." lines).
  std::string text() const;
  // Every figure above as one JSON object (bytes), for scripts and tests.
  std::string json() const;
};

// Activation bytes of one micro-batch of `micro_batch` sequences (checkpoint_every as in
// DDiTImpl::checkpoint_every; gpu: bf16 autocast element sizes).
int64_t activation_bytes(const TrainingConfig& cfg, int64_t micro_batch, int64_t checkpoint_every, bool gpu);

// The plan for `world` ranks. memory_bytes <= 0: plan.memory_gb, else the GPU's memory (gpu), else
// the machine's physical memory. Throws sedd::Error when the budget cannot be determined.
MemoryPlan plan_memory(const TrainingConfig& cfg, int world, bool gpu, double device_memory_bytes);

// Physical memory of this machine (bytes).
double physical_memory_bytes();
// Total memory of a CUDA device (bytes); 0 for the CPU or without CUDA.
double device_memory_bytes(const torch::Device& device);

}  // namespace sedd
