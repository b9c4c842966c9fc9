// Benchmark (not a test), under mpirun: training throughput of the real trainer.
//   mpirun -np W sedd-bench-train [--config FILE] [--device D] [--precision P] [--json OUT]
//                                 [--bench.steps N] [--bench.shapes tiny,small] [--section.key value ...]
// Every sedd-train option is honoured (--device, --precision, --json are short for --run.device,
// --train.precision, --bench.json); unknown options are refused (exit 2). With --config (e.g.
// configs/sedd-small.ini --device cuda), that run is measured. Without --config, the shapes
// "tiny" (2x128, L 128) and "small" (6x384, L 256) are measured on the CPU unless --device says
// otherwise, with the same work per rank at every W; model.*, data.seq_len and train.batch_size
// given on the command line replace a shape's. The data: data.train's shards (named on the
// command line they must exist; a config's that this machine lacks, e.g. configs/sedd-small.ini's
// corpus, become random tokens over bench.vocab, as printed), else random tokens over bench.vocab.
// Prints tokens/s, MFU (GPU; model FLOPs, DDiTImpl::flops_per_token: the full window's attention
// and the output layer over the full vocabulary at every position, also where the masked-rows loss
// computes fewer), peak memory, the time split (data, forward+backward, optimizer incl.
// communication, host time inside collectives) and optimizer+EMA bytes per rank; --json writes
// the same figures.
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "distributed/communicator.h"
#include "distributed/control.h"
#include "tool_common.h"
#include "train/memory_plan.h"
#include "train/metrics.h"
#include "train/trainer.h"
#include "train_options.h"

#ifdef SEDD_HAVE_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

using namespace sedd;
namespace po = boost::program_options;

namespace {

double peak_memory_bytes(const torch::Device& device) {
#ifdef SEDD_HAVE_CUDA
  if (device.is_cuda())
    return static_cast<double>(
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[0].peak);
#endif
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) * 1024.0;  // whole process, CPU runs
}

// Peak memory of the training steps above the memory held when they start (the persistent state:
// weights, gradients, optimizer state). CUDA: the caching allocator's allocated-bytes peak after a
// reset (max_memory_allocated). CPU: the resident set's high-water mark (VmHWM, reset through
// /proc/self/clear_refs "5") minus the resident set at the reset, while glibc serves every
// allocation of 64 KiB or more by mmap (measure()), so freed tensors leave the resident set at once
// and it follows the live tensors.
double bench_proc_status_kb(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string prefix = std::string(key) + ":";
  while (std::getline(in, line))
    if (line.rfind(prefix, 0) == 0) return std::atof(line.c_str() + prefix.size());
  return 0;
}

double bench_step_memory_base(const torch::Device& device) {
#ifdef SEDD_HAVE_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
    return static_cast<double>(
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[0].current);
  }
#endif
  (void)device;
  std::ofstream("/proc/self/clear_refs") << "5";
  return bench_proc_status_kb("VmRSS") * 1024.0;
}

double bench_step_memory_peak(const torch::Device& device) {
#ifdef SEDD_HAVE_CUDA
  if (device.is_cuda())
    return static_cast<double>(
        c10::cuda::CUDACachingAllocator::getDeviceStats(device.index()).allocated_bytes[0].peak);
#endif
  (void)device;
  return bench_proc_status_kb("VmHWM") * 1024.0;
}

