// Memory plan; see memory_plan.h and docs/DESIGN.md, "Memory plan".
#include "train/memory_plan.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "objectives/objective.h"

#include "io/error.h"

#ifdef SEDD_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace sedd {

namespace {

constexpr int64_t kPlanChunkAlign = 4;  // ShardedAdamW's chunk alignment (elements)
constexpr int kPlanBucketsInFlight = 2; // ShardedAdamW's default max_buckets_in_flight (stage 2)

std::string plan_gb(double bytes) { return fmt::format("{:.2f} GB", bytes / 1e9); }

}  // namespace

std::vector<int64_t> ddit_parameter_sizes(const ModelConfig& c) {
  const int64_t D = c.hidden_size, C = c.cond_dim, V = c.vocab_dim(), F = 256;
  std::vector<int64_t> s = {V * D, C * F, C, C * C, C};  // vocab_embed, sigma_map.mlp.{0,2}
  for (int64_t i = 0; i < c.n_blocks; ++i)
    // norm1, attn_qkv, attn_out, norm2, mlp.0 (w, b), mlp.2 (w, b), adaLN_modulation (w, b)
    s.insert(s.end(), {D, 3 * D * D, D * D, D, 4 * D * D, 4 * D, 4 * D * D, D, 6 * D * C, 6 * D});
  s.insert(s.end(), {D, V * D, V, 2 * D * C, 2 * D});  // output_layer: norm_final, linear, adaLN
  return s;
}

// Tensors the forward keeps for backward, per element of one block's residual stream [b, L, D]
// (docs/DESIGN.md, "Memory plan"). float32: the block input, norm1's output and its weighted and
// modulated forms (3), qkv (3), rotated q and k (2; SDPA keeps q, k, v and its output, the flash /
// memory-efficient kernels keep no L x L scores), the attention output (1), attn_out's output (1),
// h (1), norm2's three (3), the MLP's hidden before and after GELU (4 + 4) and its output (1):
// 24 elements. bf16 autocast: the matmul outputs and their saved bf16 inputs take 2 bytes, the
// residual stream and the norms stay float32: 68 bytes. Dropout adds a float32 keep-mask per site.
int64_t activation_bytes(const TrainingConfig& cfg, int64_t b, int64_t checkpoint_every, bool gpu) {
  const auto& m = cfg.model;
  const int64_t L = cfg.data.seq_len, D = m.hidden_size, H = m.n_heads, V = m.vocab_dim(), n = m.n_blocks;
  const int64_t e = cfg.train.precision == "fp64" ? 8 : 4;
  // Block diffusion's blocks run over x_t and x_0: 2L positions (the output layer reads L).
  const int64_t P = m.network().block_size > 0 ? 2 * L : L;
  const int64_t N = b * P * D;
  const bool bf16 = gpu && cfg.train.precision == "bf16";
  int64_t block = bf16 ? 68 * N : 24 * N * e;
  if (m.dropout > 0) block += 2 * N * 4;
  block += b * H * P * 4;  // attention log-sum-exp
  const int64_t block_in = N * (bf16 ? 4 : e);
  // Backward's working set on top of what is kept: the gradient of the residual stream and of the
  // MLP hidden (1 + 4 + 1 elements of the stream).
  const int64_t backward_work = 6 * N * (bf16 ? 4 : e);
  // The output layer over the R rows with a loss: the last hidden state, the gathered rows, their
  // norm, weighted and modulated forms and the per-row shift and scale (6 x [R, D]); the fused loss
  // computes logits chunk by chunk (logits, their exponential and their gradient alive at once),
  // the unfused one keeps the full [b L, V] logits, their shifted and scattered forms and the
  // loss's intermediate. Absorbing diffusion scores the masked positions only: half of them on
  // average under the log-linear schedule (the mean of t), and a micro-batch's share concentrates
  // there as b grows; the other objectives score every position.
  const bool masked_rows = objective_of(m).loss_on_masked_rows(m);
  const int64_t R = masked_rows ? (b * L + 1) / 2 : b * L;
  int64_t head = b * L * D * e + 6 * R * D * e, loss_transient = 0;
  if (cfg.train.fused_loss)
    loss_transient = 3 * std::min(R * V, cfg.train.loss_chunk_elems) * 4;
  else
    head += 4 * b * L * V * 4;
  const int64_t checkpointed = checkpoint_every > 0 ? (n + checkpoint_every - 1) / checkpoint_every : 0;
  int64_t bytes = checkpointed * block_in + (n - checkpointed) * block + head;
  // With checkpointing, backward runs one checkpointed block again with its full activations.
  bytes += std::max(loss_transient, (checkpointed > 0 ? block : 0) + backward_work);
  return bytes;
}

