// DDiTScore; see score.h.
#include "model/score.h"

namespace sedd {

torch::Tensor DDiTScore::log_score(const torch::Tensor& x, const torch::Tensor& sigma) {
  torch::NoGradGuard ng;
  if (!cache_) {
    rows_evaluated_ += x.size(0);
    return model_->forward(x, sigma);
  }
  if (!last_x_.defined() || last_x_.sizes() != x.sizes()) {
    last_raw_ = model_->forward_raw(x, sigma);
    rows_evaluated_ += x.size(0);
  } else {
    auto changed = (x != last_x_).any(1).nonzero().squeeze(1);  // rows whose tokens moved
    if (changed.numel() > 0) {
      auto fresh = model_->forward_raw(x.index_select(0, changed), sigma.index_select(0, changed));
      last_raw_ = last_raw_.index_copy(0, changed, fresh);
    }
    rows_evaluated_ += changed.numel();
    rows_reused_ += x.size(0) - changed.numel();
  }
  last_x_ = x.clone();
  return model_->finish(last_raw_, x, sigma);
}

}  // namespace sedd
