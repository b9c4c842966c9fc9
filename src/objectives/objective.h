// An objective is what a run trains and how its model is read (docs/DESIGN.md, "Objectives"): one
// unit with a fixed set of verbs, one file each (sedd.cpp, mdlm.cpp, d3pm.cpp, ar.cpp, dfm.cpp),
// found by name in registry.cpp, the only file that names them all. Training, evaluation and
// sampling call these verbs and never ask which objective they hold:
//  - the network it needs (time conditioning, causal attention, a mask state) and its options:
//    paper defaults, refused combinations, the keys a resume must not change;
//  - draw: the keyed time and noisy input of a micro-batch (training, replays and parity traces);
//  - loss: the per-sequence training loss at a draw;
//  - bound: the terms of its likelihood bound at a time (evaluation, conditional scoring);
//  - sample: its reverse process, and the sampler options it accepts.
// The process (graphs, noise, keyed draws) lives in src/diffusion, the network in src/model.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "diffusion/graph.h"
#include "diffusion/keyed_random.h"
#include "diffusion/noise.h"
#include "model/config.h"
#include "model/ddit.h"
#include "objectives/sampling.h"

namespace sedd {

// The forward process of a model: its graph, noise schedule and config (the objective's settings).
struct Process {
  const Graph& graph;
  const Noise& noise;
  const ModelConfig& model;
};

struct LossOptions {
  // Project only the rows with a non-zero loss (absorbing graph: the masked positions) and fuse the
  // projection with the loss chunk by chunk; off = full logits, then the loss (the reference).
  bool fused = true;
  int64_t chunk_elems = int64_t{1} << 26;  // logits per chunk of the fused loss
  double lambda_ce = 0.01;                 // d3pm: weight of the auxiliary cross entropy
};

// The keyed draws of one micro-batch: its rows' global indices and the step key; `u` [B] float64
// in (0, 1) sets each row's time (iid, antithetic or stratified, chosen by the caller).
struct LossDraws {
  uint64_t seed = 0, step = 0;
  torch::Tensor rows, u;
  // How u was drawn (train.time_sampling) over a batch of `batch` rows: objectives with more than
  // one time per row (bd3: one per block) draw theirs the same way.
  std::string sampling = "iid";
  int64_t batch = 0;
};

// What draw() made: the time t [B] float64 (continuous objectives; the step index for d3pm), the
// network's conditioning input [B] and the noisy input xt [B, L] (undefined: the loss needs none).
struct TrainingDraw {
  torch::Tensor t, conditioning, xt;
};

// One Monte Carlo point of the likelihood bound for a batch: the network input at times u [B].
struct BoundPoint {
  torch::Tensor u, conditioning, xt;
  torch::Tensor weight;  // [B] float64: the integrand's factor (sigma'(t), ...)
  torch::Tensor position_weight;  // [B, L] float64 or undefined: a factor per position (bd3: 1/t of its block)
  torch::Tensor clean;   // [B, L] or undefined: the clean sequence the network reads beside xt (bd3)
  torch::Tensor sigma, sigma_prev;  // [B] noise levels the row terms read (objective-specific)
};

// Where a bound point's corruption draws come from: the streams and, per row, its key and the
// column offset of its draws.
struct KeyedCorruption {
  RandomStream move, redraw;
  torch::Tensor rows, col_offset;
};

class Objective {
 public:
  virtual ~Objective() = default;
  virtual std::string name() const = 0;

  // ---- The network and the options.
  virtual NetworkShape network(const ModelConfig& m) const = 0;
  // Refuses settings the objective cannot run with, naming the key (sedd::Error).
  virtual void check(const ModelConfig& m) const = 0;
  // The settings whose paper value is the objective's, as (key, value text).
  virtual std::vector<std::pair<std::string, std::string>> defaults(const ModelConfig& m) const = 0;
  // Refuses its own settings on a model of another objective (they would be ignored).
  virtual void refuse_own_settings(const ModelConfig&) const {}
  // The settings its loss reads beyond the common ones, recorded in a run's fingerprint.
  virtual void fingerprint(const ModelConfig&, double /*lambda_ce*/, nlohmann::json&) const {}
  // Its short name in tables and logs: "sedd-absorb", "mdlm", "dfm-mask", ...
  virtual std::string describe(const ModelConfig& m) const;

