// Evaluating a model on token datasets: the likelihood bound of every window of a dataset, the
// windows split across ranks, the sums agreed over the control plane. Used by sedd-eval (one or
// several datasets) and sedd-compare (several checkpoints on the same data).
//
// Windows: the dataset's documents cut into windows of the model's length L by an evaluation
// protocol (eval/protocol.h): this project's packing by default, or SEDD's or MDLM's exactly; a
// dataset of a suite may name its own.
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "distributed/control.h"
#include "eval/elbo.h"
#include "eval/protocol.h"
#include "model/ddit.h"

namespace sedd {

struct EvalOptions {
  ElboConfig elbo;
  int64_t batch_size = 8;      // sequences per forward pass on each rank
  int64_t max_sequences = 0;   // 0: every window
  std::string model_tokenizer; // the model's ("byte" or tokenizer.json text; may be empty): the data must match
  ProtocolOptions protocol;    // how the windows are built
  // OptionError naming the bad option (--batch-size, --max-sequences, the ELBO's, the protocol's).
  void validate() const;
};

struct EvalSummary {
  std::string name, data;
  double nats_per_token = 0;
  double stderr_mc = 0;        // Monte Carlo standard error of nats/token (0 when exact)
  double stderr_data = 0;      // standard error over the sequences (sampling of the data)
  double prior_nats_per_token = 0;
  int64_t tokens = 0, sequences = 0;  // scored tokens (mdlm-pad: without its padding), windows
  int64_t documents = -1;      // documents found (-1: packed, which does not look for them)
  std::string protocol, protocol_description;
  double seconds = 0;
  bool exact = false;          // the autoregressive likelihood: no Monte Carlo
  // "same": the data's tokenizer is the model's; else "skipped: <why>" (the model or the data does
  // not say which tokenizer it used, e.g. a converted official checkpoint): the tools print it.
  std::string tokenizer_check;
  double bits_per_token() const;
  double perplexity() const;   // exp(nats/token): a bound for diffusion models
  double stderr_total() const; // Monte Carlo and data standard errors combined: the tables' +-
};

// One dataset's JSON row, the same in every tool: stderr_nats_per_token is the Monte Carlo
// standard error, stderr_data_nats_per_token the one over sequences, stderr_total_nats_per_token
// both combined; tokenizer_check as in EvalSummary; tokens: the scored tokens, sequences: the windows;
// protocol and protocol_description: how the windows were built.
nlohmann::ordered_json to_json(const EvalSummary& s);

// Collective over `control`'s ranks. `progress(done, total)` is called on rank 0. A dataset that
// yields no window under the protocol is an InputError saying why.
EvalSummary evaluate_dataset(ScoreModel& model, const ModelConfig& cfg, const std::string& name,
                             const std::string& data, const EvalOptions& options, torch::Device device,
                             ControlPlane& control, const std::function<void(int64_t, int64_t)>& progress = {});

// "NAME=GLOB" -> {NAME, GLOB}; a bare GLOB is named after its folder.
std::pair<std::string, std::string> parse_named_dataset(const std::string& spec);
// One dataset of a suite: its name, shards and protocol (empty: the tool's --protocol).
struct SuiteDataset {
  std::string name, glob, protocol;
};
// A suite file: one dataset per line ("NAME=GLOB" or "NAME GLOB", then optionally a protocol
// name: "NAME GLOB PROTOCOL" or "NAME=GLOB PROTOCOL"), '#' comments, blank lines.
std::vector<SuiteDataset> read_dataset_suite(const std::string& path);

}  // namespace sedd