MemoryPlan plan_memory(const TrainingConfig& cfg, int world, bool gpu, double device_memory_bytes) {
  SEDD_CHECK(world >= 1, "memory plan: world size must be >= 1, got {}", world);
  MemoryPlan p;
  p.world = world;
  p.zero_stage = cfg.train.zero_stage;
  p.gpu = gpu;
  p.micro_batch = cfg.micro_batch(world);
  p.hidden_size = cfg.model.hidden_size;
  p.n_heads = cfg.model.n_heads;
  p.n_blocks = cfg.model.n_blocks;
  p.cond_dim = cfg.model.cond_dim;
  p.vocab_dim = cfg.model.vocab_dim();
  p.seq_len = cfg.data.seq_len;
  p.checkpoint_every = checkpoint_interval(cfg.train.activation_checkpointing);
  p.element_bytes = cfg.train.precision == "fp64" ? 8 : 4;
  // ShardedAdamW's layout: buckets of whole parameters from the last one backwards, each padded to
  // W equal chunks (aligned); the shard is one chunk of every bucket.
  const auto sizes = ddit_parameter_sizes(cfg.model);
  std::vector<int64_t> bucket_elems;  // padded
  size_t end = sizes.size();
  while (end > 0) {
    size_t first = end;
    int64_t numel = 0;
    while (first > 0 && (numel == 0 || numel < cfg.train.bucket_elems)) numel += sizes[--first];
    const int64_t chunk = ((numel + world - 1) / world + kPlanChunkAlign - 1) / kPlanChunkAlign * kPlanChunkAlign;
    p.parameters += numel;
    p.flat_elems += chunk * world;
    p.shard_elems += chunk;
    p.largest_bucket_elems = std::max(p.largest_bucket_elems, chunk * world);
    bucket_elems.push_back(chunk * world);
    end = first;
  }
  const int64_t e = p.element_bytes;
  p.param_bytes = p.flat_elems * e;
  const int64_t accumulation = cfg.rows_per_rank(world) / std::max<int64_t>(1, p.micro_batch);
  // Stage 2 holds the shard plus the bucket being filled and those being reduced (with their
  // receive chunks); with accumulation reduced once per step (train.zero2_reduce = step) the
  // buckets stay until the last micro-batch, i.e. the full gradient, as in stage 1.
  const bool stage2_sharded =
      p.zero_stage == 2 && (accumulation == 1 || cfg.train.zero2_reduce == "micro_batch");
  if (stage2_sharded) {
    // At most the bucket being filled and kPlanBucketsInFlight being reduced (and their receive
    // chunks): the largest ones, as many as there are buckets.
    std::sort(bucket_elems.rbegin(), bucket_elems.rend());
    const size_t live = std::min<size_t>(kPlanBucketsInFlight + 1, bucket_elems.size());
    int64_t transient = 0;
    for (size_t i = 0; i < live; ++i) transient += bucket_elems[i];
    for (size_t i = 0; i < std::min<size_t>(kPlanBucketsInFlight, bucket_elems.size()); ++i)
      transient += bucket_elems[i] / world;
    p.grad_bytes = (p.shard_elems + transient) * e;
    p.stage2_buckets_live = static_cast<int64_t>(live);
  } else {
    p.grad_bytes = (p.flat_elems + p.shard_elems) * e;
  }
  p.moment_bytes = 2 * p.shard_elems * e;
  p.ema_bytes = p.shard_elems * e;  // allocated whatever train.ema is
  p.master_bytes = 0;
  if (gpu && cfg.train.precision == "bf16") {
    int64_t matrices = 0;  // the blocks' and the output layer's weight matrices, cast once per micro-batch
    const int64_t D = cfg.model.hidden_size, C = cfg.model.cond_dim;
    matrices = cfg.model.n_blocks * (12 * D * D + 6 * D * C) + cfg.model.vocab_dim() * D + 2 * D * C;
    p.autocast_weight_bytes = 2 * matrices;
  }
  p.reserve_bytes = gpu ? int64_t{2} << 30 : 0;
  p.activation_plain_bytes = activation_bytes(cfg, p.micro_batch, 0, gpu);
  p.activation_checkpointed_bytes = activation_bytes(cfg, p.micro_batch, 1, gpu);
  p.activation_bytes = activation_bytes(cfg, p.micro_batch, p.checkpoint_every, gpu);

  if (cfg.plan.memory_gb > 0) {
    p.memory_bytes = cfg.plan.memory_gb * 1e9;
    p.memory_source = "plan.memory_gb";
  } else if (gpu) {
    SEDD_CHECK(device_memory_bytes > 0, "memory plan: no GPU to read the memory of; set plan.memory_gb");
    p.memory_bytes = device_memory_bytes;
    p.memory_source = "the GPU's memory";
  } else {
    p.memory_bytes = physical_memory_bytes();
    p.memory_source = "this machine's physical memory (CPU run; set plan.memory_gb for another budget)";
  }
  auto largest = [&](int64_t every) {
    const double room = p.memory_bytes - static_cast<double>(p.state_bytes());
    if (room < static_cast<double>(activation_bytes(cfg, 1, every, gpu))) return int64_t{0};
    int64_t lo = 1, hi = 2;
    while (hi < (int64_t{1} << 24) && static_cast<double>(activation_bytes(cfg, hi, every, gpu)) <= room) lo = hi, hi *= 2;
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      (static_cast<double>(activation_bytes(cfg, mid, every, gpu)) <= room ? lo : hi) = mid;
    }
    return lo;
  };
  p.largest_micro_batch = largest(p.checkpoint_every);
  p.largest_micro_batch_checkpointed = largest(1);
  return p;
}

