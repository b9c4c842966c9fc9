// ZeRO-1 sharded AdamW; see zero.h.
#include "dist/zero.h"

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
  exp_avg_ = torch::zeros({own_.size()}, opts);
  exp_avg_sq_ = torch::zeros({own_.size()}, opts);
  grad_shard_ = torch::zeros({own_.size()}, opts);
  ema_ = flat_param_.narrow(0, own_.begin, own_.size()).clone();
}

StepResult ShardedAdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  StepResult res;
  auto t0 = std::chrono::steady_clock::now();
  comm_.reduce_scatter(flat_grad_, grad_shard_, ReduceOp::Mean);
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
