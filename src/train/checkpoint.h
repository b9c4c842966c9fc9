// Checkpoints (docs/DESIGN.md, "Formats"): <run>/checkpoints/step_<N>/ holds model.h5 (weights + EMA +
// config, written by rank 0; sampling and evaluation read only this file), optim/rank_<K>.h5
// (each rank's slice of the Adam moments with its range in the flat parameter vector) and
// state.json (step, data position, world size, layout). A checkpoint is written under a
// temporary folder name and counts only once `latest` has been switched to it atomically, after
// every rank finished; an interrupted save never replaces the last good one.
#pragma once
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "distributed/control.h"
#include "distributed/zero.h"
#include "model/ddit.h"
#include "model/weights.h"

namespace sedd {

struct TrainState {
  int64_t step = 0;
  int64_t data_position = 0;   // global sequences consumed
  int64_t tokens_seen = 0;
  int world = 1;
  std::string tokenizer;       // stored in model.h5 (and tokenizer.json beside it) so tools can decode
  double elapsed_s = 0;        // wall time of the run up to this checkpoint, over all its segments
  nlohmann::json fingerprint;  // run_fingerprint() of the run that wrote it (null in old checkpoints)
  bool stopped_for_requeue = false;  // saved because a stop signal ended the run
};

constexpr int64_t kStateFormatVersion = 2;  // 1: no fingerprint, no elapsed_s

class Checkpointer {
 public:
  Checkpointer(std::string run_dir, int64_t keep);
  std::string root() const { return root_; }
  // Collective: every rank calls it. Returns the committed folder.
  std::string save(const TrainState& st, DDiT& model, ShardedAdamW& opt, ControlPlane& control,
                   const std::string& config_text);
  // The newest usable checkpoint: the one `latest` points to when it is complete, else the newest
  // complete step_N folder (latest lost or damaged); none when there is no checkpoint.
  std::optional<std::string> latest() const;
  // Every committed checkpoint, the one `latest` names first, then the others newest first; `note`
  // says why `latest` itself is not first when it cannot be used.
  std::vector<std::string> resume_candidates(std::string* note = nullptr) const;
  // The checkpoint's state.json, validated; throws naming the file.
  TrainState read_state(const std::string& dir) const;
  // Collective: loads weights, EMA and this rank's moments (re-sharded from the saved ranges,
  // any world size). Throws naming the file when something does not fit.
  TrainState load(const std::string& dir, DDiT& model, ShardedAdamW& opt);

 private:
  void prune(int64_t newest_step);
  std::string root_;
  int64_t keep_;
};

// Rank 0: sets "stopped_for_requeue": true in <dir>/state.json of an already committed checkpoint
// (a stop signal that arrives right after a save), replacing the file atomically.
void mark_stopped_for_requeue(const std::string& dir);

// --checkpoint accepts a run folder (its latest checkpoint), a checkpoint folder, or model.h5.
std::string resolve_model_file(const std::string& arg);

}  // namespace sedd
