// sedd-train: distributed SEDD training under mpirun/srun. Exit codes (tool_common.h, the same on
// every rank): 0 done, 1 a failure while running, 2 bad options, settings or input data (a refused
// resume, a run folder in use), 3 stopped by a pre-emption signal after a checkpoint (requeue).
#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>

#include "data/shard.h"
#include "distributed/communicator.h"
#include "distributed/control.h"
#include "distributed/runtime.h"
#include "distributed/watchdog.h"
#include "io/error.h"
#include "tool_common.h"
#include "train/memory_plan.h"
#include "train/trainer.h"
#include "train_options.h"

using namespace sedd;

namespace {
std::atomic<int> g_stop{0};
extern "C" void on_stop_signal(int sig) { g_stop.store(sig); }
// sedd-train --plan: the memory plan per rank for plan.world_size ranks (default: the launched
// ones), without training and without touching run.dir. The vocabulary comes from plan.vocab or
// data.train's first shard.
int print_memory_plan(Runtime& rt, TrainingConfig& cfg) {
  try {
    const int world = cfg.plan.world_size > 0 ? cfg.plan.world_size : rt.world;
    if (cfg.plan.vocab > 0) {
      cfg.model.tokens = cfg.plan.vocab;
    } else {
      std::vector<std::string> shards;
      try {
        shards = expand_shard_list(cfg.data.train);
      } catch (const std::exception&) {
      }
      if (shards.empty())
        throw OptionError(fmt::format("--plan: no shard matches data.train '{}' to read the vocabulary from; "
                                      "set --plan.vocab (e.g. 50257 for GPT-2 tokens)",
                                      cfg.data.train));
      cfg.model.tokens = read_shard_info(shards.front()).vocab_size;
    }
    cfg.model.length = cfg.data.seq_len;
    tools::validate_settings(cfg, world);
    const bool gpu = cfg.run.device == "cuda" ||
                     (cfg.run.device == "auto" && (torch::cuda::is_available() || cfg.train.precision == "bf16"));
    const double device_memory =
        gpu && torch::cuda::is_available() ? device_memory_bytes(torch::Device(torch::kCUDA, 0)) : 0;
    MemoryPlan plan = plan_memory(cfg, world, gpu, device_memory);
    if (rt.is_root()) std::printf("%s[plan] json %s\n", plan.text().c_str(), plan.json().c_str());
    return tools::kExitOk;
  } catch (const OptionError& e) {
    if (rt.is_root()) std::fprintf(stderr, "sedd-train: error: %s\n", e.what());
    return tools::kExitBadInput;
  } catch (const std::exception& e) {
    if (rt.is_root()) std::fprintf(stderr, "sedd-train: error: %s\n", e.what());
    return tools::kExitBadInput;
  }
}
}  // namespace

int main(int argc, char** argv) {
  TrainingConfig cfg;
  tools::OptionTable opts;
  tools::build_train_options(opts, cfg);
  // MPI first: a usage error is then printed by rank 0 only, not once per rank.
  Runtime* rt = &Runtime::init(&argc, &argv, "cpu");
  try {
    tools::parse_train_options(opts, argc, argv);
  } catch (const std::exception& e) {
    if (rt->is_root()) std::fprintf(stderr, "sedd-train: error: %s\n", e.what());
    return tools::kExitBadInput;
  }
  if (opts.help) {
    if (rt->is_root()) std::cout << opts.desc << "\n";
    return tools::kExitOk;
  }
  if (opts.plan) return print_memory_plan(*rt, cfg);
  // Every rank sees the same config, so every rank exits here alike.
  if (int rc = tools::agree(*rt, "sedd-train", [&] {
        tools::validate_settings(cfg, rt->world);
        rt->select_device(cfg.run.device);
      });
      rc >= 0)
    return rc;
  // SIGUSR1 is SLURM's pre-emption warning (--signal=B:USR1@s); SIGTERM comes with scancel/requeue.
  for (int sig : {SIGTERM, SIGUSR1, SIGINT}) std::signal(sig, on_stop_signal);

  std::string settings = tools::resolved_settings(opts);
  if (rt->is_root()) std::printf("[train] resolved settings:\n%s", settings.c_str());
  try {
    // Collectives that hang end the job (dist.timeout_s); control decisions over MPI, tensors over
    // NCCL on GPUs and MPI on CPUs.
    Watchdog watchdog(cfg.dist.timeout_s, rt->rank, rt->host);
    ControlPlane control(&watchdog);
    std::unique_ptr<Communicator> comm = rt->device.is_cuda() ? make_nccl_communicator(rt->device.index(), &watchdog)
                                                              : make_mpi_communicator(&watchdog);
    Trainer trainer(cfg, *rt, *comm, control, settings);
    TrainOutcome out = trainer.run(&g_stop);
    control.barrier("end of training");
    if (out == TrainOutcome::Preempted) {
      if (rt->is_root()) std::printf("[train] stopped by signal %d after saving; exit 3 (requeue)\n", g_stop.load());
      return tools::kExitPreempted;
    }
    if (rt->is_root()) std::printf("[train] done: %lld steps\n", static_cast<long long>(trainer.step()));
  } catch (const OptionError& e) {  // every rank throws it alike: no rank waits, all exit 2
    if (rt->is_root()) std::fprintf(stderr, "sedd-train: error: %s\n", e.what());
    return tools::kExitBadInput;
  } catch (const std::exception& e) {
    return tools::end_job(*rt, "sedd-train", e);  // ends every rank within seconds
  }
  return tools::kExitOk;
}
