// Benchmark (not a test): forward+backward tokens/s of the DDiT score network for a tiny and a
// GPT-2-small-shaped config, on CPU and, when present, on GPU (bf16 autocast).
//   sedd-bench-model [--steps N] [--small-batch B]
#include <chrono>
#include <cstdio>
#include <string>

#include "diffusion/loss.h"
#include "model/ddit.h"

using namespace sedd;

namespace {

struct Shape {
  const char* name;
  int64_t hidden, heads, blocks, cond, length, batch;
};

double tokens_per_s(const Shape& s, torch::Device dev, int steps, double* flops_per_token) {
  ModelConfig cfg;
  cfg.tokens = 50257;
  cfg.hidden_size = s.hidden;
  cfg.n_heads = s.heads;
  cfg.n_blocks = s.blocks;
  cfg.cond_dim = s.cond;
  cfg.length = s.length;
  if (std::string(s.name) == "tiny") cfg.tokens = 256;
  DDiT m(cfg);
  m->to(dev);
  m->bf16 = dev.is_cuda();
  auto graph = make_graph(cfg.graph, cfg.tokens);
  auto noise = make_noise(cfg.noise);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  auto x0 = torch::randint(cfg.tokens, {s.batch, s.length}, gen, torch::kLong).to(dev);
  auto t = training_time(torch::rand({s.batch}, gen, torch::kDouble)).to(torch::kFloat).to(dev);
  auto xt = graph->sample_transition(x0, noise->total(t).unsqueeze(-1), gen);
  auto step = [&] {
    m->zero_grad();
    auto loss = sequence_loss(*graph, *noise, m->forward(xt, noise->total(t)), t, xt, x0).mean();
    loss.backward();
  };
  step();  // warm-up
  if (dev.is_cuda()) torch::cuda::synchronize();
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step();
  if (dev.is_cuda()) torch::cuda::synchronize();
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  *flops_per_token = m->flops_per_token(s.length);
  return steps * s.batch * s.length / secs;
}

}  // namespace

int main(int argc, char** argv) {
  int steps = 3;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--steps") steps = std::stoi(argv[i + 1]);
  std::printf("torch threads: %d\n", torch::get_num_threads());
  const Shape shapes[] = {{"tiny", 128, 4, 2, 64, 128, 8}, {"gpt2-small", 768, 12, 12, 128, 1024, 1}};
  std::vector<torch::Device> devices = {torch::kCPU};
  if (torch::cuda::is_available()) devices.emplace_back(torch::kCUDA, 0);
  std::printf("%-11s %-6s %8s %14s %12s\n", "config", "device", "batch", "tokens/s", "GFLOP/s");
  for (auto dev : devices) {
    for (const auto& s : shapes) {
      Shape run = s;
      if (dev.is_cuda()) run.batch = s.batch * 16;
      double fpt = 0;
      double tps = tokens_per_s(run, dev, dev.is_cuda() ? 20 : steps, &fpt);
      std::printf("%-11s %-6s %8lld %14.1f %12.1f\n", s.name, dev.is_cuda() ? "cuda" : "cpu",
                  static_cast<long long>(run.batch), tps, tps * fpt / 1e9);
    }
  }
  return 0;
}
