// Noise schedules: total noise sigma(t) and its rate sigma'(t) (docs/DESIGN.md, "Noise").
//   log-linear: sigma(t) = -log(1 - (1-eps) t),   sigma'(t) = (1-eps) / (1 - (1-eps) t)
//   geometric:  sigma(t) = smin^(1-t) smax^t,     sigma'(t) = sigma(t) (log smax - log smin)
//   cosine:     sigma(t) = -log(eps + (1-eps) cos(pi t / 2)),
//               sigma'(t) = (1-eps) (pi/2) sin(pi t / 2) / (eps + (1-eps) cos(pi t / 2))
// The keep probability of a token, alpha(t) = e^-sigma(t), is what masked diffusion calls alpha_t.
// Both work elementwise on tensors of any shape, dtype and device.
#pragma once
#include <torch/torch.h>
#include <memory>
#include <string>

namespace sedd {

struct NoiseConfig {
  std::string kind = "loglinear";  // loglinear | geometric | cosine
  double eps = 1e-3;               // log-linear, cosine
  double sigma_min = 1e-4;         // geometric
  double sigma_max = 20.0;         // geometric
  void validate() const;
};

class Noise {
 public:
  virtual ~Noise() = default;
  virtual torch::Tensor total(const torch::Tensor& t) const = 0;  // sigma(t)
  virtual torch::Tensor rate(const torch::Tensor& t) const = 0;   // sigma'(t)
  virtual const NoiseConfig& config() const = 0;
};

class LogLinearNoise final : public Noise {
 public:
  explicit LogLinearNoise(NoiseConfig c) : cfg_(std::move(c)) {}
  torch::Tensor total(const torch::Tensor& t) const override;
  torch::Tensor rate(const torch::Tensor& t) const override;
  const NoiseConfig& config() const override { return cfg_; }

 private:
  NoiseConfig cfg_;
};

class GeometricNoise final : public Noise {
 public:
  explicit GeometricNoise(NoiseConfig c) : cfg_(std::move(c)) {}
  torch::Tensor total(const torch::Tensor& t) const override;
  torch::Tensor rate(const torch::Tensor& t) const override;
  const NoiseConfig& config() const override { return cfg_; }

 private:
  NoiseConfig cfg_;
};

class CosineNoise final : public Noise {
 public:
  explicit CosineNoise(NoiseConfig c) : cfg_(std::move(c)) {}
  torch::Tensor total(const torch::Tensor& t) const override;
  torch::Tensor rate(const torch::Tensor& t) const override;
  const NoiseConfig& config() const override { return cfg_; }

 private:
  NoiseConfig cfg_;
};

std::unique_ptr<Noise> make_noise(const NoiseConfig& cfg);

}  // namespace sedd
