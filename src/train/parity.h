// Step parity (docs/DESIGN.md, "Step parity"): our trainer replayed against another trainer's
// steps, given the same data, initial weights and draws.
//
// A parity file holds the data (one token stream), the initial weights, every step's batch and
// draws (x0, t, xt), and per step what a trainer computed: loss, gradient norm, clip factor,
// learning rate, and at snapshot steps the full gradient, clipped gradient, update, weights and
// EMA. record_steps() writes a file from a run of ours (group /ours); the reference generator
// (tests/data/make_sedd_step_reference.py, make_mdlm_step_reference.py,
// make_dfm_step_reference.py) runs the authors' code on the same inputs and adds group /authors; ParityCheck compares a new run of ours with /authors, step by step, as it goes.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "distributed/control.h"
#include "io/hdf5.h"
#include "model/config.h"
#include "train/trainer.h"

namespace sedd {

// Writes the parity file of a run of ours (single rank): call before trainer.run(); the file is
// complete once finish() returns. `snapshots`: steps whose full vectors are kept.
class ParityRecorder {
 public:
  ParityRecorder(const std::string& path, Trainer& trainer, const TrainingConfig& cfg, const std::string& settings,
                 std::vector<int64_t> snapshots);
  void finish();

 private:
  std::string path_;
  std::vector<int64_t> snapshots_;
  std::unique_ptr<h5::File> file_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> x0_, t_, xt_;
  std::vector<double> loss_, grad_norm_, clip_, lr_;
  torch::Tensor previous_params_;
};

// One compared quantity: the largest relative error over the steps compared, and where.
struct ParityStat {
  double max_rel_error = 0;
  int64_t worst_step = 0;
  int64_t compared = 0;
};

struct ParityReport {
  std::map<std::string, ParityStat> quantities;
  double tolerance = 1e-12;
  int64_t first_failure_step = 0;  // 0: none
  std::string first_failure_quantity;
  double first_failure_error = 0;
  bool ok() const { return first_failure_step == 0; }
  std::string table() const;
  nlohmann::json to_json() const;
};

// The reference's settings (the resolved INI text of the recorded run) and its data, unpacked
// into `workdir` (shard + init model.h5) by rank 0; returns the settings text.
std::string parity_settings(const std::string& reference);
void unpack_parity_inputs(const std::string& reference, const std::string& workdir, const ModelConfig& model);

// Compares the steps of `trainer` (built with the reference's settings, data and initial weights)
// with the reference's /authors group; every rank calls it before trainer.run().
class ParityCheck {
 public:
  ParityCheck(const std::string& reference, Trainer& trainer, ControlPlane& control, double tolerance);
  // After the run: agrees the report over the ranks (host collectives) and returns it.
  ParityReport finish();

 private:
  void observe(const StepTrace& tr);
  void record(const std::string& quantity, int64_t step, double rel_error);

  std::unique_ptr<h5::File> ref_;
  ControlPlane& control_;
  std::vector<std::string> names_;
  std::vector<int64_t> numels_;
  torch::Tensor x0_, t_, xt_;        // all steps [S, B, L], [S, B], [S, B, L]
  torch::Tensor loss_, grad_norm_, clip_, lr_;
  torch::Tensor previous_params_;
  double loss_scale_ = 1;  // ours (per sequence) to the reference's loss unit
  int64_t draw_mismatches_ = 0, window_mismatches_ = 0, steps_seen_ = 0;
  ParityReport report_;
};

// Initialisation laws: for every parameter, our initial values (seeds 0..S-1, the reference's
// caps) against the reference trainer's (/init_law): equal constants, or a two-sample
// Kolmogorov-Smirnov test at level 1e-3. Returns "" or the list of tensors whose law differs;
// `summary` gets one line per tensor.
std::string compare_init_laws(const std::string& reference, const ModelConfig& model, std::string* summary);

}  // namespace sedd
