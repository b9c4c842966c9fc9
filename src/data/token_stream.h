// TokenStream: the per-rank streaming reader of a sharded token dataset.
//
// Global order (docs/DESIGN.md, "Formats"): each shard is cut into windows of seq_len tokens; epoch e
// visits all windows in a permutation seeded by (seed, e). Global sequence k is a pure function
// of (seed, k) and never of the world size; rank r of W takes rows [r B/W, (r+1) B/W) of every
// global batch of B sequences. The position (global sequences consumed) is all a checkpoint
// needs to resume exactly, on any number of ranks. A background thread reads ahead.
#pragma once
#include <torch/torch.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/shard.h"
#include "io/hdf5.h"

namespace sedd {

struct TokenStreamConfig {
  std::string data;          // comma-separated shard paths and/or globs
  int64_t seq_len = 128;
  int64_t global_batch = 8;  // sequences per global batch (all ranks together)
  int rank = 0;
  int world = 1;
  uint64_t seed = 0;
  bool shuffle = true;
  int prefetch = 2;          // batches read ahead on a background thread; 0 = read in next()
  bool pin_memory = false;   // batches in page-locked memory, for asynchronous copies to a GPU
};

struct WindowRef {
  int shard;
  int64_t window;            // window index inside the shard
};

class TokenStream {
 public:
  explicit TokenStream(TokenStreamConfig cfg);
  ~TokenStream();
  TokenStream(const TokenStream&) = delete;
  TokenStream& operator=(const TokenStream&) = delete;

  torch::Tensor next();                     // [global_batch / world, seq_len] int64
  int64_t position() const { return position_; }
  void seek(int64_t position);              // global sequences consumed so far
  int64_t rows_per_rank() const { return cfg_.global_batch / cfg_.world; }
  int64_t windows_per_epoch() const { return total_windows_; }
  // Tokens never read: each shard's tail shorter than seq_len (windows do not cross shards).
  int64_t dropped_tokens() const { return dropped_tokens_; }
  int64_t total_tokens() const { return total_tokens_; }
  WindowRef locate(int64_t k) const;        // global sequence k -> its window
  const ShardInfo& shard(int i) const { return shards_[i]; }
  size_t shard_count() const { return shards_.size(); }
  int64_t vocab_size() const { return shards_[0].vocab_size; }
  int64_t eot_id() const { return shards_[0].eot_id; }
  const std::string& tokenizer() const { return shards_[0].tokenizer; }
  const TokenStreamConfig& config() const { return cfg_; }

 private:
  torch::Tensor read_rows(int64_t batch_start);  // this rank's rows of the batch at batch_start
  void read_window(const WindowRef& w, int64_t* out);
  const std::vector<int64_t>& permutation(int64_t epoch) const;
  void start_prefetch();
  void stop_prefetch();

  TokenStreamConfig cfg_;
  std::vector<ShardInfo> shards_;
  std::vector<int64_t> window_offsets_;  // prefix sums of windows per shard
  int64_t total_windows_ = 0, total_tokens_ = 0, dropped_tokens_ = 0;
  std::vector<std::unique_ptr<ShardReader>> readers_;  // opened on first use
  int64_t position_ = 0;

  mutable std::mutex perm_mutex_;
  mutable int64_t perm_epoch_ = -1;
  mutable std::vector<int64_t> perm_;

  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<torch::Tensor> ready_;
  int64_t next_to_read_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace sedd
