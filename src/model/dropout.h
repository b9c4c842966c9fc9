// Dropout with masks keyed per sequence. Row b of a batch draws its mask at dropout site `site`
// from the stream (seed, purpose::kDropoutBase + site, step) at row rows[b], element l * D + d, so a
// sequence gets the same masks whichever rank, micro-batch or device computes it: runs with
// dropout stay independent of the world size, and a resumed run repeats them exactly.
#pragma once
#include <torch/torch.h>

#include "diffusion/keyed_random.h"

namespace sedd {

struct DropoutKey {
  uint64_t seed = 0;
  uint64_t step = 0;
  torch::Tensor rows;  // int64 [B]: each row's global sequence index, on the model's device

  RandomStream stream(int64_t site) const {
    return RandomStream{seed, purpose::kDropoutBase + static_cast<uint64_t>(site), step};
  }
};

// The keep-mask of x [B, L, D] at `site`: keyed_uniform(...) >= p, as float32 [B, L, D].
torch::Tensor dropout_keep_mask(const DropoutKey& key, int64_t site, double p, torch::IntArrayRef shape,
                                torch::Device device);

// x * keep / (1 - p); identity when p == 0. Without a key (inference, unit tests) it falls back to
// torch's unkeyed dropout.
torch::Tensor keyed_dropout(const torch::Tensor& x, double p, bool training, const DropoutKey* key, int64_t site);

}  // namespace sedd