nlohmann::json measure(const std::string& name, TrainingConfig c, Runtime& rt, Communicator& comm,
                       ControlPlane& control, int64_t steps, int64_t warmup) {
  constexpr int64_t kMemorySteps = 2;
  c.train.steps = warmup + kMemorySteps + steps + 3;
  c.train.log_every = 1 << 30;
  c.train.eval_every = 0;
  c.train.ckpt_every = -1;  // no checkpoints: pure step time
  Trainer t(c, rt, comm, control, "");
  std::atomic<int> stop{0};
  t.run(&stop, warmup);
  // Memory first, on steps of their own, then the timed steps.
  const double memory_base = bench_step_memory_base(rt.device);
  t.run(&stop, warmup + kMemorySteps);
  if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
  const double step_peak = bench_step_memory_peak(rt.device) - memory_base;
  if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
  double comm0 = t.optimizer().comm_seconds();
  auto t0 = std::chrono::steady_clock::now();
  t.run(&stop, warmup + kMemorySteps + steps);
  if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double comm_s = t.optimizer().comm_seconds() - comm0;
  // A few more steps with the device synchronised after each phase, for the time split.
  t.enable_phase_timing();
  auto before = t.phase_times();
  t.run(&stop, warmup + kMemorySteps + steps + 3);
  auto after = t.phase_times();
  double d = after.data - before.data, fb = after.forward_backward - before.forward_backward,
         op = after.optimizer - before.optimizer, total = std::max(d + fb + op, 1e-12);

  const double tokens = static_cast<double>(steps * c.train.batch_size * c.data.seq_len);
  const double tps = tokens / secs;
  double peak = 0, mfu = 0;
  const double flops_per_token = t.model()->flops_per_token(c.data.seq_len);
  if (rt.device.is_cuda()) {
    peak = c.train.peak_tflops > 0 ? c.train.peak_tflops * 1e12 : gpu_peak_bf16_flops(rt.device_name());
    mfu = model_flops_utilisation(tps, flops_per_token, comm.size(), peak);
  }
  const auto& mc = t.model()->cfg;
  // The plan's figures for this run: the activations of one micro-batch, plus (ZeRO-2) the gradient
  // buckets that live only during the step.
  TrainingConfig planned = c;
  planned.model = mc;
  const MemoryPlan plan = plan_memory(planned, comm.size(), rt.device.is_cuda(), 1e18);
  const double step_estimate = static_cast<double>(plan.activation_bytes) +
                               (plan.zero_stage == 2 ? static_cast<double>(plan.grad_bytes - plan.shard_elems * plan.element_bytes) : 0.0);
  nlohmann::json j = {{"name", name},
                      {"device", rt.device_name()},
                      {"ranks", comm.size()},
                      {"precision", c.train.precision},
                      {"objective", mc.objective},
                      {"vocab", mc.tokens},
                      {"hidden_size", mc.hidden_size},
                      {"n_heads", mc.n_heads},
                      {"n_blocks", mc.n_blocks},
                      {"parameters", t.model()->parameter_count()},
                      {"batch", c.train.batch_size},
                      {"micro_batch", c.micro_batch(comm.size())},
                      {"seq_len", c.data.seq_len},
                      {"fused_loss", c.train.fused_loss},
                      {"fused_kernels", c.train.fused_kernels},
                      {"tokens_per_s", tps},
                      {"tokens_per_s_per_rank", tps / comm.size()},
                      {"model_flops_per_token", flops_per_token},
                      {"peak_flops_per_gpu", peak},
                      {"mfu", mfu},
                      {"mfu_counts", "model FLOPs: forward + backward of every matrix product at every position, "
                                     "attention over the full window, output layer over the full vocabulary"},
                      {"peak_memory_gb", peak_memory_bytes(rt.device) / 1e9},
                      {"activation_checkpointing", c.train.activation_checkpointing},
                      {"zero_stage", c.train.zero_stage},
                      {"step_peak_measured_mb", step_peak / 1e6},
                      {"step_peak_estimate_mb", step_estimate / 1e6},
                      {"step_peak_estimate_ratio", step_estimate / std::max(step_peak, 1.0)},
                      {"plan_state_mb_per_rank", static_cast<double>(plan.state_bytes()) / 1e6},
                      {"plan_gradient_mb_per_rank", static_cast<double>(plan.grad_bytes) / 1e6},
                      {"measured_gradient_peak_mb_per_rank", t.optimizer().peak_gradient_bytes() / 1e6},
                      {"zero2_reduce", c.train.zero2_reduce},
                      {"gradient_mb_per_rank_after_step", t.optimizer().gradient_bytes() / 1e6},
                      {"split_data", d / total},
                      {"split_forward_backward", fb / total},
                      {"split_optimizer_and_communication", op / total},
                      {"collective_host_time_share", comm_s / secs},
                      {"optimizer_state_mb_per_rank", t.optimizer().state_bytes() / 1e6},
                      {"buckets_reduced_during_backward", t.optimizer().buckets_launched_during_backward()},
                      {"buckets", t.optimizer().buckets() * (warmup + kMemorySteps + steps + 3)}};
  if (control.rank() == 0) {
    std::printf("%-8s W=%d ZeRO-%d ckpt %-7s | step memory per rank above the state: estimate %.1f MB, measured "
                "%.1f MB (estimate/measured %.3f) | gradients: plan %.1f MB, held at peak %.1f MB\n",
                name.c_str(), comm.size(), c.train.zero_stage, c.train.activation_checkpointing.c_str(),
                step_estimate / 1e6, step_peak / 1e6, step_estimate / std::max(step_peak, 1.0),
                static_cast<double>(plan.grad_bytes) / 1e6, t.optimizer().peak_gradient_bytes() / 1e6);
    std::printf("%-8s W=%d %-22s | %lld params | %9.0f tokens/s (%.0f per rank)%s | peak mem %.2f GB | split: data "
                "%.1f%%, fwd+bwd %.1f%%, optimizer+comm %.1f%% | collectives %.1f%% of step time | optimizer+EMA "
                "%.2f MB per rank\n",
                name.c_str(), comm.size(), rt.device_name().c_str(),
                static_cast<long long>(t.model()->parameter_count()), tps, tps / comm.size(),
                rt.device.is_cuda() ? fmt::format(" | MFU {:.1f}% (model FLOPs)", 100 * mfu).c_str() : "",
                j["peak_memory_gb"].get<double>(), 100 * d / total, 100 * fb / total, 100 * op / total,
                100 * comm_s / secs, t.optimizer().state_bytes() / 1e6);
    std::fflush(stdout);
  }
  return j;
}

