// Trainer; see trainer.h.
#include "train/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>

#include "diffusion/categorical.h"
#include "diffusion/loss.h"
#include "io/error.h"
#include "io/fs.h"
#include "train/metrics.h"

namespace sedd {

namespace {
constexpr uint64_t kValidKey = 0xFFFFFFFFull;  // step key of validation draws (never a training step)
constexpr double kH100PeakBf16 = 989e12;        // dense bf16 FLOP/s, for the MFU figure

std::string human_seconds(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  int64_t t = static_cast<int64_t>(s);
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}
}  // namespace

struct Trainer::Log {
  std::unique_ptr<MetricsLog> metrics;
  std::chrono::steady_clock::time_point start, window_start;
  int64_t window_tokens = 0;
  double elapsed_before = 0;  // from earlier segments of a resumed run
  int64_t first_step = 0;
};

Trainer::Trainer(TrainingConfig cfg, Runtime& rt, Communicator& comm, std::string config_text)
    : cfg_(std::move(cfg)), rt_(rt), comm_(comm), config_text_(std::move(config_text)), log_(new Log) {
  cfg_.validate(comm_.size());
  TokenStreamConfig tc;
  tc.data = cfg_.data.train;
  tc.seq_len = cfg_.data.seq_len;
  tc.global_batch = cfg_.train.batch_size;
  tc.rank = comm_.rank();
  tc.world = comm_.size();
  tc.seed = cfg_.run.seed;
  tc.prefetch = cfg_.data.prefetch;
  train_ = std::make_unique<TokenStream>(tc);
  if (!cfg_.data.valid.empty()) {
    tc.data = cfg_.data.valid;
    tc.shuffle = false;
    valid_ = std::make_unique<TokenStream>(tc);
    SEDD_CHECK(valid_->vocab_size() == train_->vocab_size() && valid_->tokenizer() == train_->tokenizer(),
               "{}: the validation data uses another vocabulary/tokenizer than {}", cfg_.data.valid, cfg_.data.train);
  }
  cfg_.model.tokens = train_->vocab_size();
  cfg_.model.length = cfg_.data.seq_len;
  graph_ = make_graph(cfg_.model.graph, cfg_.model.tokens);
  noise_ = make_noise(cfg_.model.noise);

  dtype_ = cfg_.train.precision == "fp64" ? torch::kDouble : torch::kFloat;
  torch::manual_seed(cfg_.run.seed);  // the same initial weights on every rank
  model_ = DDiT(cfg_.model);
  model_->to(rt_.device, dtype_);
  model_->bf16 = cfg_.train.precision == "bf16";
  AdamWConfig ac{cfg_.train.beta1, cfg_.train.beta2, cfg_.train.adam_eps, cfg_.train.weight_decay,
                 cfg_.train.grad_clip, cfg_.train.ema, cfg_.train.bucket_elems};
  opt_ = std::make_unique<ShardedAdamW>(model_->parameters(), comm_, ac);
  ckpt_ = std::make_unique<Checkpointer>(cfg_.run.dir, cfg_.train.keep_ckpts);

  if (auto latest = ckpt_->latest()) {
    TrainState st = ckpt_->load(*latest, model_, *opt_, comm_);
    step_ = st.step;
    tokens_seen_ = st.tokens_seen;
    last_saved_ = st.step;
    train_->seek(st.data_position);
    if (comm_.rank() == 0)
      std::printf("[train] resumed from %s (step %lld, saved by %d ranks, now %d)%s\n", latest->c_str(),
                  static_cast<long long>(st.step), st.world, comm_.size(), take_requeue_marker().c_str());
  }
  if (comm_.rank() == 0) {
    std::filesystem::create_directories(cfg_.run.dir);
    log_->metrics = std::make_unique<MetricsLog>(cfg_.run.dir + "/metrics.jsonl", step_);
    std::printf("[train] %s; %lld parameters\n", cfg_.model.summary().c_str(),
                static_cast<long long>(model_->parameter_count()));
    std::printf("[train] %d ranks x %d threads on %s; global batch %lld = %d ranks x %lld micro x %lld accumulation; "
                "optimizer+EMA state %.2f MB per rank; %lld gradient buckets\n",
                comm_.size(), rt_.threads, rt_.device.str().c_str(), static_cast<long long>(cfg_.train.batch_size),
                comm_.size(), static_cast<long long>(cfg_.micro_batch(comm_.size())),
                static_cast<long long>(cfg_.rows_per_rank(comm_.size()) / cfg_.micro_batch(comm_.size())),
                opt_->state_bytes() / 1e6, static_cast<long long>(opt_->buckets()));
    std::fflush(stdout);
  }
}

Trainer::~Trainer() = default;

double Trainer::micro_batch(const torch::Tensor& x0_cpu, int64_t first_index, int64_t step_key, double scale,
                            bool train) {
  const int64_t n = x0_cpu.size(0);
  std::vector<torch::Tensor> ts, xts;
  for (int64_t i = 0; i < n; ++i) {
    auto gen = keyed_generator(cfg_.run.seed, static_cast<uint64_t>(step_key), static_cast<uint64_t>(first_index + i));
    auto t = training_time(torch::rand({1}, gen, torch::kDouble));
    auto sigma = noise_->total(t);
    ts.push_back(t);
    xts.push_back(graph_->sample_transition(x0_cpu[i], sigma, gen));
  }
  auto t = torch::cat(ts).to(rt_.device, dtype_);
  auto xt = torch::stack(xts).to(rt_.device);
  auto x0 = x0_cpu.to(rt_.device);
  torch::manual_seed(cfg_.run.seed ^ (static_cast<uint64_t>(step_key) << 20) ^ static_cast<uint64_t>(first_index));
  auto log_score = model_->forward(xt, noise_->total(t));
  auto seq_loss = sequence_loss(*graph_, *noise_, log_score.to(dtype_), t, xt, x0);  // [n]
  auto total = seq_loss.sum();
  if (train) (total * scale).backward();
  return total.item<double>();
}

double Trainer::validation_loss(int64_t batches) {
  if (!valid_) return std::nan("");
  torch::NoGradGuard ng;
  model_->eval();
  valid_->seek(0);
  double sum = 0;
  const int64_t rows = cfg_.rows_per_rank(comm_.size()), mb = cfg_.micro_batch(comm_.size());
  for (int64_t b = 0; b < batches; ++b) {
    auto x0 = valid_->next();
    for (int64_t m = 0; m < rows; m += mb)
      sum += micro_batch(x0.narrow(0, m, mb), b * cfg_.train.batch_size + comm_.rank() * rows + m, kValidKey, 0, false);
  }
  model_->train();
  auto t = torch::tensor({sum}, torch::TensorOptions().dtype(torch::kDouble).device(rt_.device));
  comm_.all_reduce(t, ReduceOp::Sum);
  return t.item<double>() / static_cast<double>(batches * cfg_.train.batch_size * cfg_.data.seq_len);
}

void Trainer::save_checkpoint(bool stopped_for_requeue) {
  if (last_saved_ == step_) {
    if (stopped_for_requeue && comm_.rank() == 0) mark_stopped_for_requeue(*ckpt_->latest());
    return;
  }
  TrainState st{step_, train_->position(), tokens_seen_, comm_.size(), train_->tokenizer()};
  st.stopped_for_requeue = stopped_for_requeue;
  auto dir = ckpt_->save(st, model_, *opt_, comm_, config_text_);
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
  const std::string& latest = *committed;
  std::time_t now = std::time(nullptr);
  std::tm utc{};
  gmtime_r(&now, &utc);
  char when[32];
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &utc);
  nlohmann::json marker = {{"step", step_},
                           {"signal", signal},
                           {"checkpoint", std::filesystem::path(latest).filename().string()},
                           {"time", when}};
  fs::write_text_atomic(cfg_.run.dir + "/REQUEUE", marker.dump() + "\n");
  std::printf("[train] %s/REQUEUE: stopped for requeue at %s\n", cfg_.run.dir.c_str(), latest.c_str());
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

void Trainer::log_step(double loss, double lr, double grad_norm, bool skipped, double valid_loss) {
  if (comm_.rank() != 0) return;
  auto now = std::chrono::steady_clock::now();
  double window = std::chrono::duration<double>(now - log_->window_start).count();
  double elapsed = log_->elapsed_before + std::chrono::duration<double>(now - log_->start).count();
  double tps = log_->window_tokens / std::max(window, 1e-9);
  double per_step = std::chrono::duration<double>(now - log_->start).count() /
                    static_cast<double>(std::max<int64_t>(1, step_ - log_->first_step));
  nlohmann::json row = {{"step", step_},   {"loss", loss},          {"lr", lr},
                        {"grad_norm", grad_norm}, {"tokens_per_s", tps}, {"elapsed_s", elapsed},
                        {"tokens_seen", tokens_seen_}};
  if (skipped) row["skipped"] = true;
  if (std::isfinite(valid_loss)) row["valid_loss"] = valid_loss;
  std::string mfu;
  if (rt_.device.is_cuda()) {
    // tps counts every rank's tokens, so the peak is that of all ranks' GPUs together.
    double m = tps * model_->flops_per_token(cfg_.data.seq_len) / (kH100PeakBf16 * comm_.size());
    row["mfu"] = m;
    mfu = fmt::format(" | MFU {:.1f}%", 100 * m);
  }
  log_->metrics->write(row);
  std::printf("step %6lld/%lld | loss %.4f | lr %.2e | grad %.3f | %.0f tok/s (all ranks)%s | ETA %s%s%s\n",
              static_cast<long long>(step_), static_cast<long long>(cfg_.train.steps), loss, lr, grad_norm, tps,
              mfu.c_str(), human_seconds(per_step * static_cast<double>(cfg_.train.steps - step_)).c_str(),
              skipped ? " | SKIPPED (non-finite)" : "",
              std::isfinite(valid_loss) ? fmt::format(" | valid {:.4f}", valid_loss).c_str() : "");
  std::fflush(stdout);
  log_->window_start = now;
  log_->window_tokens = 0;
}

TrainOutcome Trainer::run(const std::atomic<int>* stop_signal) {
  model_->train();
  const int W = comm_.size();
  const int64_t rows = cfg_.rows_per_rank(W), mb = cfg_.micro_batch(W), B = cfg_.train.batch_size;
  const int64_t L = cfg_.data.seq_len;
  log_->start = log_->window_start = std::chrono::steady_clock::now();
  log_->first_step = step_;
  auto device_opts = torch::TensorOptions().dtype(torch::kDouble).device(rt_.device);
  while (step_ < cfg_.train.steps) {
    // Pre-emption: a signal on any rank stops every rank at this step boundary.
    // The flag carries the signal number (the largest if ranks got different ones).
    auto flag = torch::tensor({stop_signal ? static_cast<double>(stop_signal->load()) : 0.0}, device_opts);
    comm_.all_reduce(flag, ReduceOp::Max);
    if (const int signal = static_cast<int>(flag.item<double>()); signal > 0) {
      if (comm_.rank() == 0) std::printf("[train] stop requested at step %lld (signal %d): saving a checkpoint\n",
                                         static_cast<long long>(step_), signal);
      save_checkpoint(/*stopped_for_requeue=*/true);
      write_requeue_marker(signal);
      return TrainOutcome::Preempted;
    }
    const int64_t step = step_ + 1;
    const double lr = learning_rate(cfg_.train, step);
    auto x0 = train_->next();  // [rows, L]
    double loss_sum = 0;
    opt_->zero_grad();
    for (int64_t m = 0; m < rows; m += mb) {
      if (m + mb >= rows) opt_->overlap_next_backward();  // reduce buckets while backward runs
      loss_sum += micro_batch(x0.narrow(0, m, mb), comm_.rank() * rows + m, step, 1.0 / rows, true);
    }
    auto loss_t = torch::tensor({loss_sum}, device_opts);
    comm_.all_reduce(loss_t, ReduceOp::Sum);
    const double loss = loss_t.item<double>() / static_cast<double>(B * L);
    StepResult res;
    if (!std::isfinite(loss)) {
      res.skipped = true;
      res.grad_norm = std::nan("");
      opt_->zero_grad();
    } else {
      res = opt_->step(lr);
    }
    step_ = step;
    tokens_seen_ += B * L;
    log_->window_tokens += B * L;
    double valid = std::nan("");
    if (cfg_.train.eval_every > 0 && step_ % cfg_.train.eval_every == 0) valid = validation_loss(cfg_.train.eval_batches);
    if (step_ % cfg_.train.log_every == 0 || res.skipped || step_ == log_->first_step + 1 || std::isfinite(valid))
      log_step(loss, lr, res.grad_norm, res.skipped, valid);
    if (cfg_.train.ckpt_every > 0 && step_ % cfg_.train.ckpt_every == 0) save_checkpoint();
  }
  if (cfg_.train.ckpt_every >= 0) save_checkpoint();
  return TrainOutcome::Finished;
}

}  // namespace sedd
