// Benchmark (not a test): forward+backward tokens/s of the DDiT score network for a tiny and a
// GPT-2-small-shaped config, and the model FLOP/s that makes (DDiTImpl::flops_per_token).
// bd3-split and bd3-mask: the tiny network as block diffusion (L 1024, blocks of 16) with each exact
// form of its attention (model/block_attention.h); run one config per process to read its peak
// memory (the process's maximum resident set, printed last).
//   sedd-bench-model [--device cpu|cuda|all] [--precision auto|bf16|fp32] [--shapes tiny,gpt2-small]
//                    [--steps N] [--tiny-batch B] [--small-batch B] [--json FILE]
// --device all (the default): the CPU and, when one is visible, the GPU. Defaults where 0: 3 steps
// on the CPU and 20 on a GPU; batches 8 (tiny) and 1 (gpt2-small) on the CPU, 16 times that on a
// GPU. Bad or unknown options exit 2 (tool_common.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include <sys/resource.h>
#ifdef SEDD_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "diffusion/times.h"
#include "objectives/bd3.h"
#include "objectives/sedd.h"
#include "model/ddit.h"
#include "tool_common.h"

using namespace sedd;
namespace po = boost::program_options;

namespace {

struct Shape {
  const char* name;
  int64_t hidden, heads, blocks, cond, length, batch;
};

// Peak bytes the caching allocator held for tensors on a CUDA device since the last reset (0 on the CPU).
int64_t cuda_peak_bytes(torch::Device dev, bool reset) {
#ifdef SEDD_HAVE_CUDA
  if (dev.is_cuda()) {
    if (reset) c10::cuda::CUDACachingAllocator::resetPeakStats(dev.index());
    return c10::cuda::CUDACachingAllocator::getDeviceStats(dev.index())
        .allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
        .peak;
  }
#endif
  (void)dev, (void)reset;
  return 0;
}

double tokens_per_s(const Shape& s, torch::Device dev, bool bf16, int64_t steps, double* flops_per_token,
                    int64_t* peak_bytes) {
  cuda_peak_bytes(dev, true);
  ModelConfig cfg;
  cfg.tokens = 50257;
  cfg.hidden_size = s.hidden;
  cfg.n_heads = s.heads;
  cfg.n_blocks = s.blocks;
  cfg.cond_dim = s.cond;
  cfg.length = s.length;
  const std::string name = s.name;
  const bool bd3 = name.rfind("bd3-", 0) == 0;
  if (name == "tiny" || bd3) cfg.tokens = 256;
  if (bd3) {
    cfg.objective = "bd3";
    cfg.block_size = 16;
    cfg.time_conditioning = false;
    cfg.scale_by_sigma = false;
  }
  DDiT m(cfg);
  if (bd3) m->set_block_attention(name == "bd3-mask" ? BlockAttention::Mask : BlockAttention::Split);
  m->to(dev);
  m->bf16 = bf16;
  auto graph = make_graph(cfg.graph, cfg.tokens);
  auto noise = make_noise(cfg.noise);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  auto x0 = torch::randint(cfg.tokens, {s.batch, s.length}, gen, torch::kLong).to(dev);
  auto t = training_time(torch::rand({s.batch}, gen, torch::kDouble)).to(torch::kFloat).to(dev);
  auto xt = graph->sample_transition(x0, noise->total(t).unsqueeze(-1), gen);
  auto t_pos = t.to(torch::kDouble).unsqueeze(1).expand({s.batch, s.length}).contiguous();
  auto step = [&] {
    m->zero_grad();
    auto loss = bd3 ? bd3_sequence_loss(m, xt, x0, t_pos, nullptr, LossOptions{}).mean()
                    : sequence_loss(*graph, *noise, m->forward(xt, noise->total(t)), t, xt, x0).mean();
    loss.backward();
  };
  step();  // warm-up
  if (dev.is_cuda()) torch::cuda::synchronize(dev.index());  // this device, not the current one
  auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) step();
  if (dev.is_cuda()) torch::cuda::synchronize(dev.index());  // this device, not the current one
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  *flops_per_token = m->flops_per_token(s.length);
  *peak_bytes = cuda_peak_bytes(dev, false);
  return steps * s.batch * s.length / secs;
}

}  // namespace

