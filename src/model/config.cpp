// ModelConfig validation; see config.h.
#include "model/config.h"

#include <cmath>

#include "io/error.h"

namespace sedd {

void ModelConfig::validate() const {
  SEDD_CHECK(objective == "sedd" || objective == "mdlm" || objective == "d3pm" || objective == "ar",
             "diffusion.objective must be sedd, mdlm, d3pm or ar, got '{}'", objective);
  SEDD_CHECK(graph == "absorb" || graph == "uniform", "diffusion.graph must be 'absorb' or 'uniform', got '{}'",
             graph);
  SEDD_CHECK(objective != "mdlm" || graph == "absorb",
             "diffusion.objective = mdlm is masked diffusion: it needs diffusion.graph = absorb");
  SEDD_CHECK(objective == "sedd" || !scale_by_sigma,
             "model.scale_by_sigma belongs to the score-entropy objective; set it to false for '{}'", objective);
  SEDD_CHECK(objective != "ar" || !time_conditioning,
             "diffusion.objective = ar has no diffusion time: set model.time_conditioning = false");
  // bos is set from the data's end-of-text id when training starts (-1 until then).
  SEDD_CHECK(bos >= -1 && bos < tokens, "model: the first input token (bos = {}) is not in the vocabulary ({})", bos,
             tokens);
  SEDD_CHECK(objective != "d3pm" || (timesteps >= 2 && timesteps <= 100000),
             "diffusion.timesteps must be in [2, 100000] for d3pm, got {}", timesteps);
  SEDD_CHECK(tokens >= 2, "model: vocabulary size must be >= 2, got {}", tokens);
  SEDD_CHECK(hidden_size > 0 && n_heads > 0 && n_blocks > 0 && cond_dim > 0 && length > 0,
             "model: hidden_size, n_heads, n_blocks, cond_dim and length must be positive");
  SEDD_CHECK(hidden_size % n_heads == 0,
             "model.hidden_size ({}) must be divisible by model.n_heads ({}); try n_heads = {}", hidden_size,
             n_heads, hidden_size % 64 == 0 ? hidden_size / 64 : 1);
  SEDD_CHECK(head_dim() % 2 == 0, "model: head dimension hidden_size/n_heads = {} must be even for rotary embeddings",
             head_dim());
  SEDD_CHECK(dropout >= 0 && dropout < 1, "model.dropout must be in [0, 1), got {}", dropout);
  SEDD_CHECK(!scale_by_sigma || graph == "absorb" || objective != "sedd",
             "model.scale_by_sigma is only defined for the absorbing graph; set it to false for '{}'", graph);
  SEDD_CHECK(time_conditioning || graph == "absorb" || objective == "ar",
             "model.time_conditioning = false needs the absorbing graph (the uniform score depends on sigma)");
  // Every schedule number must be finite, used by the chosen schedule or not: an infinite sigma_max
  // passes `sigma_max > sigma_min` and would make every sigma infinite (and JSON writes it as null).
  for (auto [key, v] : {std::pair<const char*, double>{"diffusion.eps", noise.eps},
                        {"diffusion.sigma_min", noise.sigma_min}, {"diffusion.sigma_max", noise.sigma_max}})
    SEDD_CHECK(std::isfinite(v), "{} must be a finite number, got {}", key, v);
  noise.validate();
}

std::string ModelConfig::summary() const {
  if (objective == "ar")
    return fmt::format("DDiT {}x{} ({} heads, cond {}), autoregressive over {} tokens, L={}", n_blocks, hidden_size,
                       n_heads, cond_dim, tokens, length);
  return fmt::format("DDiT {}x{} ({} heads, cond {}), {}{}, graph {} over {} tokens, noise {}, L={}{}", n_blocks,
                     hidden_size, n_heads, cond_dim, objective,
                     objective == "d3pm" ? fmt::format(" T={}", timesteps) : std::string(), graph, tokens, noise.kind,
                     length, time_conditioning ? "" : ", no time conditioning");
}

}  // namespace sedd
