// Keyed dropout; see dropout.h.
#include "model/dropout.h"

#include "io/error.h"

namespace sedd {

torch::Tensor dropout_keep_mask(const DropoutKey& key, int64_t site, double p, torch::IntArrayRef shape,
                                torch::Device device) {
  SEDD_CHECK(shape.size() == 3 && key.rows.defined() && key.rows.size(0) == shape[0],
             "keyed dropout: {} rows of keys for a batch of shape {}", key.rows.defined() ? key.rows.size(0) : 0,
             c10::str(shape));
  auto u = keyed_uniform(key.stream(site), key.rows.to(device), shape[1] * shape[2], torch::kFloat);
  return (u >= static_cast<float>(p)).to(torch::kFloat).view(shape);
}

torch::Tensor keyed_dropout(const torch::Tensor& x, double p, bool training, const DropoutKey* key, int64_t site) {
  if (!training || p <= 0) return x;
  if (!key) return torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions().p(p).training(true));
  auto keep = dropout_keep_mask(*key, site, p, x.sizes(), x.device());
  return x * keep.to(x.scalar_type()) * (1.0 / (1.0 - p));
}

}  // namespace sedd
