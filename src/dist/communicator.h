// Communicator: the collectives training needs, behind one interface with an MPI backend (CPU
// tensors) and an NCCL backend (CUDA tensors). Everything above it is backend-blind.
// Counts and datatypes always come from the tensors themselves.
#pragma once
#include <torch/torch.h>
#include <memory>
#include <string>

namespace sedd {

enum class ReduceOp { Sum, Mean, Max };

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