  // ---- Training.
  virtual TrainingDraw draw(const Process& p, const torch::Tensor& x0, const LossDraws& d) const = 0;
  // Per-sequence loss [B] in nats summed over the positions at a draw.
  virtual torch::Tensor loss(DDiT& model, const Process& p, const torch::Tensor& x0, const TrainingDraw& draw,
                             const DropoutKey* dropout, const LossOptions& o) const = 0;
  // Whether only masked rows carry a loss (memory planning).
  virtual bool loss_on_masked_rows(const ModelConfig&) const { return false; }
  // A schedule searched while training (bd3's clipped window, every diffusion.clip_search_every
  // steps): the candidate configs (empty: none to search) and, at a draw, the loss of each group
  // the search compares [B, G] (bd3: the mean over each block's positions).
  virtual std::vector<ModelConfig> schedule_candidates(const ModelConfig&) const { return {}; }
  virtual torch::Tensor group_losses(DDiT& model, const Process& p, const torch::Tensor& x0,
                                     const TrainingDraw& draw) const;

  // ---- The likelihood bound (docs/DESIGN.md, "Likelihood bound").
  // Exact likelihood (one pass, no Monte Carlo): exact_nll() replaces the bound's points.
  virtual bool exact(const ModelConfig&) const { return false; }
  virtual torch::Tensor exact_nll(const Process&, ScoreModel&, const torch::Tensor& /*x0*/,
                                  const torch::Tensor& /*rows*/, int64_t /*chunk*/) const;
  virtual BoundPoint bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                                 const KeyedCorruption& keys) const = 0;
  // Which positions of a point carry a term: the masked ones only, or all.
  virtual bool bound_on_masked_rows(const Process& p) const = 0;
  // The terms [R] of rows r (flat ids; batch: their sequences) from the model's rows() output.
  virtual torch::Tensor bound_terms(const Process& p, const BoundPoint& pt, const torch::Tensor& out,
                                    const torch::Tensor& batch, const torch::Tensor& xt_rows,
                                    const torch::Tensor& x0_rows) const = 0;
  // The prior term KL(p_1(.|x0) || p_base) per position.
  virtual double prior_nats_per_token(const Process& p) const;
  // Leading positions of a window its bound never scores (bd3: position 0, as its authors'
  // ignore_bos); per-token figures divide by the scored positions.
  virtual int64_t unscored_positions(const ModelConfig&) const { return 0; }

  // ---- Sampling.
  // Its name in messages ("sedd (score entropy)") and how it samples ("ancestrally").
  virtual std::string title() const = 0;
  virtual std::string sampling_manner() const = 0;
  // The sampler options only it reads ("predictor", "temperature", ...): given to a model of
  // another objective they are refused (check_sampler_options).
  virtual std::vector<std::string> sampler_options() const { return {}; }
  // Refuses a sampler config it cannot run (OptionError).
  virtual void check_sampler(const SamplerConfig&) const {}
  // The name of what draws the samples (a sample row's "predictor").
  virtual std::string sampler_name(const SamplerConfig& cfg) const = 0;
  // Model calls per sample of `length` tokens at cfg.steps (for logs).
  virtual int64_t sampler_steps(const SamplerConfig& cfg, int64_t /*length*/) const { return cfg.steps; }
  // Whether sample() makes any length itself (else lengths beyond the window go through sample_blocks).
  virtual bool samples_any_length() const { return false; }
  virtual torch::Tensor sample(const Process& p, ScoreModel& model, int64_t length, const SamplerConfig& cfg,
                               const Constraint& constraint, const torch::Tensor& ids, torch::Device device,
                               const std::function<void(int64_t, int64_t)>& progress) const = 0;
};

// The objective called `name`; throws naming every known one.
const Objective& objective_named(const std::string& name);
inline const Objective& objective_of(const ModelConfig& m) { return objective_named(m.objective); }
// Every objective's name, in the order the docs list them.
std::vector<std::string> objective_names();
// Refuses each option of `given` (sampler option names set on a command line) that belongs to
// another objective than m's, naming the model file `path` and the option's owner (OptionError).
void check_sampler_options(const ModelConfig& m, const std::set<std::string>& given, const std::string& path);

// Training entry points over objective_of(model->cfg).
torch::Tensor training_loss(DDiT& model, const Graph& graph, const Noise& noise, const torch::Tensor& x0,
                            const LossDraws& draws, const DropoutKey* dropout, const LossOptions& options);
TrainingDraw training_draw(const ModelConfig& m, const Graph& graph, const Noise& noise, const torch::Tensor& x0,
                           const LossDraws& draws);

}  // namespace sedd
