// sedd-train: distributed SEDD training under mpirun/srun. Exit codes (tool_common.h, the same on
// every rank): 0 done, 1 a failure while running, 2 bad options, settings or input data (a refused
// resume, a run folder in use), 3 stopped by a pre-emption signal after a checkpoint (requeue).
#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>

#include "distributed/communicator.h"
#include "distributed/control.h"
#include "distributed/runtime.h"
#include "distributed/watchdog.h"
#include "io/error.h"
#include "tool_common.h"
#include "train/trainer.h"
#include "train_options.h"

using namespace sedd;

namespace {
std::atomic<int> g_stop{0};
extern "C" void on_stop_signal(int sig) { g_stop.store(sig); }
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
