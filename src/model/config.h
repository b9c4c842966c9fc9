// ModelConfig: everything needed to rebuild a score network from its weight file alone
// (architecture, graph and noise schedule travel with the weights).
#pragma once
#include <string>

#include "diffusion/noise.h"

namespace sedd {

struct ModelConfig {
  int64_t tokens = 256;         // vocabulary N (without the absorbing mask)
  std::string graph = "absorb"; // absorb | uniform
  int64_t hidden_size = 128;
  int64_t n_heads = 4;
  int64_t n_blocks = 2;
  int64_t cond_dim = 64;
  int64_t length = 128;         // training sequence length (rotary works for any length)
  double dropout = 0.0;
  bool scale_by_sigma = true;   // absorbing only
  bool time_conditioning = true;
  NoiseConfig noise;

  int64_t vocab_dim() const { return tokens + (graph == "absorb" ? 1 : 0); }
  int64_t head_dim() const { return hidden_size / n_heads; }
  // Throws sedd::Error naming the offending key and a fix.
  void validate() const;
  std::string summary() const;
};

}  // namespace sedd