int main(int argc, char** argv) {
  const char* tool = "sedd-bench-model";
  std::string device = "all", precision = "auto", shape_list = "tiny,gpt2-small", json_out;
  int64_t steps = 0, tiny_batch = 0, small_batch = 0;
  po::options_description desc("sedd-bench-model: forward+backward throughput of the score network");
  desc.add_options()("help,h", "show this help")(
      "device", po::value(&device)->default_value(device), "cpu | cuda | all (the CPU, and the GPU when visible)")(
      "precision", po::value(&precision)->default_value(precision), "auto | bf16 | fp32 (auto: bf16 on GPUs)")(
      "shapes", po::value(&shape_list)->default_value(shape_list),
      "the configs measured: tiny, gpt2-small, bd3-split, bd3-mask (comma list)")(
      "steps", po::value(&steps)->default_value(0), "measured steps (0: 3 on the CPU, 20 on a GPU)")(
      "tiny-batch", po::value(&tiny_batch)->default_value(0),
      "sequences per step, tiny (0: 8 on the CPU, 128 on a GPU)")(
      "small-batch", po::value(&small_batch)->default_value(0),
      "sequences per step, gpt2-small (0: 1 on the CPU, 16 on a GPU)")(
      "json", po::value(&json_out), "write the figures as JSON");
  if (int rc = tools::parse_options(tool, desc, argc, argv, /*root=*/true); rc >= 0) return rc;
  const Shape known[] = {{"tiny", 128, 4, 2, 64, 128, 8},
                         {"gpt2-small", 768, 12, 12, 128, 1024, 1},
                         {"bd3-split", 128, 4, 2, 64, 1024, 2},
                         {"bd3-mask", 128, 4, 2, 64, 1024, 2}};
  std::vector<Shape> shapes;
  std::vector<std::pair<torch::Device, bool>> devices;  // device, bf16
  try {
    tools::check_writable(json_out, "--json");
    SEDD_CHECK_OPTION(steps >= 0 && tiny_batch >= 0 && small_batch >= 0,
                      "--steps, --tiny-batch and --small-batch must be >= 0 (0: the default)");
    std::stringstream ss(shape_list);
    for (std::string name; std::getline(ss, name, ',');) {
      auto s = std::find_if(std::begin(known), std::end(known), [&](const Shape& k) { return name == k.name; });
      SEDD_CHECK_OPTION(s != std::end(known), "--shapes: unknown config '{}' (tiny, gpt2-small, bd3-split, bd3-mask)",
                        name);
      shapes.push_back(*s);
    }
    SEDD_CHECK_OPTION(!shapes.empty(), "--shapes names no config");
    SEDD_CHECK_OPTION(device == "cpu" || device == "cuda" || device == "all",
                      "--device must be cpu, cuda or all, got '{}'", device);
    SEDD_CHECK_OPTION(device != "cuda" || torch::cuda::is_available(), "--device cuda: no GPU is visible");
    if (device != "cuda") {
      SEDD_CHECK_OPTION(precision != "bf16", "--precision bf16 needs a GPU (--device cuda); CPUs run fp32");
      devices.emplace_back(torch::kCPU, tools::use_bf16(precision, torch::kCPU));
    }
    if (device != "cpu" && torch::cuda::is_available()) {
      torch::Device gpu(torch::kCUDA, 0);
      devices.emplace_back(gpu, tools::use_bf16(precision, gpu));
    }
  } catch (const std::exception& e) {
    tools::print_error(tool, e.what(), 0);
    return tools::exit_code_of(e);
  }
  try {
    std::printf("torch threads: %d\n", torch::get_num_threads());
    std::printf("%-11s %-6s %-9s %8s %14s %22s\n", "config", "device", "precision", "batch", "tokens/s",
                "model GFLOP/s (fwd+bwd)");
    nlohmann::json rows = nlohmann::json::array();
    for (const auto& [dev, bf16] : devices) {
      for (Shape run : shapes) {
        const bool tiny = std::string(run.name) != "gpt2-small";
        const int64_t given = tiny ? tiny_batch : small_batch;
        run.batch = given > 0 ? given : run.batch * (dev.is_cuda() ? 16 : 1);
        const int64_t n = steps > 0 ? steps : dev.is_cuda() ? 20 : 3;
        double fpt = 0;
        int64_t peak = 0;
        double tps = tokens_per_s(run, dev, bf16, n, &fpt, &peak);
        std::printf("%-11s %-6s %-9s %8lld %14.1f %22.1f", run.name, dev.is_cuda() ? "cuda" : "cpu",
                    bf16 ? "bf16" : "fp32", static_cast<long long>(run.batch), tps, tps * fpt / 1e9);
        if (dev.is_cuda()) std::printf("   peak GPU memory %.1f MB", peak / 1048576.0);
        std::printf("\n");
        rows.push_back({{"config", run.name},
                        {"device", dev.is_cuda() ? "cuda" : "cpu"},
                        {"precision", bf16 ? "bf16" : "fp32"},
                        {"batch", run.batch},
                        {"length", run.length},
                        {"steps", n},
                        {"tokens_per_s", tps},
                        {"model_flops_per_token", fpt},
                        {"model_gflops_per_s", tps * fpt / 1e9},
                        {"cuda_peak_bytes", peak}});
      }
    }
    struct rusage usage {};
    getrusage(RUSAGE_SELF, &usage);
    std::printf("peak resident memory of this process: %.1f MB\n", usage.ru_maxrss / 1024.0);
    if (!json_out.empty()) {
      std::ofstream f(json_out);
      f << rows.dump(2) << "\n";
      f.close();
      SEDD_CHECK(!f.fail(), "{}: writing failed (disk full?)", json_out);
    }
  } catch (const std::exception& e) {
    tools::print_error(tool, e.what(), 0);
    return tools::exit_code_of(e);
  }
  return tools::kExitOk;
}