double physical_memory_bytes() {
  return static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
}

double device_memory_bytes(const torch::Device& device) {
#ifdef SEDD_HAVE_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device.index()) == cudaSuccess) return static_cast<double>(prop.totalGlobalMem);
  }
#endif
  (void)device;
  return 0;
}

std::string MemoryPlan::text() const {
  std::string out = fmt::format(
      "[plan] memory per rank: {} ranks, ZeRO-{}, micro-batch {} x {} tokens, activation checkpointing {}, "
      "{} parameters ({})\n",
      world, zero_stage, micro_batch, seq_len,
      checkpoint_every == 0 ? "off" : checkpoint_every == 1 ? "every block" : fmt::format("every {} blocks", checkpoint_every),
      parameters, gpu ? "GPU, bf16 autocast if set" : "CPU");
  auto row = [&](const char* what, int64_t bytes, const std::string& note) {
    out += fmt::format("[plan]   {:<28} {:>10}  {}\n", what, plan_gb(static_cast<double>(bytes)), note);
  };
  row("parameters", param_bytes, fmt::format("{} x {} padded elements", element_bytes, flat_elems));
  row("gradients", grad_bytes,
      zero_stage == 2 && grad_bytes < (flat_elems + shard_elems) * element_bytes
          ? fmt::format("shard {} + the {} largest buckets (<= {}) being filled or reduced", shard_elems,
                        stage2_buckets_live, largest_bucket_elems)
          : fmt::format("full flat buffer {} + shard {}", flat_elems, shard_elems));
  row("optimizer moments", moment_bytes, fmt::format("exp_avg + exp_avg_sq over the shard of {}", shard_elems));
  row("EMA", ema_bytes, "over the shard");
  row("master copies", master_bytes, "none: the weights are fp32 and updated in place");
  if (autocast_weight_bytes > 0) row("bf16 weight casts", autocast_weight_bytes, "autocast's copies kept for backward");
  if (reserve_bytes > 0) row("reserve", reserve_bytes, "CUDA context, NCCL, allocator slack");
  row("activations (no ckpt)", activation_plain_bytes, fmt::format("per micro-batch of {}", micro_batch));
  row("activations (ckpt blocks)", activation_checkpointed_bytes, fmt::format("per micro-batch of {}", micro_batch));
  row("total", total_bytes(), fmt::format("of {} ({}): {}", plan_gb(memory_bytes), memory_source,
                                          fits() ? "fits" : "DOES NOT FIT"));
  out += fmt::format("[plan]   largest micro-batch that fits: {} with this setting, {} with every block checkpointed\n",
                     largest_micro_batch, largest_micro_batch_checkpointed);
  return out;
}

std::string MemoryPlan::json() const {
  nlohmann::json j = {{"world", world},
                      {"hidden_size", hidden_size},
                      {"n_heads", n_heads},
                      {"n_blocks", n_blocks},
                      {"cond_dim", cond_dim},
                      {"vocab_dim", vocab_dim},
                      {"zero_stage", zero_stage},
                      {"micro_batch", micro_batch},
                      {"seq_len", seq_len},
                      {"checkpoint_every", checkpoint_every},
                      {"gpu", gpu},
                      {"parameters", parameters},
                      {"flat_elems", flat_elems},
                      {"shard_elems", shard_elems},
                      {"element_bytes", element_bytes},
                      {"param_bytes", param_bytes},
                      {"grad_bytes", grad_bytes},
                      {"moment_bytes", moment_bytes},
                      {"ema_bytes", ema_bytes},
                      {"master_bytes", master_bytes},
                      {"autocast_weight_bytes", autocast_weight_bytes},
                      {"reserve_bytes", reserve_bytes},
                      {"activation_plain_bytes", activation_plain_bytes},
                      {"activation_checkpointed_bytes", activation_checkpointed_bytes},
                      {"activation_bytes", activation_bytes},
                      {"state_bytes", state_bytes()},
                      {"total_bytes", total_bytes()},
                      {"memory_bytes", memory_bytes},
                      {"fits", fits()},
                      {"largest_micro_batch", largest_micro_batch},
                      {"largest_micro_batch_checkpointed", largest_micro_batch_checkpointed}};
  return j.dump();
}

}  // namespace sedd
