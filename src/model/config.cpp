// ModelConfig validation; see config.h.
#include "model/config.h"

#include <cmath>

#include "io/error.h"

namespace sedd {

void ModelConfig::validate() const {
  SEDD_CHECK(graph == "absorb" || graph == "uniform", "diffusion.graph must be 'absorb' or 'uniform', got '{}'",
             graph);
  // bos is set from the data's end-of-text id when training starts (-1 until then).
  SEDD_CHECK(bos >= -1 && bos < tokens, "model: the first input token (bos = {}) is not in the vocabulary ({})", bos,
             tokens);
  SEDD_CHECK(tokens >= 2, "model: vocabulary size must be >= 2, got {}", tokens);
  SEDD_CHECK(hidden_size > 0 && n_heads > 0 && n_blocks > 0 && cond_dim > 0 && length > 0,
             "model: hidden_size, n_heads, n_blocks, cond_dim and length must be positive");
  SEDD_CHECK(hidden_size % n_heads == 0,
             "model.hidden_size ({}) must be divisible by model.n_heads ({}); try n_heads = {}", hidden_size,
             n_heads, hidden_size % 64 == 0 ? hidden_size / 64 : 1);
  SEDD_CHECK(head_dim() % 2 == 0, "model: head dimension hidden_size/n_heads = {} must be even for rotary embeddings",
             head_dim());
  SEDD_CHECK(dropout >= 0 && dropout < 1, "model.dropout must be in [0, 1), got {}", dropout);
  check_objective();
  // Every schedule number must be finite, used by the chosen schedule or not: an infinite sigma_max
  // passes `sigma_max > sigma_min` and would make every sigma infinite (and JSON writes it as null).
  for (auto [key, v] : {std::pair<const char*, double>{"diffusion.eps", noise.eps},
                        {"diffusion.sigma_min", noise.sigma_min}, {"diffusion.sigma_max", noise.sigma_max}})
    SEDD_CHECK(std::isfinite(v), "{} must be a finite number, got {}", key, v);
  noise.validate();
}

std::string ModelConfig::summary() const {
  return fmt::format("DDiT {}x{} ({} heads, cond {}), {} over {} tokens, noise {}, L={}{}", n_blocks, hidden_size,
                     n_heads, cond_dim, objective_summary(), tokens, noise.kind, length,
                     time_conditioning ? "" : ", no time conditioning");
}

}  // namespace sedd