// Makes a fresh folder under the system's temp folder on rank 0 and gives its name to every rank.
std::string shared_temp_dir(const Runtime& rt) {
  std::string dir;
  if (rt.is_root()) {
    dir = (std::filesystem::temp_directory_path() / "sedd-bench-train.XXXXXX").string();
    if (!mkdtemp(dir.data())) dir.clear();
  }
  int n = static_cast<int>(dir.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  dir.resize(static_cast<size_t>(n));
  MPI_Bcast(dir.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  return dir;
}

// An option given under two names (--device and --run.device): either, or both alike.
void merge_alias(const tools::OptionTable& opts, const char* alias, const std::string& alias_value, const char* key,
                 std::string& value) {
  if (!opts.given.count(alias)) return;
  SEDD_CHECK_OPTION(!opts.given.count(key) || value == alias_value, "--{} {} and --{} {} disagree; give one of them",
                    alias, alias_value, key, value);
  value = alias_value;
}

struct Shape {
  const char* name;
  int64_t hidden, heads, blocks, len, batch;
};

// Without --config: the shape's model size, length and batch (per rank, times the ranks), where
// the command line does not set them; every other option as given.
TrainingConfig shaped(TrainingConfig c, const tools::OptionTable& opts, const Shape& s, int world) {
  auto keep = [&](const char* key) { return opts.given.count(key) > 0; };
  if (!keep("model.hidden_size")) c.model.hidden_size = s.hidden;
  if (!keep("model.n_heads")) c.model.n_heads = s.heads;
  if (!keep("model.n_blocks")) c.model.n_blocks = s.blocks;
  if (!keep("model.cond_dim")) c.model.cond_dim = 128;
  if (!keep("data.seq_len")) c.data.seq_len = s.len;
  if (!keep("train.batch_size")) c.train.batch_size = s.batch * world;  // the same work per rank at every W
  if (!keep("train.warmup")) c.train.warmup = 0;
  if (!keep("train.bucket_elems")) c.train.bucket_elems = 1 << 20;
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  const char* tool = "sedd-bench-train";
  TrainingConfig cfg;
  tools::OptionTable opts;
  tools::build_train_options(opts, cfg);
  int64_t steps = 20, warmup = 3, vocab = 0;
  std::string json_out, shape_list = "tiny,small", device_alias, precision_alias, json_alias;
  std::string ckpt_list, stage_list;
  opts.desc.add_options()("bench.steps", po::value(&steps)->default_value(20), "measured steps")(
      "bench.warmup", po::value(&warmup)->default_value(3), "steps before measuring")(
      "bench.vocab", po::value(&vocab)->default_value(0),
      "vocabulary of the random data when data.train names no shards (0: 257 without --config, 50257 with)")(
      "bench.shapes", po::value(&shape_list)->default_value(shape_list),
      "without --config: the shapes measured (tiny: 2x128, L 128, 16 per rank; small: 6x384, L 256, 8 per rank); "
      "model.*, data.seq_len and train.batch_size given on the command line replace the shape's")(
      "bench.json", po::value(&json_out), "write the figures as JSON")(
      "bench.checkpointing", po::value(&ckpt_list),
      "train.activation_checkpointing settings measured for every shape (comma list, e.g. none,blocks: each "
      "setting's tokens/s against none's of the same shape; default: train.activation_checkpointing)")(
      "bench.zero_stages", po::value(&stage_list),
      "train.zero_stage values measured for every shape (comma list; default: train.zero_stage; 2:micro_batch and "
      "2:step also set train.zero2_reduce)")(
      "device", po::value(&device_alias), "the same as --run.device (without --config the default is cpu)")(
      "precision", po::value(&precision_alias), "the same as --train.precision (fp32 | bf16 | fp64)")(
      "json", po::value(&json_alias), "the same as --bench.json");
  // Every allocation of 64 KiB or more by mmap: freed tensors leave the resident set at once, so the
  // CPU step memory (VmHWM) follows the live tensors (the timed steps pay the page faults too).
  mallopt(M_MMAP_THRESHOLD, 64 * 1024);
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");  // MPI first: usage errors are printed by rank 0 only
  try {
    tools::parse_train_options(opts, argc, argv);
  } catch (const std::exception& e) {
    if (rt.is_root()) std::fprintf(stderr, "%s: error: %s (see --help)\n", tool, e.what());
    return tools::kExitBadInput;
  }
  if (opts.help) {
    if (rt.is_root()) std::cout << opts.desc << "\n";
    return tools::kExitOk;
  }
  const bool have_config = !opts.config_file.empty();
  std::vector<std::pair<std::string, TrainingConfig>> runs;  // name, config
  bool random_data = false;
  if (int rc = tools::agree(rt, tool, [&] {
        merge_alias(opts, "device", device_alias, "run.device", cfg.run.device);
        merge_alias(opts, "precision", precision_alias, "train.precision", cfg.train.precision);
        merge_alias(opts, "json", json_alias, "bench.json", json_out);
        if (!have_config && !opts.given.count("run.device") && !opts.given.count("device")) cfg.run.device = "cpu";
        SEDD_CHECK_OPTION(steps > 0 && warmup >= 0, "--bench.steps must be > 0 and --bench.warmup >= 0");
        SEDD_CHECK_OPTION(vocab >= 0, "--bench.vocab must be >= 0 (0: the default), got {}", vocab);
        if (rt.is_root()) tools::check_writable(json_out, "--bench.json");
        // Shards named on the command line must exist; a config's data.train (e.g. a corpus this
        // machine lacks) falls back to random tokens over bench.vocab, which is printed.
        random_data = cfg.data.train.empty();
        if (opts.command_line.count("data.train")) {
          expand_shard_list(cfg.data.train);
        } else if (!random_data) {
          try {
            expand_shard_list(cfg.data.train);
          } catch (const InputError&) {
            random_data = true;
          }
        }
        if (vocab == 0) vocab = have_config ? 50257 : 257;
        if (have_config) {
          runs.emplace_back(cfg.model.summary().substr(0, 12), cfg);
        } else {
          std::stringstream ss(shape_list);
          const Shape known[] = {
              {"tiny", 128, 4, 2, 128, 16}, {"small", 384, 6, 6, 256, 8}, {"long", 256, 4, 4, 1024, 4}};
          for (std::string name; std::getline(ss, name, ',');) {
            auto s = std::find_if(std::begin(known), std::end(known), [&](const Shape& k) { return name == k.name; });
            SEDD_CHECK_OPTION(s != std::end(known), "--bench.shapes: unknown shape '{}' (tiny, small, long)", name);
            runs.emplace_back(name, shaped(cfg, opts, *s, rt.world));
          }
          SEDD_CHECK_OPTION(!runs.empty(), "--bench.shapes names no shape");
        }
        // Every shape under every ZeRO stage and checkpointing setting asked for.
        std::vector<std::string> settings, stages;
        std::stringstream cs(ckpt_list.empty() ? cfg.train.activation_checkpointing : ckpt_list), zs(stage_list.empty() ? std::to_string(cfg.train.zero_stage) : stage_list);
        for (std::string v; std::getline(cs, v, ',');) settings.push_back(v);
        for (std::string v; std::getline(zs, v, ',');) stages.push_back(v);
        SEDD_CHECK_OPTION(!settings.empty() && !stages.empty(), "--bench.checkpointing and --bench.zero_stages need values");
        std::vector<std::pair<std::string, TrainingConfig>> expanded;
        for (const auto& [name, c] : runs)
          for (const auto& stage : stages)
            for (const auto& setting : settings) {
              TrainingConfig v = c;
              v.train.activation_checkpointing = setting;
              // "2:micro_batch" / "2:step": stage 2 with that train.zero2_reduce.
              const auto colon = stage.find(':');
              try {
                v.train.zero_stage = std::stoi(stage.substr(0, colon));
              } catch (const std::exception&) {
                throw OptionError("--bench.zero_stages: '" + stage + "' is not a number");
              }
              if (colon != std::string::npos) v.train.zero2_reduce = stage.substr(colon + 1);
              expanded.emplace_back(name + "/z" + stage + "/" + setting, v);
            }
        runs = std::move(expanded);
        for (const auto& [name, c] : runs) {
          TrainingConfig checked = c;
          if (random_data) checked.data.train = "(random tokens)";
          tools::validate_settings(checked, rt.world);
        }
        rt.select_device(cfg.run.device);
      });
      rc >= 0)
    return rc;
  ControlPlane control;
  std::unique_ptr<Communicator> comm =
      rt.device.is_cuda() ? make_nccl_communicator(rt.device.index()) : make_mpi_communicator();
  // A fresh folder for the random data and the runs, removed at the end.
  const std::string dir = shared_temp_dir(rt);
  if (dir.empty()) {
    if (rt.is_root()) tools::print_error(tool, "cannot create a folder under the temp folder", 0);
    return tools::kExitFailure;
  }
  nlohmann::json results = nlohmann::json::array();
  try {
    if (random_data) {
      if (rt.is_root()) {
        write_shard(dir + "/data.h5", torch::randint(vocab - 1, {4000000}), vocab, vocab - 1, "byte");
        std::printf("data: 4M random tokens over a vocabulary of %lld (data.train %s)\n",
                    static_cast<long long>(vocab),
                    cfg.data.train.empty() ? "not given" : ("'" + cfg.data.train + "' names no shards here").c_str());
      }
      control.barrier("benchmark data");
    }
    for (auto& [name, c] : runs) {
      if (random_data) c.data.train = dir + "/data.h5";
      c.data.valid.clear();
      std::string folder = name;
      std::replace(folder.begin(), folder.end(), '/', '_');
      std::replace(folder.begin(), folder.end(), ':', '_');
      c.run.dir = dir + "/" + folder;
      auto j = measure(name, c, rt, *comm, control, steps, warmup);
      j["data"] = random_data ? "random" : c.data.train;
      results.push_back(j);
    }
  } catch (const std::exception& e) {
    if (rt.is_root()) std::filesystem::remove_all(dir);
    return tools::end_job(rt, tool, e);
  }
  // The throughput cost of checkpointing: each setting's tokens/s against "none" of the same shape
  // and stage, measured in this run.
  if (rt.is_root())
    for (const auto& base : results) {
      if (base["activation_checkpointing"] != "none") continue;
      const std::string stem = base["name"].get<std::string>().substr(0, base["name"].get<std::string>().rfind('/'));
      for (const auto& other : results) {
        const std::string n = other["name"].get<std::string>();
        if (other["activation_checkpointing"] == "none" || n.substr(0, n.rfind('/')) != stem) continue;
        std::printf("%s: checkpointing %s runs at %.3f x the tokens/s of none (%.1f%% more time per step); step "
                    "memory %.1f MB vs %.1f MB measured\n",
                    stem.c_str(), other["activation_checkpointing"].get<std::string>().c_str(),
                    other["tokens_per_s"].get<double>() / base["tokens_per_s"].get<double>(),
                    100 * (base["tokens_per_s"].get<double>() / other["tokens_per_s"].get<double>() - 1),
                    other["step_peak_measured_mb"].get<double>(), base["step_peak_measured_mb"].get<double>());
      }
    }
  // ZeRO stages against the first stage measured for the same shape and checkpointing setting, in
  // this run: per-rank gradient bytes (after a step and at the peak), optimizer bytes, tokens/s.
  if (rt.is_root())
    for (auto& other : results) {
      const std::string n = other["name"].get<std::string>(), shape = n.substr(0, n.find('/'));
      const auto base = std::find_if(results.begin(), results.end(), [&](const nlohmann::json& r) {
        const std::string m = r["name"].get<std::string>();
        return m.substr(0, m.find('/')) == shape && r["activation_checkpointing"] == other["activation_checkpointing"];
      });
      if (&*base == &other) continue;
      auto ratio = [&](const char* key) { return other[key].get<double>() / (*base)[key].get<double>(); };
      other["zero_vs_first_stage"] = {
          {"tokens_per_s", ratio("tokens_per_s")},
          {"gradient_mb_per_rank_after_step", ratio("gradient_mb_per_rank_after_step")},
          {"gradient_mb_per_rank_peak", ratio("measured_gradient_peak_mb_per_rank")},
          {"optimizer_state_mb_per_rank", ratio("optimizer_state_mb_per_rank")}};
      std::printf("%s vs %s: tokens/s x%.3f | gradient bytes per rank after a step %.2f MB (x%.3f), peak %.2f MB "
                  "(x%.3f) | optimizer+EMA %.2f MB (x%.3f)\n",
                  n.c_str(), (*base)["name"].get<std::string>().c_str(), ratio("tokens_per_s"),
                  other["gradient_mb_per_rank_after_step"].get<double>(), ratio("gradient_mb_per_rank_after_step"),
                  other["measured_gradient_peak_mb_per_rank"].get<double>(),
                  ratio("measured_gradient_peak_mb_per_rank"), other["optimizer_state_mb_per_rank"].get<double>(),
                  ratio("optimizer_state_mb_per_rank"));
    }
  int rc = tools::kExitOk;
  if (rt.is_root()) {
    if (!json_out.empty()) {
      std::ofstream f(json_out);
      f << results.dump(2) << "\n";
      f.close();
      if (f.fail()) tools::print_error(tool, json_out + ": writing failed (disk full?)", 0), rc = tools::kExitFailure;
    }
    std::filesystem::remove_all(dir);
  }
  return rc;
}
