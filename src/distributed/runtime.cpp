// Runtime; see runtime.h.
#include "distributed/runtime.h"

#include <sched.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "io/error.h"

#ifdef SEDD_HAVE_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif

namespace sedd {

namespace {
std::unique_ptr<Runtime> g_runtime;
}

Runtime& Runtime::init(int* argc, char*** argv, const std::string& device) {
  if (g_runtime) return *g_runtime;
  g_runtime.reset(new Runtime());
  Runtime& rt = *g_runtime;
  int initialised = 0;
  MPI_Initialized(&initialised);
  if (!initialised) {
    int provided = 0;
    // The main thread makes the MPI calls; the watchdog thread may call MPI_Abort, which needs
    // MPI_THREAD_MULTIPLE (without it the watchdog exits the process instead).
    MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided);
    rt.owns_mpi_ = true;
  }
  int level = 0;
  MPI_Query_thread(&level);
  rt.mpi_thread_multiple = level == MPI_THREAD_MULTIPLE;
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &rt.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &rt.world);
  MPI_Comm local;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rt.rank, MPI_INFO_NULL, &local);
  MPI_Comm_rank(local, &rt.local_rank);
  MPI_Comm_size(local, &rt.local_world);

  // Never oversubscribe cores. A rank may run on the CPUs of its affinity mask (mpirun and srun
  // bind ranks to cores or sockets; taskset and cgroups narrow it too); those CPUs are shared with
  // the local ranks whose masks overlap it, and each gets an equal share (at least 1).
  // SEDD_CORES overrides the CPU count, shared by all local ranks.
  cpu_set_t mine;
  CPU_ZERO(&mine);
  if (sched_getaffinity(0, sizeof mine, &mine) != 0)
    for (int c = 0; c < static_cast<int>(std::thread::hardware_concurrency()) && c < CPU_SETSIZE; ++c) CPU_SET(c, &mine);
  std::vector<cpu_set_t> masks(static_cast<size_t>(rt.local_world));
  MPI_Allgather(&mine, sizeof mine, MPI_BYTE, masks.data(), sizeof mine, MPI_BYTE, local);
  MPI_Comm_free(&local);
  rt.cpus = CPU_COUNT(&mine);
  rt.cpu_sharers = 0;
  for (auto& other : masks) {
    cpu_set_t both;
    CPU_AND(&both, &mine, &other);
    if (CPU_COUNT(&both) > 0) rt.cpu_sharers++;
  }
  if (const char* env = std::getenv("SEDD_CORES")) {
    const int cores = std::max(1, std::atoi(env));
    rt.threads = std::max(1, cores / std::max(1, rt.local_world));
    rt.threads_source = fmt::format("SEDD_CORES={} over {} local rank(s)", cores, rt.local_world);
  } else {
    rt.threads = std::max(1, rt.cpus / std::max(1, rt.cpu_sharers));
    rt.threads_source = fmt::format("{} CPU(s) in this rank's affinity, shared by {} local rank(s)", rt.cpus, rt.cpu_sharers);
  }
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  rt.host = host;
  torch::set_num_threads(rt.threads);
  try {
    torch::set_num_interop_threads(1);
  } catch (...) {  // already set by an earlier torch call; harmless
  }

  rt.select_device(device);
  return rt;
}

torch::Device resolve_device(const std::string& name, int local_rank, int local_world, int gpus) {
  if (name != "cpu" && name != "cuda" && name != "auto")
    throw OptionError(fmt::format("device must be cpu, cuda or auto, got '{}'", name));
  const bool enough = gpus > 0 && local_world <= gpus;
  if (name == "cuda" && gpus == 0) throw OptionError("device 'cuda' requested but no GPU is visible");
  if (name == "cuda" && !enough)
    throw OptionError(fmt::format(
        "device 'cuda': {} ranks on this node but {} visible GPU{}; NCCL needs a GPU of its own for every rank: start "
        "at most {} rank{} per node, or use device cpu",
        local_world, gpus, gpus == 1 ? "" : "s", gpus, gpus == 1 ? "" : "s"));
  if (name == "cpu" || !enough) return torch::kCPU;
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank));
}

void use_device_on_this_thread(const torch::Device& device) {
#ifdef SEDD_HAVE_CUDA
  if (device.is_cuda()) c10::cuda::set_device(device.index());
#else
  (void)device;
#endif
}

void Runtime::select_device(const std::string& name) {
  // Asking for the count creates no CUDA context; only the chosen GPU gets one (set below).
  const int gpus = name == "cpu" ? 0 : static_cast<int>(torch::cuda::device_count());
  device = resolve_device(name, local_rank, local_world, gpus);
  use_device_on_this_thread(device);
}

std::string Runtime::device_name() const {
#ifdef SEDD_HAVE_CUDA
  if (device.is_cuda()) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device.index()) == cudaSuccess) return prop.name;
  }
#endif
  return device.str();
}

Runtime& Runtime::get() {
  SEDD_CHECK(g_runtime != nullptr, "Runtime::get() before Runtime::init()");
  return *g_runtime;
}

void Runtime::abort(const std::string& message, int code) const {
  std::fprintf(stderr, "[rank %d on %s] error: %s\n", rank, host.c_str(), message.c_str());
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] honest
}

Runtime::~Runtime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_mpi_ && !finalized) MPI_Finalize();
}

ShardRange shard_range(int64_t n, int world, int rank) {
  int64_t chunk = (n + world - 1) / world;
  int64_t b = std::min<int64_t>(n, chunk * rank);
  int64_t e = std::min<int64_t>(n, b + chunk);
  return {b, e};
}

}  // namespace sedd
