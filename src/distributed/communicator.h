// Communicator: the collectives training needs, behind one interface with an MPI backend (CPU
// tensors) and an NCCL backend (CUDA tensors). Everything above it is backend-blind.
// Counts and datatypes always come from the tensors themselves.
#pragma once
#include <torch/torch.h>
#include <memory>
#include <string>

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

  // In place on every rank.
  virtual void all_reduce(torch::Tensor& t, ReduceOp op = ReduceOp::Sum) = 0;
  // `full` (n elements, same n on every rank) is reduced; rank r receives elements
  // shard_range(n, size, r) into `mine`. n need not divide by the world size.
  virtual void reduce_scatter(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op = ReduceOp::Sum) = 0;
  // Asynchronous reduce-scatter of the elements [begin, end) of `full` (n elements): rank r
  // receives the part of that range inside shard_range(n, size, r), written into `mine` (its
  // whole shard) at the matching offset. Lets gradient buckets be reduced while backward still
  // runs. Every rank must start the same ranges in the same order; buffers stay untouched until
  // wait().
  virtual std::unique_ptr<Work> reduce_scatter_range(const torch::Tensor& full, int64_t begin, int64_t end,
                                                     torch::Tensor& mine, ReduceOp op) = 0;
  // Each rank contributes shard_range(n, size, r) of `full` (its `mine`); everyone gets all n.
  virtual void all_gather(const torch::Tensor& mine, torch::Tensor& full) = 0;
  virtual void broadcast(torch::Tensor& t, int root = 0) = 0;
  virtual void barrier() = 0;
};

// MPI on MPI_COMM_WORLD (CPU tensors; float32/float64/int32/int64/uint8).
std::unique_ptr<Communicator> make_mpi_communicator();
// NCCL (CUDA tensors); the unique id is made on rank 0 and broadcast over MPI. Throws when the
// build has no CUDA. `timeout_s`: a collective that does not finish in time aborts the
// communicator and throws instead of hanging.
std::unique_ptr<Communicator> make_nccl_communicator(int device_index, double timeout_s = 300);
bool nccl_available();

}  // namespace sedd
