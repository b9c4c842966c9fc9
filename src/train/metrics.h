// MetricsLog: one JSON object per logged step in <run.dir>/metrics.jsonl (rank 0 only), flushed
// per line so a crash loses nothing and plotting tools can read a live run.
#pragma once
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace sedd {

class MetricsLog {
 public:
  // Keeps existing lines with step <= keep_until_step (a resumed run continues one curve).
  MetricsLog(const std::string& path, int64_t keep_until_step);
  ~MetricsLog();
  void write(const nlohmann::json& row);

 private:
  std::FILE* file_ = nullptr;
};

// Dense bf16 peak FLOP/s of one GPU, by its CUDA device name (H100 SXM/PCIe/NVL, H200, GH200,
// A100, L40S, B200); 0 when the name is not in the table (then MFU needs train.peak_tflops).
double gpu_peak_bf16_flops(const std::string& device_name);

// Model FLOPs utilisation: tokens/s (all ranks) x model FLOPs per token (DDiTImpl::flops_per_token:
// what the network needs at every position, the output layer over the full vocabulary, whatever
// the implementation skips) / (ranks x peak per GPU).
inline double model_flops_utilisation(double tokens_per_s, double flops_per_token, int ranks, double peak_per_gpu) {
  return peak_per_gpu > 0 ? tokens_per_s * flops_per_token / (ranks * peak_per_gpu) : 0.0;
}

}  // namespace sedd
