// ModelConfig validation; see config.h.
#include "model/config.h"

#include "io/error.h"

namespace sedd {

void ModelConfig::validate() const {
  SEDD_CHECK(graph == "absorb" || graph == "uniform", "diffusion.graph must be 'absorb' or 'uniform', got '{}'",
             graph);
  SEDD_CHECK(tokens >= 2, "model: vocabulary size must be >= 2, got {}", tokens);
  SEDD_CHECK(hidden_size > 0 && n_heads > 0 && n_blocks > 0 && cond_dim > 0 && length > 0,
             "model: hidden_size, n_heads, n_blocks, cond_dim and length must be positive");
  SEDD_CHECK(hidden_size % n_heads == 0,
             "model.hidden_size ({}) must be divisible by model.n_heads ({}); try n_heads = {}", hidden_size,
             n_heads, hidden_size % 64 == 0 ? hidden_size / 64 : 1);
  SEDD_CHECK(head_dim() % 2 == 0, "model: head dimension hidden_size/n_heads = {} must be even for rotary embeddings",
             head_dim());
  SEDD_CHECK(dropout >= 0 && dropout < 1, "model.dropout must be in [0, 1), got {}", dropout);
  SEDD_CHECK(!scale_by_sigma || graph == "absorb",
             "model.scale_by_sigma is only defined for the absorbing graph; set it to false for '{}'", graph);
  SEDD_CHECK(time_conditioning || graph == "absorb",
             "model.time_conditioning = false needs the absorbing graph (the uniform score depends on sigma)");
  noise.validate();
}

std::string ModelConfig::summary() const {
  return fmt::format("DDiT {}x{} ({} heads, cond {}), graph {} over {} tokens, noise {}, L={}{}", n_blocks,
                     hidden_size, n_heads, cond_dim, graph, tokens, noise.kind, length,
                     time_conditioning ? "" : ", no time conditioning");
}

}  // namespace sedd
