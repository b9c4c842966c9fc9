// Benchmark (not a test): samples/s of the analytic sampler with and without exact caching, for
// 64, 256 and 1024 steps, on a model without time conditioning (random weights; the cost does
// not depend on training). Also checks that both give identical samples.
#include <chrono>
#include <cstdio>

#include "diffusion/categorical.h"
#include "model/score.h"

using namespace sedd;

int main(int argc, char** argv) {
  int64_t batch = 8, length = 128;
  if (argc > 1) length = std::stoll(argv[1]);
  ModelConfig cfg;
  cfg.tokens = 256;
  cfg.hidden_size = 128;
  cfg.n_heads = 4;
  cfg.n_blocks = 2;
  cfg.cond_dim = 64;
  cfg.length = length;
  cfg.time_conditioning = false;
  torch::manual_seed(0);
  DDiT m(cfg);
  m->eval();
  auto graph = make_graph("absorb", cfg.tokens);
  auto noise = make_noise(cfg.noise);
  std::printf("torch threads %d; model %s; %lld samples x %lld tokens\n", torch::get_num_threads(),
              cfg.summary().c_str(), static_cast<long long>(batch), static_cast<long long>(length));
  std::printf("%6s %16s %16s %8s %10s\n", "steps", "samples/s plain", "samples/s cached", "speedup", "identical");
  for (int64_t steps : {64, 256, 1024}) {
    double rate[2];
    torch::Tensor out[2];
    for (int cached = 0; cached < 2; ++cached) {
      DDiTScore score(m, cached == 1);
      std::vector<torch::Generator> gens;
      for (int64_t i = 0; i < batch; ++i) gens.push_back(keyed_generator(1, 2, i));
      SamplerConfig sc;
      sc.steps = steps;
      auto t0 = std::chrono::steady_clock::now();
      out[cached] = sample(*graph, *noise, score, length, sc, Constraint{}, gens, torch::kCPU);
      rate[cached] = batch / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    std::printf("%6lld %16.2f %16.2f %7.2fx %10s\n", static_cast<long long>(steps), rate[0], rate[1], rate[1] / rate[0],
                torch::equal(out[0], out[1]) ? "yes" : "NO");
  }
  return 0;
}
