// Conditional likelihood of (context, continuation) pairs (docs/DESIGN.md, "Conditional
// likelihood"): what sedd-score computes for every request of a JSONL file.
//
// Window: a request is placed in one window of the model's length L. Diffusion models: the last L
// tokens of (L end-of-text ids, context, continuation), so the text ends at the window's end and
// is preceded by end-of-text ids (the packing puts one before every document); every position but
// the continuation's stays clamped. Autoregressive models: the inputs are the last L of
// (end-of-text, context, continuation minus its last token), right-padded in a batch (a causal
// model never sees the padding), so the likelihood is exact. A context that does not fit keeps its
// last tokens (ScoreResult::truncated_context says how many were dropped).
//
//  - ar: log p(continuation | context) exactly; is_greedy: every continuation token is the argmax.
//  - sedd, mdlm, d3pm: minus the conditional bound (conditional_elbo_batch), K Monte Carlo draws
//    keyed by the request's index, with its standard error; is_greedy: decoding the fully masked
//    continuation greedily (one position at a time, the most confident first, each set to its
//    argmax) reproduces it (absorbing graph; undefined for the uniform graph, which has no mask).
#pragma once
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "eval/elbo.h"

namespace sedd {

class Tokenizer;

// One line of a request file.
struct ScoreRequest {
  int64_t line = 0;                         // 1-based line of the file
  nlohmann::json id;                        // as given (null when absent)
  std::vector<int64_t> context, continuation;
  std::string error;                        // not empty: refused ("FILE:LINE: why"); nothing else is set
};

// Reads a JSONL request file: {"id", "context", "continuation"} (text, encoded with `tokenizer`,
// which may be null) or "context_ids" / "continuation_ids". A bad line (malformed JSON, an empty
// or missing continuation, text without a tokenizer, ids outside [0, vocab), a continuation longer
// than `window`) becomes a request with its error; blank lines are skipped. InputError when the
// file cannot be read.
std::vector<ScoreRequest> read_score_requests(const std::string& path, const Tokenizer* tokenizer, int64_t vocab,
                                              int64_t window);

struct ScoreOptions {
  ElboConfig elbo;                // diffusion models: K, sampling, seed, objective (ar: exact)
  int64_t batch_size = 8;         // requests per forward pass
  int64_t window = 0;             // the model's length L
  int64_t pad_id = -1;            // the end-of-text id: the diffusion window's fill, the ar first input
  bool uniform_graph = false;     // is_greedy is then undefined
  void validate() const;          // OptionError naming the bad option
};

struct ScoreResult {
  double logprob = 0;             // ar: exact; diffusion: minus the bound (a lower bound in expectation)
  double stderr_mc = 0;           // Monte Carlo standard error of logprob (0 when exact)
  int is_greedy = -1;             // 1, 0, or -1 when undefined (uniform graph)
  int64_t tokens = 0;             // continuation tokens scored
  int64_t truncated_context = 0;  // context tokens dropped to fit the window
};

// Scores the (valid) requests `requests` [i] keyed by keys[i] (the draws of request i depend only
// on its key and the seed; request_key() is the tools' choice), in batches of requests of similar length; results in request order.
std::vector<ScoreResult> score_requests(const Graph& graph, const Noise& noise, ScoreModel& model,
                                        const std::vector<const ScoreRequest*>& requests,
                                        const std::vector<int64_t>& keys, const ScoreOptions& options,
                                        torch::Device device);

// The key of a request's draws: a hash of its context and continuation ids, so that its score
// depends only on them and the seed (not on its place in a file, the batch or the rank).
int64_t request_key(const ScoreRequest& r);

// The diffusion window of a request: tokens [L] and the scored (continuation) positions [L].
std::pair<torch::Tensor, torch::Tensor> diffusion_window(const ScoreRequest& r, int64_t window, int64_t pad_id);

}  // namespace sedd
