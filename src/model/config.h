// ModelConfig: everything needed to rebuild a score network from its weight file alone
// (architecture, graph and noise schedule travel with the weights).
#pragma once
#include <string>

#include "diffusion/noise.h"

namespace sedd {

// What the network must look like for its objective (src/objectives decides).
struct NetworkShape {
  bool causal = false;      // causal attention (next-token model)
  bool mask_state = false;  // a mask id after the vocabulary, in the input and output alphabet
  bool log_score = false;   // outputs are log concrete scores (else logits of the clean/next token)
  bool mask_in_softmax = false;  // the clean token's distribution keeps the mask column (dfm)
  double embedding_std = 0;  // > 0: token embedding drawn N(0, std^2) (else kaiming uniform, as SEDD's)
  // > 0: block diffusion's attention (bd3): the network reads x_t followed by x_0 (2L positions) with
  // blocks of this many tokens (model/block_attention.h).
  int64_t block_size = 0;
};

struct ModelConfig {
  // What the network is trained for (docs/DESIGN.md, "Objectives"):
  //   sedd: score entropy (output: log concrete scores); mdlm: masked diffusion (output: logits
  //   of the clean token); d3pm: discrete-time D3PM (logits of the clean token); ar: a causal
  //   next-token model (logits of the next token); dfm: discrete flow matching (logits of x_1).
  std::string objective = "sedd";
  int64_t tokens = 256;         // vocabulary N (without the absorbing mask)
  std::string graph = "absorb"; // absorb | uniform (ar: unused)
  int64_t hidden_size = 128;
  int64_t n_heads = 4;
  int64_t n_blocks = 2;
  int64_t cond_dim = 64;
  int64_t length = 128;         // training sequence length (rotary works for any length)
  double dropout = 0.0;
  bool scale_by_sigma = true;   // absorbing only
  bool time_conditioning = true;
  NoiseConfig noise;
  int64_t timesteps = 1000;     // d3pm: T steps of the discrete chain
  int64_t bos = -1;             // ar: the first input token (the data's end-of-text id)
  // dfm: the source (mask | uniform: the graph's limit, absorb | uniform), kappa_t = t^kappa_power
  // (the polynomial scheduler) and the loss (generalized_kl | cross_entropy).
  // Unset (empty, 0) for the other objectives.
  std::string source;
  double kappa_power = 0;
  std::string dfm_loss;
  // bd3: tokens per block L' (divides length) and the clipped schedule "beta,omega" (t drawn in
  // [beta, omega]; empty: the objective's default). Unset (0, empty) for the other objectives.
  int64_t block_size = 0;
  std::string clip;

  // The objective's choices (defined with the objectives, src/objectives/registry.cpp).
  NetworkShape network() const;
  void check_objective() const;         // the objective's own rules; throws naming the key
  std::string objective_summary() const;

  bool causal() const { return network().causal; }
  // Input and output columns: the vocabulary, and the mask state where the objective has one.
  int64_t vocab_dim() const { return tokens + (network().mask_state ? 1 : 0); }
  int64_t head_dim() const { return hidden_size / n_heads; }
  // Throws sedd::Error naming the offending key and a fix.
  void validate() const;
  std::string summary() const;
};

}  // namespace sedd
