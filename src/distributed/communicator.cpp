// Backend-independent parts of Communicator; see communicator.h.
#include "distributed/communicator.h"

#include "distributed/runtime.h"
#include "io/error.h"

namespace sedd {

void check_collective_tensor(const torch::Tensor& t, torch::Device expected, const char* backend,
                             const std::string& what) {
  SEDD_CHECK(t.defined(), "{} communicator: {} was handed an undefined tensor", backend, what);
  if (t.device() != expected) {
    std::string hint = expected.is_cpu()
                           ? "this MPI is not used CUDA-aware: device tensors go through the NCCL communicator"
                           : "NCCL reads device memory only: host values that ranks agree on go through the "
                             "control plane (MPI)";
    fail("{} communicator: {} got a tensor on {}, but this communicator works on {} ({})", backend, what,
         t.device().str(), expected.str(), hint);
  }
  SEDD_CHECK(t.is_contiguous(), "{} communicator: {} needs a contiguous tensor", backend, what);
}

void Communicator::reduce_scatter(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op) {
  const int W = size();
  const int64_t n = full.numel(), chunk = (n + W - 1) / W;
  auto range = shard_range(n, W, rank());
  SEDD_CHECK(mine.numel() == range.size(), "reduce_scatter: rank {} expects {} elements, buffer has {}", rank(),
             range.size(), mine.numel());
  torch::Tensor send = full;
  if (chunk * W != n) send = torch::cat({full.reshape({-1}), torch::zeros({chunk * W - n}, full.options())});
  torch::Tensor recv = torch::empty({chunk}, full.options());
  reduce_scatter_async(send, recv, op, "reduce_scatter")->wait();
  mine.copy_(recv.narrow(0, 0, mine.numel()));
}

void Communicator::all_gather(const torch::Tensor& mine, torch::Tensor& full) {
  const int W = size();
  const int64_t n = full.numel(), chunk = (n + W - 1) / W;
  auto range = shard_range(n, W, rank());
  SEDD_CHECK(mine.numel() == range.size(), "all_gather: rank {} expects {} elements, buffer has {}", rank(),
             range.size(), mine.numel());
  torch::Tensor send = torch::zeros({chunk}, mine.options());
  send.narrow(0, 0, mine.numel()).copy_(mine.reshape({-1}));
  torch::Tensor recv = torch::empty({chunk * W}, full.options());
  all_gather_async(send, recv, "all_gather")->wait();
  full.copy_(recv.narrow(0, 0, n).view(full.sizes()));
}

}  // namespace sedd
