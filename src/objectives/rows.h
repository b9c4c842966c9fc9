// Machinery the objectives share: the positions that carry a loss (masked rows, found without
// waiting for the forward pass), the weighted cross entropy over chosen rows through the fused
// output loss, keyed corruption of a micro-batch, and the sampler's redraw loop and start.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "objectives/objective.h"

namespace sedd {

// The flat indices of the positions of x_t that hold the mask, ascending (what nonzero() gives),
// found without making the host wait for the forward pass: the count is queued as soon as x_t is,
// copied to pinned host memory behind an event, and rows() (called once the forward is queued)
// waits on that event only. On the CPU: nonzero(), as always.
class PendingMaskedRows {
 public:
  PendingMaskedRows(const torch::Tensor& xt, int64_t mask);
  ~PendingMaskedRows();
  torch::Tensor rows();

 private:
  struct Event;
  torch::Tensor is_mask_, count_;
  std::unique_ptr<Event> counted_;
};

// sum over `rows` (flat ids into [B, L]) of weight * -log softmax(logits[:width])[target], per
// sequence [B]; the fused, chunked output loss unless o.fused is off. width: the softmax's columns
// (the vocabulary, or the vocabulary and the mask).
torch::Tensor weighted_cross_entropy(DDiT& model, const DDiTHidden& hid, const torch::Tensor& rows,
                                     const torch::Tensor& targets, const torch::Tensor& weights, int64_t B,
                                     const LossOptions& o, int64_t width = -1);

// Masked diffusion's recipe (MDLM's config.yaml and diffusion.py; bd3lms keeps it): no time input,
// no score shift, stratified times, the first warm-up step at lr 0, the per-token mean loss.
std::vector<std::pair<std::string, std::string>> masked_diffusion_defaults();

// Per sequence [B], the sum over `rows` (flat ids into x0 [B, L]) of -log p(x0) from the model's
// last evaluation, `chunk` rows at a time (an exact likelihood's one pass).
torch::Tensor clean_token_nll(ScoreModel& model, const torch::Tensor& x0, const torch::Tensor& rows, int64_t chunk);

// Option rules several objectives share (sedd::Error naming the key).
void refuse_score_scaling(const ModelConfig& m, const std::string& objective);  // scale_by_sigma is sedd's
void require_time_conditioning_off_absorbing(const ModelConfig& m);  // uniform scores depend on the time

// A micro-batch's corruption keys: streams (seed, corrupt / redraw, step), rows its global indices.
KeyedCorruption training_corruption(const LossDraws& d);
// x0 [B, L] corrupted by the graph at noise sigma [B] with a micro-batch's keyed draws.
torch::Tensor corrupt_keyed(const Graph& g, const torch::Tensor& x0, const torch::Tensor& sigma, const LossDraws& d);
// The same with a bound point's keys.
torch::Tensor corrupt_keyed(const Graph& g, const torch::Tensor& x0, const torch::Tensor& sigma,
                            const KeyedCorruption& k);

// A bound point of a continuous-time objective at times u [B]: sigma(u) as the network's input and
// the noise level, x0 corrupted with the point's keys (the weight is the caller's).
BoundPoint continuous_bound_point(const Process& p, const torch::Tensor& u, const torch::Tensor& x0,
                                  const KeyedCorruption& k);

// The autoregressive model's input: x0 shifted right by one, the end-of-text id first.
torch::Tensor autoregressive_input(const torch::Tensor& x0, int64_t bos);

// ---- Samplers.
// The rows of x [B, L] (flattened) that can change this step: the masked positions for the
// absorbing graph, every position for the uniform graph.
torch::Tensor changeable_rows(const Graph& graph, const torch::Tensor& flat);
// Redraws `rows` of `flat` chunk by chunk from weights(r, batch) [R, dim] (r: flat row ids, batch:
// their samples). Draw (sample id, position * dim) of `stream`: a sample's tokens never depend on
// the batch it ran in.
void redraw_rows(torch::Tensor& flat, const torch::Tensor& rows, int64_t L, int64_t dim, int64_t chunk_elems,
                 const RandomStream& stream, const torch::Tensor& ids,
                 const std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>& weights);
// The start of the reverse process: all masks (absorbing) or keyed uniform tokens.
torch::Tensor start_tokens(const Graph& graph, const SamplerConfig& cfg, const torch::Tensor& ids, int64_t L);
// x_t -> x_s through the x0-parameterised posterior Graph::model_posterior on a grid of noise
// levels sigmas[0] > ... > sigmas[S] = 0, drawing only the rows that can change (mdlm, d3pm).
torch::Tensor sample_ancestral(const Process& p, ScoreModel& model, int64_t L, const SamplerConfig& cfg,
                               const Constraint& constraint, const torch::Tensor& ids,
                               const std::vector<double>& sigmas,
                               const std::function<void(int64_t, int64_t)>& progress);

}  // namespace sedd
