// Trainer; see trainer.h.
#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>

#include "diffusion/keyed_random.h"
#include "diffusion/times.h"
#include "io/error.h"
#include "io/fs.h"
#include "model/fused_ops.h"
#include "model/weights.h"
#include "train/fingerprint.h"
#include "train/memory_plan.h"
#include "train/metrics.h"

namespace sedd {

namespace {
constexpr uint64_t kValidKey = 0xFFFFFFFFull;  // step key of validation draws (never a training step)

std::string human_seconds(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

// What a log line reports, accumulated on the device between lines.
struct Trainer::Log {
  std::unique_ptr<MetricsLog> metrics;
  std::chrono::steady_clock::time_point start, window_start;
  int64_t window_tokens = 0, window_steps = 0;
  double elapsed_before = 0;  // from earlier segments of a resumed run
  int64_t first_step = 0;
  double peak_flops = 0;      // per GPU, for MFU
  torch::Tensor loss_sum, loss_steps, skipped, grad_norm, last_loss;  // device scalars (float64)
  void reset(torch::Device device) {
    auto opts = torch::TensorOptions().dtype(torch::kDouble).device(device);
    loss_sum = torch::zeros({}, opts);
    loss_steps = torch::zeros({}, opts);
    skipped = torch::zeros({}, opts);
    grad_norm = torch::zeros({}, opts);
    last_loss = torch::zeros({}, opts);
    window_tokens = window_steps = 0;
  }
};

Trainer::Trainer(TrainingConfig cfg, Runtime& rt, Communicator& comm, ControlPlane& control, std::string config_text)
    : cfg_(std::move(cfg)), rt_(rt), comm_(comm), control_(control), config_text_(std::move(config_text)),
      log_(new Log) {
  cfg_.validate(comm_.size());
  SEDD_CHECK(comm_.device() == rt_.device, "Trainer: the communicator works on {}, the run on {}",
             comm_.device().str(), rt_.device.str());
  TokenStreamConfig tc;
  tc.data = cfg_.data.train;
  tc.seq_len = cfg_.data.seq_len;
  tc.global_batch = cfg_.train.batch_size;
  tc.rank = comm_.rank();
  tc.world = comm_.size();
  tc.seed = cfg_.run.seed;
  tc.prefetch = cfg_.data.prefetch;
  tc.pin_memory = rt_.device.is_cuda();
  train_ = std::make_unique<TokenStream>(tc);
  if (!cfg_.data.valid.empty()) {
    tc.data = cfg_.data.valid;
    tc.shuffle = false;
    valid_ = std::make_unique<TokenStream>(tc);
    SEDD_CHECK_INPUT(valid_->vocab_size() == train_->vocab_size() && valid_->tokenizer() == train_->tokenizer(),
               "{}: the validation data uses another vocabulary/tokenizer than {}", cfg_.data.valid, cfg_.data.train);
  }
  cfg_.model.tokens = train_->vocab_size();
  cfg_.model.length = cfg_.data.seq_len;
  cfg_.model.bos = train_->eot_id();
  graph_ = make_graph(cfg_.model.graph, cfg_.model.tokens);
  noise_ = make_noise(cfg_.model.noise);
  loss_options_.fused = cfg_.train.fused_loss;
  loss_options_.chunk_elems = cfg_.train.loss_chunk_elems;
  loss_options_.lambda_ce = cfg_.train.lambda_ce;

  dtype_ = cfg_.train.precision == "fp64" ? torch::kDouble : torch::kFloat;
  torch::manual_seed(cfg_.run.seed);  // the same initial weights on every rank
  model_ = DDiT(cfg_.model);
  model_->to(rt_.device, dtype_);
  if (!cfg_.train.init_from.empty()) {
    // Starting weights from a model file (raw weights, strict names and shapes): fine-tuning, or
    // the same start as another trainer. A resumed run takes its checkpoint's weights instead.
    DDiT init = load_model_file(cfg_.train.init_from, /*use_ema=*/false);
    torch::NoGradGuard ng;
    load_state_dict(*model_, state_dict(*init), cfg_.train.init_from);
  }
  model_->bf16 = cfg_.train.precision == "bf16";
  model_->fused_kernels = cfg_.train.fused_kernels;
  model_->checkpoint_every = checkpoint_interval(cfg_.train.activation_checkpointing);
  if (rt_.device.is_cuda()) {
    // TF32 for the fp32 matmuls that remain (bf16 runs do their matmuls in bf16 anyway).
    at::globalContext().setAllowTF32CuBLAS(true);
    at::globalContext().setAllowTF32CuDNN(true);
  }
  AdamWConfig ac{cfg_.train.beta1,     cfg_.train.beta2, cfg_.train.adam_eps, cfg_.train.weight_decay,
                 cfg_.train.grad_clip, cfg_.train.ema,   true,                cfg_.train.bucket_elems};
  ac.zero_stage = cfg_.train.zero_stage;
  ac.reduce_every_micro_batch = cfg_.train.zero2_reduce == "micro_batch";
  std::vector<ParamSpec> params;
  for (auto& p : model_->named_parameters())  // decoupled decay on matrices only, as reference trainers do
    params.push_back({p.key(), p.value(), p.value().dim() >= 2 && p.key() != "vocab_embed.embedding"});
  opt_ = std::make_unique<ShardedAdamW>(std::move(params), comm_, ac);
  // One job per run folder: rank 0 holds <run.dir>/LOCK for the life of the trainer.
  std::string lock_error, lock_note;
  if (comm_.rank() == 0) {
    try {
      run_lock_ = std::make_unique<RunLock>(cfg_.run.dir, RunLockOptions{}, &lock_note);
    } catch (const OptionError& e) {
      lock_error = e.what();
    }
    if (!lock_note.empty()) std::printf("[train] %s\n", lock_note.c_str());
  }
  if (control_.any(!lock_error.empty(), "run folder lock"))
    throw OptionError(lock_error.empty() ? cfg_.run.dir + ": in use by another job (rank 0 names it)" : lock_error);
  ckpt_ = std::make_unique<Checkpointer>(cfg_.run.dir, cfg_.train.keep_ckpts);

  fingerprint_ = run_fingerprint(cfg_, *train_);
  resume();

  if (rt_.device.is_cuda()) {
    std::string name = rt_.device_name();
    log_->peak_flops = cfg_.train.peak_tflops > 0 ? cfg_.train.peak_tflops * 1e12 : gpu_peak_bf16_flops(name);
    if (comm_.rank() == 0 && log_->peak_flops == 0)
      std::printf("[train] no peak FLOP/s known for '%s': MFU is not reported (set train.peak_tflops)\n", name.c_str());
  }
  if (comm_.rank() == 0) {
    std::filesystem::create_directories(cfg_.run.dir);
    log_->metrics = std::make_unique<MetricsLog>(cfg_.run.dir + "/metrics.jsonl", step_);
    for (const auto* stream : {train_.get(), valid_.get()}) {
      if (!stream) continue;
      const char* split = stream == train_.get() ? "data.train" : "data.valid";
      std::printf("[train] %s: %zu shard(s), %lld tokens, %lld windows of %lld", split, stream->shard_count(),
                  static_cast<long long>(stream->total_tokens()), static_cast<long long>(stream->windows_per_epoch()),
                  static_cast<long long>(cfg_.data.seq_len));
      if (stream->dropped_tokens() > 0)
        std::printf("; %lld tokens (%.2f%%) in shard tails shorter than seq_len are never used",
                    static_cast<long long>(stream->dropped_tokens()),
                    100.0 * static_cast<double>(stream->dropped_tokens()) / static_cast<double>(stream->total_tokens()));
      std::printf("\n");
    }
    std::printf("[train] %s; %lld parameters\n", cfg_.model.summary().c_str(),
                static_cast<long long>(model_->parameter_count()));
    if (rt_.device.is_cuda())
      std::printf("[train] fused kernels: %s\n", model_->uses_fused_kernels(rt_.device) ? fused_ops_status().c_str()
                                                                                        : "off (train.fused_kernels)");
    try {
      std::printf("%s", plan_memory(cfg_, comm_.size(), rt_.device.is_cuda(), device_memory_bytes(rt_.device))
                            .text()
                            .c_str());
    } catch (const Error& e) {
      std::printf("[plan] no memory plan: %s\n", e.what());
    }
    std::printf("[train] threads per rank: %d (%s)\n", rt_.threads, rt_.threads_source.c_str());
    std::printf("[train] %d ranks x %d threads on %s (%s collectives); global batch %lld = %d ranks x %lld micro x "
                "%lld accumulation; optimizer+EMA state %.2f MB per rank; ZeRO-%d, gradient %.2f MB per rank; %lld "
                "gradient buckets\n",
                comm_.size(), rt_.threads, rt_.device_name().c_str(), comm_.backend().c_str(),
                static_cast<long long>(cfg_.train.batch_size), comm_.size(),
                static_cast<long long>(cfg_.micro_batch(comm_.size())),
                static_cast<long long>(cfg_.rows_per_rank(comm_.size()) / cfg_.micro_batch(comm_.size())),
                opt_->state_bytes() / 1e6, opt_->zero_stage(), opt_->gradient_bytes() / 1e6,
                static_cast<long long>(opt_->buckets()));
    std::fflush(stdout);
  }
}

Trainer::~Trainer() = default;

void Trainer::observe_steps(StepObserver fn) {
  observer_ = std::move(fn);
  opt_->keep_gradient(static_cast<bool>(observer_));
}

// Resumes from the newest checkpoint that loads on every rank. A checkpoint of another run
// (fingerprint) is refused outright; a damaged one (unreadable latest, truncated files) makes the
// run fall back to the previous complete checkpoint, saying why.
void Trainer::resume() {
  std::string note;
  const auto candidates = ckpt_->resume_candidates(&note);
  const auto allowed = parse_allowed_changes(cfg_.resume.allow);
  std::vector<std::string> failures;
  if (!note.empty()) failures.push_back(note);
  for (const auto& dir : candidates) {
    std::string err;
    TrainState st;
    try {
      st = ckpt_->read_state(dir);
    } catch (const OptionError&) {
      throw;  // written by a newer release: refuse rather than fall back and overwrite it
    } catch (const std::exception& e) {
      err = e.what();
    }
    if (err.empty() && !st.fingerprint.is_null()) {
      auto diffs = fingerprint_differences(st.fingerprint, fingerprint_, allowed);
      if (!diffs.empty()) {
        std::string list;
        for (const auto& d : diffs) list += "\n  " + d;
        throw OptionError(fmt::format(
            "{}: this run's settings differ from those of its checkpoint {}:{}\nResume with the checkpoint's "
            "settings, start a new run (another run.dir), or accept a change with --resume.allow KEY[,KEY...]",
            cfg_.run.dir, dir, list));
      }
    }
    if (err.empty()) {
      try {
        st = ckpt_->load(dir, model_, *opt_);
      } catch (const OptionError&) {
        throw;
      } catch (const std::exception& e) {
        err = e.what();
      }
    }
    if (!control_.any(!err.empty(), "loading a checkpoint")) {
      step_ = st.step;
      tokens_seen_ = st.tokens_seen;
      last_saved_ = st.step;
      log_->elapsed_before = st.elapsed_s;
      if (step_ >= cfg_.train.steps)
        throw OptionError(fmt::format("{}: the checkpoint {} is at step {} and train.steps = {}: nothing is left to "
                                      "train. Raise train.steps to continue, or start a new run (another run.dir)",
                                      cfg_.run.dir, dir, step_, cfg_.train.steps));
      train_->seek(st.data_position);
      if (comm_.rank() == 0) {
        for (const auto& f : failures) std::printf("[train] cannot resume from it: %s\n", f.c_str());
        std::printf("[train] resumed from %s%s (step %lld, saved by %d ranks, now %d)%s\n", dir.c_str(),
                    failures.empty() ? "" : " (an older checkpoint)", static_cast<long long>(st.step), st.world,
                    comm_.size(), take_requeue_marker().c_str());
        if (st.fingerprint.is_null())
          std::printf("[train] %s predates run fingerprints: its settings could not be checked\n", dir.c_str());
      }
      return;
    }
    failures.push_back(err.empty() ? fmt::format("{}: could not be loaded on another rank", dir) : err);
  }
  if (!candidates.empty() || !note.empty()) {
    std::string list;
    for (const auto& f : failures) list += "\n  " + f;
    fail_input("{}: no checkpoint can be resumed from (none was changed):{}", ckpt_->root(), list);
  }
}

void Trainer::sync_for_timing() const {
  if (time_phases_ && rt_.device.is_cuda()) torch::cuda::synchronize(rt_.device.index());
}

torch::Tensor Trainer::micro_batch(const torch::Tensor& x0, int64_t first_row, uint64_t step_key, double scale,
                                   bool train) {
  const int64_t n = x0.size(0);
  auto rows = torch::arange(first_row, first_row + n, torch::TensorOptions().dtype(torch::kLong).device(x0.device()));
  const std::string sampling = train ? cfg_.train.time_sampling : "iid";
  auto u = time_uniforms(sampling, cfg_.run.seed, step_key, rows, cfg_.train.batch_size);
  LossDraws draws{cfg_.run.seed, step_key, rows, u, sampling, cfg_.train.batch_size};
  DropoutKey key{cfg_.run.seed, step_key, rows};
  auto seq_loss = training_loss(model_, *graph_, *noise_, x0, draws, train ? &key : nullptr, loss_options_);
  auto total = seq_loss.sum();
  if (train) (total * scale).backward();
  return total.detach().to(torch::kDouble);
}

double Trainer::validation_loss(int64_t batches) {
  if (!valid_) return std::nan("");
  torch::NoGradGuard ng;
  model_->eval();
  valid_->seek(0);
  auto sum = torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(rt_.device));
  const int64_t rows = cfg_.rows_per_rank(comm_.size()), mb = cfg_.micro_batch(comm_.size());
  for (int64_t b = 0; b < batches; ++b) {
    auto x0 = valid_->next().to(rt_.device, /*non_blocking=*/true);
    for (int64_t m = 0; m < rows; m += mb)
      sum += micro_batch(x0.narrow(0, m, mb), b * cfg_.train.batch_size + comm_.rank() * rows + m, kValidKey, 0, false);
  }
  model_->train();
  double total = control_.sum(sum.item<double>(), "validation loss");
  return total / static_cast<double>(batches * cfg_.train.batch_size * cfg_.data.seq_len);
}

void Trainer::search_schedule() {
  const Objective& objective = objective_of(model_->cfg);
  const auto candidates = objective.schedule_candidates(model_->cfg);
  if (candidates.empty() || !valid_) return;
  torch::NoGradGuard ng;
  // The EMA weights score the windows (as the authors' search runs on them); the weights come back after.
  auto weights = flat_parameters(*model_);
  auto load = [&](const torch::Tensor& flat) {
    int64_t at = 0;
    for (auto& p : model_->parameters()) {
      p.copy_(flat.narrow(0, at, p.numel()).view_as(p));
      at += p.numel();
    }
  };
  load(opt_->gather_ema().to(torch::kCPU, torch::kDouble));
  model_->eval();
  valid_->seek(0);
  const int64_t rows = cfg_.rows_per_rank(comm_.size()), mb = cfg_.micro_batch(comm_.size());
  std::vector<double> variance(candidates.size(), 0.0);
  for (int64_t b = 0; b < cfg_.train.eval_batches; ++b) {
    auto x0 = valid_->next().to(rt_.device);
    // Per window: the count, sum and sum of squares of the per-block losses over every rank, in
    // float64; each batch adds its variance (their sum of per-batch variances of all-gathered losses).
    std::vector<double> sums(3 * candidates.size(), 0.0);
    for (size_t w = 0; w < candidates.size(); ++w) {
      const Process p{*graph_, *noise_, candidates[w]};
      for (int64_t m = 0; m < rows; m += mb) {
        auto part = x0.narrow(0, m, mb);
        const int64_t first = b * cfg_.train.batch_size + comm_.rank() * rows + m;
        auto ids = torch::arange(first, first + mb, torch::TensorOptions().dtype(torch::kLong).device(rt_.device));
        auto u = time_uniforms("iid", cfg_.run.seed, kValidKey, ids, cfg_.train.batch_size);
        auto d = objective.draw(p, part, LossDraws{cfg_.run.seed, kValidKey, ids, u, cfg_.train.time_sampling,
                                                   cfg_.train.batch_size});
        auto g = objective.group_losses(model_, p, part, d).to(torch::kDouble);
        sums[3 * w] += static_cast<double>(g.numel());
        sums[3 * w + 1] += g.sum().item<double>();
        sums[3 * w + 2] += g.square().sum().item<double>();
      }
    }
    sums = control_.sum(sums, "clip search");
    for (size_t w = 0; w < candidates.size(); ++w) {
      const double n = sums[3 * w], s = sums[3 * w + 1], q = sums[3 * w + 2];
      variance[w] += n > 1 ? (q - s * s / n) / (n - 1) : 0.0;
    }
  }
  load(weights);
  model_->train();
  // The least variance, the first on ties (the authors' strict < over their windows in order).
  const size_t best = static_cast<size_t>(std::min_element(variance.begin(), variance.end()) - variance.begin());
  model_->cfg.clip = cfg_.model.clip = candidates[best].clip;
  if (comm_.rank() == 0)
    std::printf("[train] step %lld: clipped schedule (%s) chosen, loss variance %.6g over %zu windows (%.6g at "
                "(1e-3, 1))\n",
                static_cast<long long>(step_), candidates[best].clip.c_str(), variance[best], variance.size(),
                variance[0]);
}

void Trainer::save_checkpoint(bool stopped_for_requeue) {
  if (last_saved_ == step_) {
    if (stopped_for_requeue && comm_.rank() == 0) mark_stopped_for_requeue(*ckpt_->latest());
    return;
  }
  TrainState st{step_, train_->position(), tokens_seen_, comm_.size(), train_->tokenizer()};
  st.stopped_for_requeue = stopped_for_requeue;
  st.elapsed_s = log_->elapsed_before + since(log_->start);
  st.fingerprint = fingerprint_;
  auto dir = ckpt_->save(st, model_, *opt_, control_, config_text_);
  last_saved_ = step_;
  if (comm_.rank() == 0) {
    std::printf("[train] checkpoint %s\n", dir.c_str());
    std::fflush(stdout);
  }
}

void Trainer::write_requeue_marker(int signal) {
  if (comm_.rank() != 0) return;
  const auto committed = ckpt_->latest();
  SEDD_CHECK(committed.has_value(), "{}/latest: missing right after a checkpoint was committed", ckpt_->root());
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
  nlohmann::json marker = {{"step", step_},
                           {"signal", signal},
                           {"checkpoint", std::filesystem::path(*committed).filename().string()},
                           {"time", when}};
  fs::write_text_atomic(cfg_.run.dir + "/REQUEUE", marker.dump() + "\n");
  std::printf("[train] %s/REQUEUE: stopped for requeue at %s\n", cfg_.run.dir.c_str(), committed->c_str());
  std::fflush(stdout);
}

std::string Trainer::take_requeue_marker() {
  const std::string path = cfg_.run.dir + "/REQUEUE";
  if (!std::filesystem::exists(path)) return "";
  std::string note = "; removed an unreadable " + path;
  try {
    auto marker = nlohmann::json::parse(fs::read_text(path));
    note = fmt::format("; the previous run was pre-empted at step {} (signal {})", marker.at("step").get<int64_t>(),
                       marker.at("signal").get<int>());
  } catch (const std::exception&) {
    // advisory only: an unreadable marker is removed like any other, and the note says so
  }
  std::filesystem::remove(path);
  return note;
}

void Trainer::log_step(double lr, double valid_loss) {
  // Reading the device accumulators is the only synchronisation of the training loop.
  const double loss_steps = log_->loss_steps.item<double>();
  const double window_loss = loss_steps > 0 ? log_->loss_sum.item<double>() / loss_steps : std::nan("");
  const double loss = log_->last_loss.item<double>();
  const int64_t skipped = static_cast<int64_t>(std::llround(log_->skipped.item<double>()));
  const double grad_norm = log_->grad_norm.item<double>();
  if (comm_.rank() == 0) {
    auto now = std::chrono::steady_clock::now();
    double window = std::chrono::duration<double>(now - log_->window_start).count();
    double elapsed = log_->elapsed_before + std::chrono::duration<double>(now - log_->start).count();
    double tps = log_->window_tokens / std::max(window, 1e-9);
    double per_step = std::chrono::duration<double>(now - log_->start).count() /
                      static_cast<double>(std::max<int64_t>(1, step_ - log_->first_step));
    nlohmann::json row = {{"step", step_},
                          {"loss", loss},
                          {"loss_window", window_loss},
                          {"lr", lr},
                          {"grad_norm", grad_norm},
                          {"tokens_per_s", tps},
                          {"elapsed_s", elapsed},
                          {"tokens_seen", tokens_seen_}};
    if (skipped > 0) row["skipped"] = skipped;
    if (std::isfinite(valid_loss)) row["valid_loss"] = valid_loss;
    std::string mfu;
    if (rt_.device.is_cuda() && log_->peak_flops > 0) {
      double m = model_flops_utilisation(tps, model_->flops_per_token(cfg_.data.seq_len), comm_.size(), log_->peak_flops);
      row["mfu"] = m;
      mfu = fmt::format(" | MFU {:.1f}%", 100 * m);
    }
    log_->metrics->write(row);
    std::printf("step %6lld/%lld | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s (all ranks)%s | ETA %s%s%s\n",
                static_cast<long long>(step_), static_cast<long long>(cfg_.train.steps), window_loss, lr, grad_norm, tps,
                mfu.c_str(), human_seconds(per_step * static_cast<double>(cfg_.train.steps - step_)).c_str(),
                skipped > 0 ? fmt::format(" | {} step(s) SKIPPED (non-finite)", skipped).c_str() : "",
                std::isfinite(valid_loss) ? fmt::format(" | valid {:.4f}", valid_loss).c_str() : "");
    std::fflush(stdout);
    log_->window_start = now;
  }
  log_->reset(rt_.device);
}

TrainOutcome Trainer::run(const std::atomic<int>* stop_signal, int64_t until_step) {
  const int64_t last_step = until_step >= 0 ? std::min(until_step, cfg_.train.steps) : cfg_.train.steps;
  model_->train();
  const int W = comm_.size();
  const int64_t rows = cfg_.rows_per_rank(W), mb = cfg_.micro_batch(W), B = cfg_.train.batch_size;
  const int64_t L = cfg_.data.seq_len;
  // The gradient of the batch mean of the per-sequence losses, or of the per-token mean (train.loss_mean).
  const double grad_scale = 1.0 / static_cast<double>(cfg_.train.loss_mean == "token" ? rows * L : rows);
  log_->start = log_->window_start = std::chrono::steady_clock::now();
  log_->first_step = step_;
  log_->reset(rt_.device);
  const auto dev_double = torch::TensorOptions().dtype(torch::kDouble).device(rt_.device);
  ControlPlane::Vote stop_vote(control_);
  while (step_ < last_step) {
    // Pre-emption: the vote started a step ago is read now, so every rank stops at the same step
    // boundary without waiting for the others in the middle of a step.
    // The vote carries the signal number (the largest if ranks got different ones).
    if (const int signal = stop_vote.result(); signal > 0) {
      if (comm_.rank() == 0)
        std::printf("[train] stop requested at step %lld (signal %d): saving a checkpoint\n",
                    static_cast<long long>(step_), signal);
      save_checkpoint(/*stopped_for_requeue=*/true);
      write_requeue_marker(signal);
      return TrainOutcome::Preempted;
    }
    stop_vote.start(stop_signal ? stop_signal->load() : 0);
    const int64_t step = step_ + 1;
    const double lr = learning_rate(cfg_.train, step);

    auto t0 = std::chrono::steady_clock::now();
    auto x0 = train_->next().to(rt_.device, /*non_blocking=*/true);  // [rows, L], pinned on GPU runs
    sync_for_timing();
    phases_.data += since(t0);

    auto t1 = std::chrono::steady_clock::now();
    auto loss = torch::zeros({}, dev_double);
    for (int64_t m = 0; m < rows; m += mb) {
      opt_->begin_backward(m + mb >= rows);  // reduce buckets while backward runs
      loss += micro_batch(x0.narrow(0, m, mb), comm_.rank() * rows + m, static_cast<uint64_t>(step), grad_scale, true);
    }
    if (cfg_.debug.nan_at_step == step && comm_.rank() == 0) loss += std::nan("");
    sync_for_timing();
    phases_.forward_backward += since(t1);

    auto t2 = std::chrono::steady_clock::now();
    StepStats st = opt_->step(lr, loss);
    sync_for_timing();
    phases_.optimizer += since(t2);

    auto ok = 1 - st.skipped.to(torch::kDouble);
    auto step_loss = st.loss_sum / static_cast<double>(B * L);
    log_->last_loss.copy_(step_loss);
    log_->loss_sum += torch::where(ok > 0, step_loss, torch::zeros_like(step_loss));
    log_->loss_steps += ok;
    log_->skipped += st.skipped.to(torch::kDouble);
    log_->grad_norm.copy_(st.grad_norm);
    step_ = step;
    tokens_seen_ += B * L;
    if (observer_) {
      StepTrace tr;
      tr.step = step;
      tr.lr = lr;
      tr.first_row = comm_.rank() * rows;
      tr.x0 = x0.cpu();
      // The draws micro_batch() made, recomputed for all rows at once (an objective without a
      // time, ar, leaves them out).
      auto ids = torch::arange(tr.first_row, tr.first_row + rows, x0.options());
      auto u = time_uniforms(cfg_.train.time_sampling, cfg_.run.seed, static_cast<uint64_t>(step), ids, B);
      auto d = training_draw(cfg_.model, *graph_, *noise_, x0,
                             LossDraws{cfg_.run.seed, static_cast<uint64_t>(step), ids, u, cfg_.train.time_sampling, B});
      if (d.t.defined()) {
        tr.t = d.t.to(torch::kCPU, torch::kDouble);
        tr.xt = d.xt.cpu();
      }
      tr.loss = st.loss_sum.item<double>() / static_cast<double>(B);
      tr.grad_norm = st.grad_norm.item<double>();
      tr.clip_coef = st.clip_coef.item<double>();
      tr.gradient = opt_->last_gradient().to(torch::kCPU, torch::kDouble);
      tr.params = flat_parameters(*model_);
      tr.ema = opt_->gather_ema().to(torch::kCPU, torch::kDouble);
      observer_(tr);
    }
    log_->window_tokens += B * L;
    double valid = std::nan("");
    if (cfg_.train.clip_search_every > 0 && step_ % cfg_.train.clip_search_every == 0) search_schedule();
    if (cfg_.train.eval_every > 0 && step_ % cfg_.train.eval_every == 0) valid = validation_loss(cfg_.train.eval_batches);
    if (step_ % cfg_.train.log_every == 0 || step_ == log_->first_step + 1 || std::isfinite(valid) ||
        step_ == cfg_.train.steps)
      log_step(lr, valid);
    if (cfg_.train.ckpt_every > 0 && step_ % cfg_.train.ckpt_every == 0) save_checkpoint();
  }
  if (cfg_.train.ckpt_every >= 0 && step_ == cfg_.train.steps) save_checkpoint();
  return TrainOutcome::Finished;
}

}  // namespace sedd
