// ModelConfig: everything needed to rebuild a score network from its weight file alone
// (architecture, graph and noise schedule travel with the weights).
#pragma once
#include <string>

#include "diffusion/noise.h"

namespace sedd {

struct ModelConfig {
  // What the network is trained for (docs/DESIGN.md, "Objectives"):
  //   sedd: score entropy (output: log concrete scores); mdlm: masked diffusion (output: logits
  //   of the clean token); d3pm: discrete-time D3PM (logits of the clean token); ar: a causal
  //   next-token model (logits of the next token).
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

  bool causal() const { return objective == "ar"; }
  // Output columns: the absorbing graph adds the mask state; the autoregressive model has none.
  int64_t vocab_dim() const { return tokens + (objective != "ar" && graph == "absorb" ? 1 : 0); }
  int64_t head_dim() const { return hidden_size / n_heads; }
  // Throws sedd::Error naming the offending key and a fix.
  void validate() const;
  std::string summary() const;
};

}  // namespace sedd
