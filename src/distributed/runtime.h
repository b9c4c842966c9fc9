// Runtime: the process's place in the MPI job (rank, world size, local rank, device) and its
// CPU thread budget. Owns MPI_Init/MPI_Finalize. Executables create exactly one.
#pragma once
#include <torch/torch.h>
#include <mpi.h>
#include <string>

namespace sedd {

struct Runtime {
  int rank = 0;
  int world = 1;
  int local_rank = 0;
  int local_world = 1;
  int threads = 1;             // intra-op threads given to torch: affinity CPUs / ranks sharing them
  int cpus = 1;                // CPUs in this rank's affinity mask
  int cpu_sharers = 1;         // local ranks whose affinity overlaps this rank's (itself included)
  std::string threads_source;  // how `threads` was chosen, for the start-up line
  std::string host;
  torch::Device device = torch::kCPU;

  // Initialises MPI (or adopts an initialised one), sets torch's thread count, picks the
  // device with resolve_device() and makes it the calling thread's current CUDA device.
  static Runtime& init(int* argc, char*** argv, const std::string& device = "auto");
  // Picks the device again ("cpu", "cuda", "auto"), e.g. after the command line was parsed.
  void select_device(const std::string& device);
  static Runtime& get();  // after init
  bool is_root() const { return rank == 0; }
  std::string device_name() const;  // the GPU's name (cudaDeviceProp::name), or "cpu"
  bool mpi_thread_multiple = false; // MPI calls are allowed from any thread (the watchdog's)
  // Kills the whole job (every rank) with `message` printed once by the caller's rank.
  [[noreturn]] void abort(const std::string& message, int code = 1) const;
  ~Runtime();

 private:
  bool owns_mpi_ = false;
};

// The device `name` means for local rank `local_rank` of `local_world` ranks on a node with `gpus`
// visible GPUs: "cpu"; "cuda": GPU `local_rank`, refused (OptionError naming both counts) when the
// node has fewer GPUs than local ranks, since ranks sharing a GPU make NCCL fail; "auto": "cuda"
// when every local rank gets a GPU of its own, else "cpu".
torch::Device resolve_device(const std::string& name, int local_rank, int local_world, int gpus);

// Makes `device` the calling thread's current CUDA device (nothing for CPU devices). Every thread
// that calls CUDA must do this first: a thread without a current device works on GPU 0 and
// creates a context there (~0.5 GB) even when the rank's GPU is another.
void use_device_on_this_thread(const torch::Device& device);

// [begin, end) of the slice of n elements that rank r of w owns: chunks of ceil(n/w).
struct ShardRange {
  int64_t begin, end;
  int64_t size() const { return end - begin; }
};
ShardRange shard_range(int64_t n, int world, int rank);

}  // namespace sedd
