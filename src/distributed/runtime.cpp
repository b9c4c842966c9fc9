// Runtime; see runtime.h.
#include "distributed/runtime.h"

#include <unistd.h>

#include <cstdio>
#include <memory>
#include <thread>

#include "io/error.h"

#ifdef SEDD_HAVE_CUDA
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
  MPI_Comm_free(&local);
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  rt.host = host;

  // Never oversubscribe cores: each local rank gets an equal share (at least 1).
  int cores = static_cast<int>(std::thread::hardware_concurrency());
  if (const char* env = std::getenv("SEDD_CORES")) cores = std::max(1, std::atoi(env));
  rt.threads = std::max(1, cores / std::max(1, rt.local_world));
  torch::set_num_threads(rt.threads);
  try {
    torch::set_num_interop_threads(1);
  } catch (...) {  // already set by an earlier torch call; harmless
  }

  rt.select_device(device);
  return rt;
}

void Runtime::select_device(const std::string& name) {
  SEDD_CHECK(name == "cpu" || name == "cuda" || name == "auto", "device must be cpu, cuda or auto, got '{}'", name);
  if (name == "cuda") SEDD_CHECK(torch::cuda::is_available(), "device 'cuda' requested but no GPU is visible");
  device = torch::kCPU;
  if (name == "cuda" || (name == "auto" && torch::cuda::is_available())) {
    int n = static_cast<int>(torch::cuda::device_count());
    device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % n));
  }
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
