// ZeRO-1/2 sharded AdamW; see zero.h.
#include "distributed/zero.h"

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

#include <chrono>
#include <cmath>

#include "io/error.h"

namespace sedd {

namespace {

constexpr int64_t kAlign = 4;  // chunk sizes in multiples of 16 bytes (fp32) for the collectives

// Runs before AccumulateGrad adds a parameter's gradient into its buffer (ZeRO-2: allocates it).
class BeforeAccumulate final : public torch::autograd::FunctionPreHook {
 public:
  explicit BeforeAccumulate(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    fn_();
    return grads;
  }

 private:
  std::function<void()> fn_;
};

// Runs after AccumulateGrad has added a parameter's gradient into its buffer.
class AfterAccumulate final : public torch::autograd::FunctionPostHook {
 public:
  explicit AfterAccumulate(std::function<void()> fn) : fn_(std::move(fn)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& outputs,
                                            const torch::autograd::variable_list&) override {
    fn_();
    return outputs;
  }

 private:
  std::function<void()> fn_;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

ShardedAdamW::ShardedAdamW(std::vector<ParamSpec> params, Communicator& comm, AdamWConfig cfg)
    : comm_(comm), cfg_(cfg), params_(std::move(params)) {
  SEDD_CHECK(!params_.empty(), "ShardedAdamW: no parameters");
  SEDD_CHECK(cfg_.zero_stage == 1 || cfg_.zero_stage == 2, "ShardedAdamW: ZeRO stage {} (1 or 2)", cfg_.zero_stage);
  SEDD_CHECK(cfg_.max_buckets_in_flight >= 1, "ShardedAdamW: max_buckets_in_flight {} (>= 1)",
             cfg_.max_buckets_in_flight);
  const int W = comm_.size(), r = comm_.rank();
  const size_t P = params_.size();
  param_index_of_param_.resize(P);
  for (size_t i = 0; i < P; ++i) param_index_of_param_[i] = numel_, numel_ += params_[i].tensor.numel();

  // Buckets of whole parameters, from the last parameter backwards (backward's order).
  bucket_of_param_.assign(P, 0);
  size_t end = P;
  while (end > 0) {
    size_t first = end;
    int64_t n = 0;
    while (first > 0 && (n == 0 || n < cfg_.bucket_elems)) n += params_[--first].tensor.numel();
    Bucket b{first, end, 0, n, 0, 0};
    b.chunk = ((n + W - 1) / W + kAlign - 1) / kAlign * kAlign;
    for (size_t i = first; i < end; ++i) bucket_of_param_[i] = static_cast<int>(buckets_.size());
    buckets_.push_back(b);
    end = first;
  }
  int64_t flat = 0;
  for (auto& b : buckets_) {
    b.flat_offset = flat;
    b.shard_offset = shard_numel_;
    flat += b.chunk * W;
    shard_numel_ += b.chunk;
  }

  auto opts = params_[0].tensor.options().requires_grad(false);
  flat_param_ = torch::zeros({flat}, opts);
  if (cfg_.zero_stage == 1) flat_grad_ = torch::zeros({flat}, opts);  // stage 2: per-bucket storage
  flat_offset_of_param_.resize(P);
  torch::NoGradGuard no_grad;
  for (const auto& b : buckets_) {
    int64_t off = b.flat_offset;
    for (size_t i = b.first_param; i < b.end_param; ++i) {
      auto& p = params_[i].tensor;
      flat_offset_of_param_[i] = off;
      auto view = flat_param_.narrow(0, off, p.numel()).view(p.sizes());
      view.copy_(p);
      p.set_data(view);  // the module now reads and writes the flat buffer
      if (cfg_.zero_stage == 1) p.mutable_grad() = flat_grad_.narrow(0, off, p.numel()).view(p.sizes());
      off += p.numel();
    }
  }

  grad_shard_ = torch::zeros({shard_numel_}, opts);
  exp_avg_ = torch::zeros({shard_numel_}, opts);
  exp_avg_sq_ = torch::zeros({shard_numel_}, opts);
  ema_ = torch::zeros({shard_numel_}, opts);
  step_count_ = torch::zeros({}, opts.dtype(torch::kFloat));
  reset_ema();

  // The rank's pieces (checkpoints) and its fused-AdamW operands, split at parameter boundaries so
  // each piece has one weight-decay setting.
  groups_ = {Group{cfg_.weight_decay, {}, {}, {}, {}, {}}, Group{0.0, {}, {}, {}, {}, {}}};
  for (const auto& b : buckets_) {
    const int64_t own_lo = r * b.chunk, own_hi = std::min(own_lo + b.chunk, b.numel);
    int64_t local = 0;
    for (size_t i = b.first_param; i < b.end_param; ++i) {
      const int64_t n = params_[i].tensor.numel();
      const int64_t lo = std::max(local, own_lo), hi = std::min(local + n, own_hi);
      if (lo < hi) {
        const int64_t shard_off = b.shard_offset + (lo - own_lo), count = hi - lo;
        pieces_.push_back({param_index_of_param_[i] + (lo - local), count, shard_off});
        Group& g = groups_[params_[i].decay && cfg_.weight_decay > 0 ? 0 : 1];
        g.params.push_back(flat_param_.narrow(0, b.flat_offset + lo, count));
        g.grads.push_back(grad_shard_.narrow(0, shard_off, count));
        g.exp_avgs.push_back(exp_avg_.narrow(0, shard_off, count));
        g.exp_avg_sqs.push_back(exp_avg_sq_.narrow(0, shard_off, count));
        g.steps.push_back(step_count_);
      }
      local += n;
    }
  }

  arrived_.assign(buckets_.size(), 0);
  reductions_.assign(buckets_.size(), 0);
  bucket_grad_.resize(buckets_.size());
  param_seen_.assign(P, false);
  for (size_t i = 0; i < P; ++i) {
    if (!params_[i].tensor.requires_grad()) continue;
    auto acc = torch::autograd::impl::grad_accumulator(params_[i].tensor);
    if (cfg_.zero_stage == 2)
      acc->add_pre_hook(std::make_unique<BeforeAccumulate>([this, i] { allocate_bucket(bucket_of_param_[i]); }));
    acc->add_post_hook(std::make_unique<AfterAccumulate>([this, i] { on_gradient(i); }));
    accumulators_.push_back(acc);
  }
}

ShardedAdamW::~ShardedAdamW() {
  try {
    wait_in_flight();
  } catch (...) {  // a failed collective already reported itself; nothing more to do here
  }
}

torch::Tensor ShardedAdamW::bucket_view(const torch::Tensor& flat, const Bucket& b) const {
  return flat.narrow(0, b.flat_offset, b.chunk * comm_.size());
}

torch::Tensor ShardedAdamW::own_chunk(const torch::Tensor& flat, const Bucket& b) const {
  return flat.narrow(0, b.flat_offset + comm_.rank() * b.chunk, b.chunk);
}

void ShardedAdamW::zero_grad() {
  if (cfg_.zero_stage == 1) flat_grad_.zero_();
  else release_all_buckets();
  std::fill(reductions_.begin(), reductions_.end(), 0);
}

void ShardedAdamW::count_bytes(int64_t delta) {
  live_gradient_bytes_ += delta;
  peak_gradient_bytes_ = std::max(peak_gradient_bytes_, live_gradient_bytes_);
}

void ShardedAdamW::allocate_bucket(size_t k) {
  if (bucket_grad_[k].defined()) return;
  const Bucket& b = buckets_[k];
  torch::NoGradGuard no_grad;
  bucket_grad_[k] = torch::zeros({b.chunk * comm_.size()}, flat_param_.options());
  count_bytes(bucket_grad_[k].numel() * bucket_grad_[k].element_size());
  int64_t off = 0;
  for (size_t i = b.first_param; i < b.end_param; ++i) {
    auto& p = params_[i].tensor;
    p.mutable_grad() = bucket_grad_[k].narrow(0, off, p.numel()).view(p.sizes());
    off += p.numel();
  }
}

void ShardedAdamW::release_bucket(size_t k) {
  if (!bucket_grad_[k].defined()) return;
  const Bucket& b = buckets_[k];
  for (size_t i = b.first_param; i < b.end_param; ++i) params_[i].tensor.mutable_grad() = torch::Tensor();
  count_bytes(-bucket_grad_[k].numel() * bucket_grad_[k].element_size());
  bucket_grad_[k] = torch::Tensor();
}

void ShardedAdamW::release_all_buckets() {
  for (size_t k = 0; k < buckets_.size(); ++k) release_bucket(k);
}

int64_t ShardedAdamW::gradient_bytes() const {
  const int64_t shard = grad_shard_.numel() * grad_shard_.element_size();
  if (cfg_.zero_stage == 1) return shard + flat_grad_.numel() * flat_grad_.element_size();
  return shard + live_gradient_bytes_;
}

int64_t ShardedAdamW::peak_gradient_bytes() const {
  if (cfg_.zero_stage == 1) return gradient_bytes();
  return grad_shard_.numel() * grad_shard_.element_size() + peak_gradient_bytes_;
}

void ShardedAdamW::begin_backward(bool last_micro_batch) {
  if (armed_) {  // the previous micro-batch was reduced while its backward ran: complete it
    launch_ready_buckets(true);
    wait_in_flight();
    armed_ = false;
  }
  if (last_micro_batch || (cfg_.zero_stage == 2 && cfg_.reduce_every_micro_batch)) overlap_next_backward();
}

void ShardedAdamW::overlap_next_backward() {
  armed_ = true;
  next_launch_ = 0;
  std::fill(arrived_.begin(), arrived_.end(), 0);
  for (size_t i = 0; i < params_.size(); ++i) {
    param_seen_[i] = !params_[i].tensor.requires_grad();  // never gets a gradient: never waited for
    if (param_seen_[i]) arrived_[bucket_of_param_[i]]++;
  }
}

void ShardedAdamW::on_gradient(size_t i) {
  if (!armed_ || param_seen_[i]) return;
  param_seen_[i] = true;
  arrived_[bucket_of_param_[i]]++;
  launch_ready_buckets(false);
}

void ShardedAdamW::launch(size_t k) {
  const Bucket& b = buckets_[k];
  torch::NoGradGuard no_grad;
  if (cfg_.zero_stage == 2) {
    // Bound the buckets held: the oldest reduction completes (and frees its bucket) first.
    while (static_cast<int>(in_flight_.size()) >= cfg_.max_buckets_in_flight) {
      retire(in_flight_.front());
      in_flight_.erase(in_flight_.begin());
    }
    allocate_bucket(k);  // a bucket no gradient reached this step still takes part (zeros)
  }
  auto t0 = std::chrono::steady_clock::now();
  InFlight f{nullptr, k, torch::Tensor()};
  // The first reduction of the step writes the shard; later ones (stage 2, every micro-batch)
  // receive apart and are added when retired.
  auto mine = grad_shard_.narrow(0, b.shard_offset, b.chunk);
  if (reductions_[k]++ > 0) {
    f.received = torch::empty({b.chunk}, grad_shard_.options());
    count_bytes(b.chunk * grad_shard_.element_size());
    mine = f.received;
  }
  const auto full = cfg_.zero_stage == 1 ? bucket_view(flat_grad_, b) : bucket_grad_[k];
  f.work = comm_.reduce_scatter_async(full, mine, ReduceOp::Mean,
                                      fmt::format("reduce_scatter of gradient bucket {} of {}", k + 1, buckets_.size()));
  in_flight_.push_back(std::move(f));
  comm_seconds_ += seconds_since(t0);
}

void ShardedAdamW::retire(InFlight& f) {
  auto t0 = std::chrono::steady_clock::now();
  f.work->wait();
  comm_seconds_ += seconds_since(t0);
  f.work.reset();
  if (f.bucket >= buckets_.size()) return;  // not a gradient reduction
  if (f.received.defined()) {
    const Bucket& b = buckets_[f.bucket];
    grad_shard_.narrow(0, b.shard_offset, b.chunk).add_(f.received);
    count_bytes(-f.received.numel() * f.received.element_size());
    f.received = torch::Tensor();
  }
  if (cfg_.zero_stage == 2) release_bucket(f.bucket);
}

void ShardedAdamW::launch_ready_buckets(bool all) {
  while (next_launch_ < buckets_.size()) {
    const Bucket& b = buckets_[next_launch_];
    if (!all && arrived_[next_launch_] < static_cast<int>(b.end_param - b.first_param)) break;
    if (!all) launched_early_++;
    launch(next_launch_++);
  }
}

void ShardedAdamW::wait_in_flight() {
  for (auto& f : in_flight_) retire(f);
  in_flight_.clear();
}

void ShardedAdamW::discard() {
  if (armed_) launch_ready_buckets(true);  // every rank launched the same buckets: finish them all
  wait_in_flight();
  armed_ = false;
  zero_grad();
}

StepStats ShardedAdamW::step(double lr, const torch::Tensor& local_loss) {
  torch::NoGradGuard no_grad;
  if (!armed_) next_launch_ = 0;
  launch_ready_buckets(true);
  wait_in_flight();
  armed_ = false;

  // Squared norm of the own shard and the loss, summed over ranks in one device all-reduce.
  auto stats = torch::stack({grad_shard_.square().sum(torch::kDouble), local_loss.to(torch::kDouble).reshape({})});
  auto t0 = std::chrono::steady_clock::now();
  comm_.all_reduce(stats, ReduceOp::Sum);
  comm_seconds_ += seconds_since(t0);
  StepStats out;
  out.grad_norm = stats[0].sqrt();
  out.loss_sum = stats[1];
  auto finite = torch::isfinite(out.grad_norm).logical_and(torch::isfinite(out.loss_sum));
  auto found_inf = finite.logical_not().to(torch::kFloat);
  out.skipped = found_inf;

  // Clipping as torch.nn.utils.clip_grad_norm_ does it (the reference trainers' rule): the reduced
  // gradient is multiplied by min(1, clip / (norm + 1e-6)) in its own dtype before the update.
  auto clip_coef = torch::ones({}, out.grad_norm.options());
  if (cfg_.grad_clip > 0)
    clip_coef = torch::where(finite, torch::clamp_max(cfg_.grad_clip / (out.grad_norm + 1e-6), 1.0), clip_coef);
  out.clip_coef = clip_coef;
  if (keep_gradient_) last_gradient_ = grad_shard_.clone();
  grad_shard_.mul_(clip_coef.to(grad_shard_.scalar_type()));
  step_count_.add_(1);
  for (auto& g : groups_) {
    if (g.params.empty()) continue;
    at::_fused_adamw_(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, {}, g.steps, lr, cfg_.beta1, cfg_.beta2,
                      g.weight_decay, cfg_.eps, /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/{}, found_inf);
  }
  step_count_.sub_(found_inf);  // a skipped update does not count

  // EMA of the own chunks; weight 0 when the update was skipped. The warm-up decay is computed in
  // float64 (as the reference's Python float), then cast to the weights' dtype.
  torch::Tensor ema_weight;
  auto skipped64 = found_inf.to(torch::kDouble);
  if (cfg_.ema <= 0) {
    ema_weight = 1 - skipped64;
  } else {
    auto n = step_count_.to(torch::kDouble);
    auto decay = torch::full({}, cfg_.ema, n.options());
    if (cfg_.ema_warmup) decay = torch::minimum(decay, (1 + n) / (10 + n));
    ema_weight = (1 - decay) * (1 - skipped64);
  }
  for (const auto& b : buckets_)
    ema_.narrow(0, b.shard_offset, b.chunk).lerp_(own_chunk(flat_param_, b), ema_weight.to(ema_.scalar_type()));

  // Every rank's updated chunks to everyone, bucket by bucket, in place.
  auto t1 = std::chrono::steady_clock::now();
  for (size_t k = 0; k < buckets_.size(); ++k) {
    auto full = bucket_view(flat_param_, buckets_[k]);
    in_flight_.push_back({comm_.all_gather_async(own_chunk(flat_param_, buckets_[k]), full,
                                                 fmt::format("all_gather of parameter bucket {} of {}", k + 1,
                                                             buckets_.size())),
                          buckets_.size(), torch::Tensor()});
  }
  wait_in_flight();
  comm_seconds_ += seconds_since(t1);
  zero_grad();
  return out;
}

double ShardedAdamW::steps_taken() const { return step_count_.item<double>(); }

void ShardedAdamW::set_steps_taken(double steps) { step_count_.fill_(steps); }

torch::Tensor ShardedAdamW::gather_shard(const torch::Tensor& shard, const std::string& what) {
  SEDD_CHECK(shard.numel() == shard_numel_, "gather_shard: {} elements for a shard of {}", shard.numel(), shard_numel_);
  torch::NoGradGuard ng;
  torch::Tensor padded = torch::empty_like(flat_param_);
  for (size_t k = 0; k < buckets_.size(); ++k) {
    const Bucket& b = buckets_[k];
    auto full = bucket_view(padded, b);
    auto mine = own_chunk(padded, b);
    mine.copy_(shard.narrow(0, b.shard_offset, b.chunk));
    comm_.all_gather_async(mine, full, fmt::format("all_gather of {} bucket {} of {}", what, k + 1, buckets_.size()))
        ->wait();
  }
  std::vector<torch::Tensor> parts;
  for (size_t i = 0; i < params_.size(); ++i)
    parts.push_back(padded.narrow(0, flat_offset_of_param_[i], params_[i].tensor.numel()));
  return torch::cat(parts);
}

torch::Tensor ShardedAdamW::gather_ema() { return gather_shard(ema_, "EMA"); }

torch::Tensor ShardedAdamW::last_gradient() {
  SEDD_CHECK(keep_gradient_ && last_gradient_.defined(), "last_gradient: call keep_gradient(true) before the step");
  return gather_shard(last_gradient_, "gradient");
}

void ShardedAdamW::reset_ema() {
  torch::NoGradGuard ng;
  for (const auto& b : buckets_) ema_.narrow(0, b.shard_offset, b.chunk).copy_(own_chunk(flat_param_, b));
}

void ShardedAdamW::load_ema(const torch::Tensor& full) {
  SEDD_CHECK(full.numel() == numel_, "load_ema: {} elements for {} parameters", full.numel(), numel_);
  torch::NoGradGuard ng;
  auto src = full.to(ema_.device(), ema_.scalar_type());
  for (const auto& p : pieces_) ema_.narrow(0, p.shard_offset, p.count).copy_(src.narrow(0, p.param_index, p.count));
}

int64_t ShardedAdamW::state_bytes() const {
  return (exp_avg_.numel() + exp_avg_sq_.numel() + ema_.numel()) * exp_avg_.element_size();
}

}  // namespace sedd
