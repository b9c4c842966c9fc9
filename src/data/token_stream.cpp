// TokenStream; see token_stream.h.
#include "data/token_stream.h"

#include <algorithm>
#include <numeric>
#include <random>

#include "io/error.h"

namespace sedd {

TokenStream::TokenStream(TokenStreamConfig cfg) : cfg_(std::move(cfg)) {
  SEDD_CHECK(cfg_.seq_len > 0, "data.seq_len must be positive, got {}", cfg_.seq_len);
  SEDD_CHECK(cfg_.world > 0 && cfg_.rank >= 0 && cfg_.rank < cfg_.world, "TokenStream: bad rank {} of {}",
             cfg_.rank, cfg_.world);
  SEDD_CHECK(cfg_.global_batch > 0 && cfg_.global_batch % cfg_.world == 0,
             "train.batch_size ({}) must be divisible by the number of ranks ({})", cfg_.global_batch, cfg_.world);
  shards_ = read_shard_set(cfg_.data);
  window_offsets_.push_back(0);
  for (const auto& s : shards_) {
    window_offsets_.push_back(window_offsets_.back() + s.tokens / cfg_.seq_len);
    total_tokens_ += s.tokens;
    dropped_tokens_ += s.tokens % cfg_.seq_len;
  }
  total_windows_ = window_offsets_.back();
  SEDD_CHECK_INPUT(total_windows_ > 0, "{}: the shards hold no full window of seq_len = {} tokens", cfg_.data,
                   cfg_.seq_len);
  readers_.resize(shards_.size());
  start_prefetch();
}

TokenStream::~TokenStream() { stop_prefetch(); }

const std::vector<int64_t>& TokenStream::permutation(int64_t epoch) const {
  // Called with perm_mutex_ held. Fisher-Yates with mt19937_64 and our own bounded draw, so the
  // order is the same with every standard library.
  if (perm_epoch_ == epoch) return perm_;
  perm_.resize(total_windows_);
  std::iota(perm_.begin(), perm_.end(), 0);
  if (cfg_.shuffle) {
    std::mt19937_64 rng(cfg_.seed * 0x9E3779B97F4A7C15ULL + static_cast<uint64_t>(epoch) + 1);
    for (int64_t i = total_windows_ - 1; i > 0; --i) {
      uint64_t bound = static_cast<uint64_t>(i) + 1, limit = UINT64_MAX - UINT64_MAX % bound, x;
      do x = rng(); while (x >= limit);
      std::swap(perm_[i], perm_[static_cast<int64_t>(x % bound)]);
    }
  }
  perm_epoch_ = epoch;
  return perm_;
}

WindowRef TokenStream::locate(int64_t k) const {
  std::lock_guard<std::mutex> lock(perm_mutex_);
  int64_t w = permutation(k / total_windows_)[k % total_windows_];
  int shard = static_cast<int>(std::upper_bound(window_offsets_.begin(), window_offsets_.end(), w) -
                               window_offsets_.begin()) - 1;
  return {shard, w - window_offsets_[shard]};
}

void TokenStream::read_window(const WindowRef& w, int64_t* out) {
  const ShardInfo& s = shards_[w.shard];
  if (!readers_[w.shard]) readers_[w.shard] = std::make_unique<ShardReader>(s);
  int64_t offset = w.window * cfg_.seq_len;
  int64_t hi = readers_[w.shard]->read(offset, cfg_.seq_len, out);
  if (hi >= s.vocab_size) {
    int64_t at = std::find_if(out, out + cfg_.seq_len, [&](int64_t v) { return v >= s.vocab_size; }) - out;
    fail_input("{}: token id {} >= vocab_size {} at offset {}", s.path, out[at], s.vocab_size, offset + at);
  }
}

torch::Tensor TokenStream::read_rows(int64_t batch_start) {
  const int64_t rows = rows_per_rank();
  torch::Tensor out = torch::empty({rows, cfg_.seq_len}, torch::TensorOptions().dtype(torch::kLong).pinned_memory(cfg_.pin_memory));
  int64_t* data = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    int64_t k = batch_start + cfg_.rank * rows + i;
    read_window(locate(k), data + i * cfg_.seq_len);
  }
  return out;
}

void TokenStream::start_prefetch() {
  next_to_read_ = position_;
  stop_ = false;
  error_ = nullptr;
  if (cfg_.prefetch <= 0) return;
  worker_ = std::thread([this] {
    try {
      for (;;) {
        int64_t start;
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return stop_ || static_cast<int>(ready_.size()) < cfg_.prefetch; });
          if (stop_) return;
          start = next_to_read_;
          next_to_read_ += cfg_.global_batch;
        }
        torch::Tensor batch = read_rows(start);
        std::lock_guard<std::mutex> lock(mu_);
        if (stop_) return;
        ready_.push_back(std::move(batch));
        cv_.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      error_ = std::current_exception();
      cv_.notify_all();
    }
  });
}

void TokenStream::stop_prefetch() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  if (worker_.joinable()) worker_.join();
  ready_.clear();
}

torch::Tensor TokenStream::next() {
  torch::Tensor batch;
  if (cfg_.prefetch <= 0) {
    batch = read_rows(position_);
  } else {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !ready_.empty() || error_; });
    if (ready_.empty() && error_) std::rethrow_exception(error_);
    batch = std::move(ready_.front());
    ready_.pop_front();
    cv_.notify_all();
  }
  position_ += cfg_.global_batch;
  return batch;
}

void TokenStream::seek(int64_t position) {
  SEDD_CHECK(position >= 0, "TokenStream: negative position {}", position);
  stop_prefetch();
  position_ = position;
  start_prefetch();
}

}  // namespace sedd
