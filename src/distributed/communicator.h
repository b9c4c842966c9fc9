// Communicator: the data plane. Collectives on tensors of the rank's device, behind one interface
// with an MPI backend (CPU tensors) and an NCCL backend (CUDA tensors on the rank's GPU).
// Everything above it is backend-blind. Counts and datatypes come from the tensors; a tensor on
// another device is an error naming the collective and both devices (host values that ranks must
// agree on go through ControlPlane instead).
#pragma once
#include <torch/torch.h>

#include <memory>
#include <string>

#include "distributed/watchdog.h"

namespace sedd {

enum class ReduceOp { Sum, Mean, Max };

// A collective in flight: wait() returns once its result is usable (NCCL: on the caller's stream).
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  virtual torch::Device device() const = 0;

  // In place on every rank.
  virtual void all_reduce(torch::Tensor& t, ReduceOp op = ReduceOp::Sum) = 0;
  virtual void broadcast(torch::Tensor& t, int root = 0) = 0;

  // Equal-chunk collectives (what bucketed ZeRO uses): `full` holds size() chunks of
  // mine.numel() elements; rank r receives the reduction of chunk r (reduce-scatter) or
  // contributes chunk r (all-gather; in place when mine is full's chunk r). `what` names the
  // collective in errors and in the watchdog's message. Every rank must start the same
  // collectives in the same order; buffers stay untouched until wait().
  virtual std::unique_ptr<Work> reduce_scatter_async(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op,
                                                     const std::string& what) = 0;
  virtual std::unique_ptr<Work> all_gather_async(const torch::Tensor& mine, torch::Tensor& full,
                                                 const std::string& what) = 0;

  // Any-size forms: rank r receives / contributes elements shard_range(n, size, r) of `full` (n
  // elements, n need not divide by the world size); padded onto the equal-chunk forms.
  void reduce_scatter(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op = ReduceOp::Sum);
  void all_gather(const torch::Tensor& mine, torch::Tensor& full);
  // Returns once every rank has called it: a host barrier (over MPI) for both backends. Device work
  // queued before it may still be running; NCCL collectives alone would not hold the host back.
  virtual void barrier() = 0;
};

// MPI on MPI_COMM_WORLD (CPU tensors; float32/float64/int32/int64/uint8). This MPI is not assumed
// CUDA-aware: CUDA tensors are refused.
std::unique_ptr<Communicator> make_mpi_communicator(Watchdog* watchdog = nullptr);
// NCCL on the GPU `device_index` (CUDA tensors on it); the unique id is made on rank 0 and
// broadcast over MPI. Throws when the build has no CUDA. The watchdog (may be null) watches every
// collective and aborts the communicator on a timeout or an asynchronous NCCL error.
std::unique_ptr<Communicator> make_nccl_communicator(int device_index, Watchdog* watchdog = nullptr);
bool nccl_available();

// The check both backends apply to every tensor they are handed: on `expected` and contiguous,
// else one error naming the backend, the collective and both devices.
void check_collective_tensor(const torch::Tensor& t, torch::Device expected, const char* backend,
                             const std::string& what);

}  // namespace sedd
