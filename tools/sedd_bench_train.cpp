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

nlohmann::json measure(const std::string& name, TrainingConfig c, Runtime& rt, Communicator& comm,
                       ControlPlane& control, int64_t steps, int64_t warmup) {
  c.train.steps = warmup + steps + 3;
  c.train.log_every = 1 << 30;
  c.train.eval_every = 0;
  c.train.ckpt_every = -1;  // no checkpoints: pure step time
  Trainer t(c, rt, comm, control, "");
  std::atomic<int> stop{0};
  t.run(&stop, warmup);
  if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
  double comm0 = t.optimizer().comm_seconds();
  auto t0 = std::chrono::steady_clock::now();
  t.run(&stop, warmup + steps);
  if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double comm_s = t.optimizer().comm_seconds() - comm0;
  // A few more steps with the device synchronised after each phase, for the time split.
  t.enable_phase_timing();
  auto before = t.phase_times();
  t.run(&stop, warmup + steps + 3);
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
                      {"split_data", d / total},
                      {"split_forward_backward", fb / total},
                      {"split_optimizer_and_communication", op / total},
                      {"collective_host_time_share", comm_s / secs},
                      {"optimizer_state_mb_per_rank", t.optimizer().state_bytes() / 1e6},
                      {"buckets_reduced_during_backward", t.optimizer().buckets_launched_during_backward()},
                      {"buckets", t.optimizer().buckets() * (warmup + steps + 3)}};
  if (control.rank() == 0) {
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
  opts.desc.add_options()("bench.steps", po::value(&steps)->default_value(20), "measured steps")(
      "bench.warmup", po::value(&warmup)->default_value(3), "steps before measuring")(
      "bench.vocab", po::value(&vocab)->default_value(0),
      "vocabulary of the random data when data.train names no shards (0: 257 without --config, 50257 with)")(
      "bench.shapes", po::value(&shape_list)->default_value(shape_list),
      "without --config: the shapes measured (tiny: 2x128, L 128, 16 per rank; small: 6x384, L 256, 8 per rank); "
      "model.*, data.seq_len and train.batch_size given on the command line replace the shape's")(
      "bench.json", po::value(&json_out), "write the figures as JSON")(
      "device", po::value(&device_alias), "the same as --run.device (without --config the default is cpu)")(
      "precision", po::value(&precision_alias), "the same as --train.precision (fp32 | bf16 | fp64)")(
      "json", po::value(&json_alias), "the same as --bench.json");
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
          const Shape known[] = {{"tiny", 128, 4, 2, 128, 16}, {"small", 384, 6, 6, 256, 8}};
          for (std::string name; std::getline(ss, name, ',');) {
            auto s = std::find_if(std::begin(known), std::end(known), [&](const Shape& k) { return name == k.name; });
            SEDD_CHECK_OPTION(s != std::end(known), "--bench.shapes: unknown shape '{}' (tiny, small)", name);
            runs.emplace_back(name, shaped(cfg, opts, *s, rt.world));
          }
          SEDD_CHECK_OPTION(!runs.empty(), "--bench.shapes names no shape");
        }
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
      c.run.dir = dir + "/" + name;
      auto j = measure(name, c, rt, *comm, control, steps, warmup);
      j["data"] = random_data ? "random" : c.data.train;
      results.push_back(j);
    }
  } catch (const std::exception& e) {
    if (rt.is_root()) std::filesystem::remove_all(dir);
    return tools::end_job(rt, tool, e);
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
