// ZeRO-1 sharded AdamW; see zero.h.
#include "distributed/zero.h"

#include <chrono>
#include <cmath>

#include "io/error.h"

namespace sedd {

ShardedAdamW::ShardedAdamW(std::vector<torch::Tensor> params, Communicator& comm, AdamWConfig cfg)
    : comm_(comm), cfg_(cfg), params_(std::move(params)) {
  SEDD_CHECK(!params_.empty(), "ShardedAdamW: no parameters");
  const int W = comm_.size();
  auto opts = params_[0].options().requires_grad(false);
  for (const auto& p : params_) numel_ += p.numel();
  int64_t padded = (numel_ + W - 1) / W * W;  // equal slices for every rank (NCCL needs them)
  flat_param_ = torch::zeros({padded}, opts);
  flat_grad_ = torch::zeros({padded}, opts);
  int64_t off = 0;
  torch::NoGradGuard no_grad;
  for (auto& p : params_) {
    auto view = flat_param_.narrow(0, off, p.numel()).view(p.sizes());
    view.copy_(p);
    p.set_data(view);  // the module now reads and writes the flat buffer
    p.mutable_grad() = flat_grad_.narrow(0, off, p.numel()).view(p.sizes());
    off += p.numel();
  }
  own_ = shard_range(padded, W, comm_.rank());

  // Buckets of whole parameters, from the last parameter backwards; the padding joins the first
  // bucket (the one at the end of the buffer).
  bucket_of_param_.assign(params_.size(), 0);
  int64_t end = padded, size = padded - numel_, first_param_offset = numel_;
  int count = 0;
  for (size_t i = params_.size(); i-- > 0;) {
    first_param_offset -= params_[i].numel();
    size += params_[i].numel();
    bucket_of_param_[i] = static_cast<int>(buckets_.size());
    ++count;
    if (size >= cfg_.bucket_elems || i == 0) {
      buckets_.push_back({first_param_offset, end, count});
      end = first_param_offset;
      size = 0;
      count = 0;
    }
  }
  arrived_.assign(buckets_.size(), 0);
  param_seen_.assign(params_.size(), false);
  for (size_t i = 0; i < params_.size(); ++i) {
    if (params_[i].requires_grad()) params_[i].register_hook([this, i](const torch::Tensor&) { on_gradient(i); });
    else param_seen_[i] = true, arrived_[bucket_of_param_[i]]++;  // never gets a gradient: never waited for
  }
  exp_avg_ = torch::zeros({own_.size()}, opts);
  exp_avg_sq_ = torch::zeros({own_.size()}, opts);
  grad_shard_ = torch::zeros({own_.size()}, opts);
  ema_ = flat_param_.narrow(0, own_.begin, own_.size()).clone();
}

void ShardedAdamW::overlap_next_backward() {
  armed_ = true;
  next_launch_ = 0;
  std::fill(arrived_.begin(), arrived_.end(), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    param_seen_[i] = !params_[i].requires_grad();
    if (param_seen_[i]) arrived_[bucket_of_param_[i]]++;
  }
}

// Runs as each parameter's gradient is produced, *before* it is added into the flat buffer, so
// a bucket is launched on the first hook after the one that completed it.
void ShardedAdamW::on_gradient(size_t param_index) {
  if (!armed_) return;
  launch_ready_buckets(false);
  if (!param_seen_[param_index]) {
    param_seen_[param_index] = true;
    arrived_[bucket_of_param_[param_index]]++;
  }
}

void ShardedAdamW::launch_ready_buckets(bool all) {
  while (next_launch_ < buckets_.size() &&
         (all || arrived_[next_launch_] == buckets_[next_launch_].params)) {
    const Bucket& b = buckets_[next_launch_++];
    in_flight_.push_back(comm_.reduce_scatter_range(flat_grad_, b.begin, b.end, grad_shard_, ReduceOp::Mean));
    if (!all) launched_early_++;
  }
}

StepResult ShardedAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  StepResult res;
  auto t0 = std::chrono::steady_clock::now();
  if (armed_) {  // finish what backward did not launch, then wait for every bucket
    launch_ready_buckets(true);
    for (auto& w : in_flight_) w->wait();
    in_flight_.clear();
    armed_ = false;
  } else {
    comm_.reduce_scatter(flat_grad_, grad_shard_, ReduceOp::Mean);
  }
  torch::Tensor sq = grad_shard_.pow(2).sum().reshape({1}).to(torch::kDouble);
  comm_.all_reduce(sq, ReduceOp::Sum);
  comm_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  res.grad_norm = std::sqrt(sq.item<double>());
  if (!std::isfinite(res.grad_norm)) {  // every rank sees the same norm, so every rank skips
    res.skipped = true;
    flat_grad_.zero_();
    return res;
  }
  if (cfg_.grad_clip > 0 && res.grad_norm > cfg_.grad_clip) grad_shard_.mul_(cfg_.grad_clip / (res.grad_norm + 1e-6));

  steps_++;
  auto p = flat_param_.narrow(0, own_.begin, own_.size());
  const double bc1 = 1 - std::pow(cfg_.beta1, static_cast<double>(steps_));
  const double bc2 = 1 - std::pow(cfg_.beta2, static_cast<double>(steps_));
  if (cfg_.weight_decay > 0) p.mul_(1 - lr * cfg_.weight_decay);  // decoupled weight decay
  exp_avg_.mul_(cfg_.beta1).add_(grad_shard_, 1 - cfg_.beta1);
  exp_avg_sq_.mul_(cfg_.beta2).addcmul_(grad_shard_, grad_shard_, 1 - cfg_.beta2);
  auto denom = (exp_avg_sq_ / bc2).sqrt_().add_(cfg_.eps);
  p.addcdiv_(exp_avg_, denom, -lr / bc1);
  if (cfg_.ema > 0) ema_.mul_(cfg_.ema).add_(p, 1 - cfg_.ema);
  else ema_.copy_(p);

  torch::Tensor mine = p.clone();
  auto t1 = std::chrono::steady_clock::now();
  comm_.all_gather(mine, flat_param_);
  comm_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  flat_grad_.zero_();
  return res;
}

torch::Tensor ShardedAdamW::gather_ema() {
  torch::Tensor full = torch::empty_like(flat_param_);
  comm_.all_gather(ema_, full);
  return full;
}

void ShardedAdamW::load_ema(const torch::Tensor& full) {
  torch::NoGradGuard no_grad;
  ema_.copy_(full.narrow(0, own_.begin, own_.size()));
}

int64_t ShardedAdamW::state_bytes() const {
  return (exp_avg_.numel() + exp_avg_sq_.numel() + ema_.numel()) * exp_avg_.element_size();
}

}  // namespace sedd
