// Benchmark (not a test), under mpirun: training throughput of the real trainer.
//   mpirun -np W sedd-bench-train [--config FILE] [--bench.steps N] [--bench.json OUT] [--section.key value ...]
// With --config (any sedd-train config, e.g. configs/sedd-small.ini --run.device cuda), that run is
// measured; its data is used when data.train names existing shards, else random tokens over
// bench.vocab. Without --config, the two CPU shapes "tiny" (2x128, L 128) and "small" (6x384, L 256)
// are measured, with the same work per rank at every W. Prints tokens/s, MFU (GPU), peak memory,
// the time split (data, forward+backward, optimizer incl. communication, host time inside
// collectives) and optimizer+EMA bytes per rank; --bench.json writes the same figures.
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "distributed/communicator.h"
#include "distributed/control.h"
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
  if (rt.device.is_cuda()) torch::cuda::synchronize();
  double comm0 = t.optimizer().comm_seconds();
  auto t0 = std::chrono::steady_clock::now();
  t.run(&stop, warmup + steps);
  if (rt.device.is_cuda()) torch::cuda::synchronize();
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
  if (rt.device.is_cuda()) {
    peak = c.train.peak_tflops > 0 ? c.train.peak_tflops * 1e12 : gpu_peak_bf16_flops(rt.device_name());
    mfu = model_flops_utilisation(tps, t.model()->flops_per_token(c.data.seq_len), comm.size(), peak);
  }
  nlohmann::json j = {{"name", name},
                      {"device", rt.device_name()},
                      {"ranks", comm.size()},
                      {"precision", c.train.precision},
                      {"parameters", t.model()->parameter_count()},
                      {"batch", c.train.batch_size},
                      {"seq_len", c.data.seq_len},
                      {"tokens_per_s", tps},
                      {"tokens_per_s_per_rank", tps / comm.size()},
                      {"mfu", mfu},
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
                rt.device.is_cuda() ? fmt::format(" | MFU {:.1f}%", 100 * mfu).c_str() : "",
                j["peak_memory_gb"].get<double>(), 100 * d / total, 100 * fb / total, 100 * op / total,
                100 * comm_s / secs, t.optimizer().state_bytes() / 1e6);
    std::fflush(stdout);
  }
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  TrainingConfig cfg;
  tools::OptionTable opts;
  tools::build_train_options(opts, cfg);
  int64_t steps = 20, warmup = 3, vocab = 50257;
  std::string json_out;
  opts.desc.add_options()("bench.steps", po::value(&steps)->default_value(20), "measured steps")(
      "bench.warmup", po::value(&warmup)->default_value(3), "steps before measuring")(
      "bench.vocab", po::value(&vocab)->default_value(50257), "vocabulary of the random data (no data.train)")(
      "bench.json", po::value(&json_out), "write the figures as JSON");
  bool have_config = false;
  for (int i = 1; i < argc; ++i) have_config |= std::string(argv[i]) == "--config";
  try {
    tools::parse_train_options(opts, argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "sedd-bench-train: error: %s\n", e.what());
    return 2;
  }
  if (opts.help) {
    std::cout << opts.desc << "\n";
    return 0;
  }
  Runtime& rt = Runtime::init(&argc, &argv, have_config ? cfg.run.device : "cpu");
  ControlPlane control;
  std::unique_ptr<Communicator> comm =
      rt.device.is_cuda() ? make_nccl_communicator(rt.device.index()) : make_mpi_communicator();
  const auto pid = static_cast<int64_t>(control.max(rt.is_root() ? static_cast<double>(::getpid()) : 0.0, "pid"));
  std::string dir = "/tmp/sedd-bench-train-" + std::to_string(pid);
  auto random_data = [&](int64_t v) {
    if (rt.is_root()) {
      std::filesystem::create_directories(dir);
      write_shard(dir + "/data.h5", torch::randint(v - 1, {4000000}), v, v - 1, "byte");
    }
    control.barrier("benchmark data");
    return dir + "/data.h5";
  };
  nlohmann::json results = nlohmann::json::array();
  try {
    if (have_config) {
      bool have_data = false;
      try {
        have_data = !cfg.data.train.empty() && !expand_shard_list(cfg.data.train).empty();
      } catch (const std::exception&) {
      }
      if (!have_data) cfg.data.train = random_data(vocab);
      cfg.data.valid.clear();
      cfg.run.dir = dir + "/run";
      results.push_back(measure(cfg.model.summary().substr(0, 12), cfg, rt, *comm, control, steps, warmup));
    } else {
      std::string data = random_data(257);
      struct Shape {
        const char* name;
        int64_t hidden, heads, blocks, len, batch;
      };
      for (Shape s : {Shape{"tiny", 128, 4, 2, 128, 16}, Shape{"small", 384, 6, 6, 256, 8}}) {
        TrainingConfig c;
        c.run.dir = dir + "/" + s.name;
        c.run.device = "cpu";
        c.data.train = data;
        c.data.seq_len = s.len;
        c.model.hidden_size = s.hidden;
        c.model.n_heads = s.heads;
        c.model.n_blocks = s.blocks;
        c.model.cond_dim = 128;
        c.train.batch_size = s.batch * rt.world;  // the same work per rank at every W
        c.train.warmup = 0;
        c.train.bucket_elems = 1 << 20;
        c.train.fused_loss = cfg.train.fused_loss;
        results.push_back(measure(s.name, c, rt, *comm, control, steps, warmup));
      }
    }
  } catch (const std::exception& e) {
    rt.abort(std::string("sedd-bench-train: ") + e.what());
  }
  if (rt.is_root()) {
    if (!json_out.empty()) std::ofstream(json_out) << results.dump(2) << "\n";
    std::filesystem::remove_all(dir);
  }
  return 0;
}
