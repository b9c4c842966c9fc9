// Noise schedules; see noise.h.
#include "diffusion/noise.h"

#include <cmath>

#include "io/error.h"

namespace sedd {

void NoiseConfig::validate() const {
  if (kind == "loglinear" || kind == "cosine") {
    SEDD_CHECK(eps > 0 && eps < 1, "diffusion.eps must be in (0, 1), got {}", eps);
  } else if (kind == "geometric") {
    SEDD_CHECK(sigma_min > 0 && sigma_max > sigma_min,
               "diffusion.sigma_min/sigma_max must satisfy 0 < sigma_min < sigma_max, got {} and {}",
               sigma_min, sigma_max);
  } else {
    fail("diffusion.noise must be 'loglinear', 'geometric' or 'cosine', got '{}'", kind);
  }
}

torch::Tensor LogLinearNoise::total(const torch::Tensor& t) const {
  // -log1p(-(1-eps) t): log1p keeps precision for small t.
  return -torch::log1p(-(1 - cfg_.eps) * t);
}

torch::Tensor LogLinearNoise::rate(const torch::Tensor& t) const {
  return (1 - cfg_.eps) / (1 - (1 - cfg_.eps) * t);
}

torch::Tensor GeometricNoise::total(const torch::Tensor& t) const {
  return torch::pow(cfg_.sigma_min, 1 - t) * torch::pow(cfg_.sigma_max, t);
}

torch::Tensor GeometricNoise::rate(const torch::Tensor& t) const {
  return total(t) * (std::log(cfg_.sigma_max) - std::log(cfg_.sigma_min));
}

torch::Tensor CosineNoise::total(const torch::Tensor& t) const {
  return -torch::log(cfg_.eps + (1 - cfg_.eps) * torch::cos(t * (M_PI / 2)));
}

torch::Tensor CosineNoise::rate(const torch::Tensor& t) const {
  auto a = t * (M_PI / 2);
  return (1 - cfg_.eps) * (M_PI / 2) * torch::sin(a) / (cfg_.eps + (1 - cfg_.eps) * torch::cos(a));
}

std::unique_ptr<Noise> make_noise(const NoiseConfig& cfg) {
  cfg.validate();
  if (cfg.kind == "loglinear") return std::make_unique<LogLinearNoise>(cfg);
  if (cfg.kind == "cosine") return std::make_unique<CosineNoise>(cfg);
  return std::make_unique<GeometricNoise>(cfg);
}

}  // namespace sedd
