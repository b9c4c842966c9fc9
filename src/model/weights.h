// Weight files. model.h5 (docs/DESIGN.md, "Formats"): datasets /model/<state-dict name> and optionally
// /ema/<state-dict name>; the ModelConfig, step and tokens seen as root attributes, so sampling
// and evaluation rebuild the network from this one file. Loading is strict: every name and
// shape must match, or the error lists what is missing, extra or mis-shaped.
#pragma once
#include <torch/torch.h>
#include <map>
#include <string>

#include "io/hdf5.h"
#include "model/config.h"
#include "model/ddit.h"

namespace sedd {

using StateDict = std::map<std::string, torch::Tensor>;

constexpr int64_t kModelFormatVersion = 1;

StateDict state_dict(const torch::nn::Module& m);       // parameters and buffers, by name
// Every parameter of `m` in model order, flattened into one float64 vector on the CPU.
torch::Tensor flat_parameters(const torch::nn::Module& m);
// Copies `sd` into `m`; throws naming `source` with every missing / unexpected / mis-shaped name.
void load_state_dict(torch::nn::Module& m, const StateDict& sd, const std::string& source);

// Reads every dataset of `group` into a StateDict (float32).
StateDict read_state_dict(const h5::File& f, const std::string& group);
void write_state_dict(h5::File& f, const std::string& group, const StateDict& sd);

// Config <-> attributes of `obj`. Keys: objective, tokens, graph, hidden_size, n_heads, n_blocks,
// cond_dim, length, dropout, scale_by_sigma, time_conditioning, noise, eps, sigma_min, sigma_max,
// timesteps, bos, dfm's source, kappa_power, dfm_loss and bd3's block_size, clip (objective absent: "sedd", as in files
// converted from the official SEDD weights).
ModelConfig read_model_config(const h5::File& f, const std::string& obj);
void write_model_config(h5::File& f, const std::string& obj, const ModelConfig& cfg);

struct ModelFileInfo {
  int64_t step = 0;
  int64_t tokens_seen = 0;
  bool has_ema = false;
  std::string tokenizer;  // "byte" or tokenizer.json text of the training data; may be empty
};

// Writes model.h5 atomically (temporary name, fsync, rename). `ema` may be empty.
void save_model_file(const std::string& path, const ModelConfig& cfg, const StateDict& weights,
                     const StateDict& ema, const ModelFileInfo& info);
// Builds the network from the file alone; `use_ema` picks /ema when present.
DDiT load_model_file(const std::string& path, bool use_ema, ModelFileInfo* info = nullptr);

}  // namespace sedd
