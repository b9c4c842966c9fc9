// Benchmark (not a test): samples/s and tokens/s of the analytic sampler, with and without exact
// caching, on a model without time conditioning (random weights: the cost does not depend on
// training). Also checks that both give the same samples, exit 1 when they do not: bit for bit on
// the CPU; on CUDA at least 99% equal tokens, since the cache re-runs only the changed samples, a
// smaller batch for which cuBLAS and the attention kernels may choose other algorithms (other bf16
// roundings, and a draw near a tie can go the other way). The equal-token fraction is reported.
//   sedd-bench-sample [--device cpu|cuda|auto] [--model tiny|small] [--samples N] [--length L]
//                     [--steps 64,256,1024] [--precision auto|bf16|fp32] [--json FILE]
// tiny: the demo shape (2x128, 256 tokens, L 128); small: SEDD-small (12x768, GPT-2 vocabulary, L 1024);
// bd3: the tiny shape as block diffusion (L 1024, --block-size 16), sampled by first hitting (or ddpm
// at each --steps), its clean blocks' keys and values cached or computed again for every call.
// Bad or unknown options exit 2 (tool_common.h).
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "distributed/runtime.h"
#include "objectives/score.h"
#include "tool_common.h"

using namespace sedd;
namespace po = boost::program_options;

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  const char* tool = "sedd-bench-sample";
  std::string device = "cpu", model = "tiny", steps_list, precision = "auto", json_out;
  int64_t samples = 0, length = 0, block_size = 16;
  bool alter_cached = false;
  po::options_description desc("sedd-bench-sample: sampler throughput");
  desc.add_options()("help,h", "show this help")(
      "device", po::value(&device)->default_value("cpu"), "cpu | cuda | auto (GPU = local rank)")(
      "model", po::value(&model)->default_value("tiny"), "tiny | small | bd3")(
      "block-size", po::value(&block_size)->default_value(16), "bd3: tokens per block")(
      "samples", po::value(&samples)->default_value(0), "samples per batch (0: 8 tiny, 16 small)")(
      "length", po::value(&length)->default_value(0), "tokens per sample (0: 128 tiny, 1024 small)")(
      "steps", po::value(&steps_list)->default_value(""), "comma-separated step counts (default 64,256,1024 / 128,1024)")(
      "precision", po::value(&precision)->default_value("auto"), "auto | bf16 | fp32 (auto: bf16 on GPUs)")(
      "json", po::value(&json_out), "write the figures as JSON")(
      "debug.alter-cached", po::bool_switch(&alter_cached), "tests only: change one cached draw (the check must fail)");
  if (int rc = tools::parse_options(tool, desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  std::vector<int64_t> steps;
  bool bf16 = false;
  if (int rc = tools::agree(rt, tool, [&] {
        SEDD_CHECK_OPTION(rt.world == 1, "runs as one process (got {} ranks)", rt.world);
        tools::check_writable(json_out, "--json");
        SEDD_CHECK_OPTION(model == "tiny" || model == "small" || model == "bd3",
                          "--model must be tiny, small or bd3, got '{}'", model);
        SEDD_CHECK_OPTION(block_size >= 1, "--block-size must be at least 1, got {}", block_size);
        SEDD_CHECK_OPTION(samples >= 0 && length >= 0, "--samples and --length must be >= 0 (0: the model's default)");
        // bd3 without --steps: first hitting (its steps are the tokens), written as step count 0.
        if (model == "bd3" && steps_list.empty()) steps.push_back(0);
        std::stringstream ss(steps_list.empty() ? (model == "small" ? "128,1024" : model == "bd3" ? "" : "64,256,1024")
                                                : steps_list);
        for (std::string item; std::getline(ss, item, ',');) {
          size_t used = 0;
          int64_t n = 0;
          try {
            n = std::stoll(item, &used);
          } catch (const std::exception&) {
          }
          SEDD_CHECK_OPTION(used == item.size() && n > 0, "--steps: '{}' is not a positive step count", item);
          steps.push_back(n);
        }
        SEDD_CHECK_OPTION(!steps.empty(), "--steps names no step count");
        rt.select_device(device);
        bf16 = tools::use_bf16(precision, rt.device);
      });
      rc >= 0)
    return rc;
  const bool small = model == "small", bd3 = model == "bd3";
  ModelConfig cfg;
  cfg.tokens = small ? 50257 : 256;
  cfg.hidden_size = small ? 768 : 128;
  cfg.n_heads = small ? 12 : 4;
  cfg.n_blocks = small ? 12 : 2;
  cfg.cond_dim = small ? 128 : 64;
  cfg.length = length > 0 ? length : (small || bd3 ? 1024 : 128);
  cfg.time_conditioning = false;
  if (bd3) {
    cfg.objective = "bd3";
    cfg.block_size = block_size;
    cfg.scale_by_sigma = false;
    cfg.bos = 0;
  }
  if (samples <= 0) samples = small ? 16 : bd3 ? 4 : 8;
  bool all_passed = true;
  try {
    torch::manual_seed(0);
    DDiT m(cfg);
    {
      torch::NoGradGuard ng;  // non-zero output layer, so the scores are not uniform
      for (auto& p : m->parameters()) p.normal_(0, 0.02);
    }
    m->to(rt.device);
    m->bf16 = bf16;
    m->eval();
    auto graph = make_graph("absorb", cfg.tokens);
    auto noise = make_noise(cfg.noise);
    std::printf("device %s (%s), torch threads %d; model %s; %lld samples x %lld tokens\n", rt.device_name().c_str(),
                m->bf16 ? "bf16" : "fp32", torch::get_num_threads(), cfg.summary().c_str(),
                static_cast<long long>(samples), static_cast<long long>(cfg.length));
    const bool bit_exact = !rt.device.is_cuda();
    const double min_equal_fraction = bit_exact ? 1.0 : 0.99;
    const char* rule = bit_exact ? "bit-identical" : ">= 99% equal tokens";
    std::printf("check: cached against plain draws, %s\n", rule);
    std::printf("%6s %14s %14s %14s %14s %8s %10s %10s %10s\n", "steps", "plain s", "plain smp/s", "cached s",
                "cached smp/s", "speedup", "forwards", "equal tok", "passed");
    nlohmann::json rows = nlohmann::json::array();
    auto ids = torch::arange(samples, torch::kLong);
    for (int64_t n : steps) {
      double secs[2];
      int64_t forwards[2];
      torch::Tensor out[2];
      for (int cached = 0; cached < 2; ++cached) {
        DDiTScore score(m, cached == 1);
        SamplerConfig sc;
        sc.model = cfg;
        sc.steps = std::max<int64_t>(n, 1);
        sc.block_sampler = n == 0 ? "first-hitting" : "ddpm";
        sc.seed = 1;
        if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
        auto t0 = std::chrono::steady_clock::now();
        out[cached] = sample(*graph, *noise, score, cfg.length, sc, Constraint{}, ids, rt.device).cpu();
        secs[cached] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        forwards[cached] = score.forwards();
      }
      if (alter_cached) out[1][0][0] = (out[1][0][0].item<int64_t>() + 1) % cfg.tokens;
      const bool identical = torch::equal(out[0], out[1]);
      const double equal_fraction = out[0].eq(out[1]).to(torch::kDouble).mean().item<double>();
      const bool passed = bit_exact ? identical : equal_fraction >= min_equal_fraction;
      all_passed &= passed;
      std::printf("%6lld %14.2f %14.2f %14.2f %14.2f %7.2fx %4lld/%-5lld %10.6f %10s\n", static_cast<long long>(n),
                  secs[0], samples / secs[0], secs[1], samples / secs[1], secs[0] / secs[1],
                  static_cast<long long>(forwards[1]), static_cast<long long>(forwards[0]), equal_fraction,
                  passed ? "yes" : "NO");
      rows.push_back({{"steps", n},
                      {"plain_seconds", secs[0]},
                      {"plain_samples_per_s", samples / secs[0]},
                      {"plain_tokens_per_s", samples * cfg.length / secs[0]},
                      {"cached_seconds", secs[1]},
                      {"cached_samples_per_s", samples / secs[1]},
                      {"cached_tokens_per_s", samples * cfg.length / secs[1]},
                      {"cached_forwards", forwards[1]},
                      {"plain_forwards", forwards[0]},
                      {"identical", identical},
                      {"equal_token_fraction", equal_fraction},
                      {"check_passed", passed}});
    }
    if (!json_out.empty()) {
      nlohmann::json j = {{"device", rt.device_name()}, {"precision", m->bf16 ? "bf16" : "fp32"},
                          {"model", cfg.summary()},      {"samples", samples},
                          {"length", cfg.length},        {"check_rule", rule},
                          {"results", rows}};
      std::ofstream f(json_out);
      f << j.dump(2) << "\n";
      f.close();
      SEDD_CHECK(!f.fail(), "{}: writing failed (disk full?)", json_out);
    }
  } catch (const std::exception& e) {
    return tools::end_job(rt, tool, e);
  }
  if (!all_passed) {
    tools::print_error(tool, "the cached sampler's draws differ from the plain sampler's (passed: NO above)", 0);
    return tools::kExitFailure;
  }
  return tools::kExitOk;
}
