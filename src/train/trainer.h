// Trainer: the training loop of one rank. Streams its rows of every global batch, corrupts them
// with keyed draws (seed, step, global sequence index), accumulates gradients over micro-batches
// without communication, steps the ZeRO-1/2 optimizer, logs, validates, saves checkpoints, resumes
// from `latest`, and stops cleanly (checkpoint first) when any rank was signalled.
//
// Parallelism enters only through the Communicator (data plane: gradients, parameters, the
// device-side step statistics) and the ControlPlane (host agreement: the stop vote, checkpoint
// votes, validation sums). A step does not wait for the GPU: its loss, gradient norm and skip flag
// stay device tensors until a log line reads them.
#pragma once
#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "data/token_stream.h"
#include "diffusion/graph.h"
#include "diffusion/noise.h"
#include "distributed/communicator.h"
#include "distributed/control.h"
#include "distributed/runtime.h"
#include "distributed/zero.h"
#include "model/ddit.h"
#include "objectives/objective.h"
#include "train/checkpoint.h"
#include "train/config.h"
#include "train/run_lock.h"

namespace sedd {

enum class TrainOutcome { Finished, Preempted };

// What one optimizer step did, for step-by-step comparisons with another trainer (sedd-parity,
// docs/DESIGN.md "Step parity"). Filled only while an observer is set; the full vectors are
// gathered from the ZeRO shards, so every rank must observe.
struct StepTrace {
  int64_t step = 0;
  double lr = 0;
  int64_t first_row = 0;       // global index (in the batch) of this rank's first row
  torch::Tensor x0;            // this rank's clean rows [rows, L] int64
  torch::Tensor t, xt;         // sedd, mdlm: this rank's times [rows] float64 and noisy rows [rows, L]
  double loss = 0;             // mean over the global batch of the per-sequence loss (nats)
  double grad_norm = 0;        // global norm of the reduced gradient, before clipping
  double clip_coef = 1;        // the factor the gradient was multiplied by
  torch::Tensor gradient;      // reduced gradient before clipping, unpadded model order [numel]
  torch::Tensor params, ema;   // after the update, model order [numel]
};
using StepObserver = std::function<void(const StepTrace&)>;

class Trainer {
 public:
  // config_text: the resolved settings, stored in every checkpoint's state.json.
  Trainer(TrainingConfig cfg, Runtime& rt, Communicator& comm, ControlPlane& control, std::string config_text);
  ~Trainer();
  // Runs until train.steps (or `until_step` when given) or until *stop_signal becomes non-zero on
  // any rank.
  TrainOutcome run(const std::atomic<int>* stop_signal, int64_t until_step = -1);

  DDiT& model() { return model_; }
  // Calls `fn` after every step with what the step did (slow: gathers full vectors each step).
  void observe_steps(StepObserver fn);
  ShardedAdamW& optimizer() { return *opt_; }
  int64_t step() const { return step_; }
  // Mean loss in nats/token over `batches` validation batches (same draws every call).
  double validation_loss(int64_t batches);
  // bd3's clipped-schedule search (train.clip_search_every): sets the model's window.
  void search_schedule();
  // Wall time of the phases of run() so far, for benchmarks (only measured when timing is on:
  // it synchronises the device after each phase).
  struct PhaseTimes {
    double data = 0, forward_backward = 0, optimizer = 0;
  };
  void enable_phase_timing() { time_phases_ = true; }
  const PhaseTimes& phase_times() const { return phases_; }

 private:
  // Sum of the per-sequence losses of rows [first_row, first_row + n) of the global batch, with
  // keyed draws (device tensor, float64); backward when `train`.
  torch::Tensor micro_batch(const torch::Tensor& x0, int64_t first_row, uint64_t step_key, double scale, bool train);
  void log_step(double lr, double valid_loss);
  void save_checkpoint(bool stopped_for_requeue = false);
  void resume();
  // <run.dir>/REQUEUE: rank 0 writes it once a stop signal's checkpoint is committed, so a launcher
  // can requeue whatever exit code mpirun or srun reports; the next run removes it after resuming
  // (take_requeue_marker returns "; the previous run was pre-empted at step N ..." or "").
  void write_requeue_marker(int signal);
  std::string take_requeue_marker();
  void sync_for_timing() const;

  TrainingConfig cfg_;
  Runtime& rt_;
  Communicator& comm_;
  ControlPlane& control_;
  std::string config_text_;
  std::unique_ptr<TokenStream> train_, valid_;
  std::unique_ptr<Graph> graph_;
  std::unique_ptr<Noise> noise_;
  DDiT model_{nullptr};
  LossOptions loss_options_;
  std::unique_ptr<ShardedAdamW> opt_;
  std::unique_ptr<RunLock> run_lock_;  // rank 0 only
  std::unique_ptr<Checkpointer> ckpt_;
  struct Log;
  std::unique_ptr<Log> log_;
  torch::Dtype dtype_ = torch::kFloat;
  int64_t step_ = 0, tokens_seen_ = 0, last_saved_ = -1;
  nlohmann::json fingerprint_;
  bool time_phases_ = false;
  StepObserver observer_;
  PhaseTimes phases_;
};

}  // namespace sedd
