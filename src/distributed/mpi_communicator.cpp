// MPI backend of Communicator; see communicator.h.
#include <mpi.h>

#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "io/error.h"

namespace sedd {

namespace {

MPI_Datatype mpi_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return MPI_FLOAT;
    case torch::kDouble: return MPI_DOUBLE;
    case torch::kInt32: return MPI_INT32_T;
    case torch::kInt64: return MPI_INT64_T;
    case torch::kUInt8: return MPI_UINT8_T;
    default: fail("MPI communicator: unsupported dtype {}", c10::toString(t.scalar_type()));
  }
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::Max ? MPI_MAX : MPI_SUM; }

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  fail("rank {}: {} failed: {}", rank, what, std::string(msg, len));
}

void check_cpu_contiguous(const torch::Tensor& t, const char* what) {
  SEDD_CHECK(t.device().is_cpu(), "MPI communicator: {} needs a CPU tensor, got {}", what, t.device().str());
  SEDD_CHECK(t.is_contiguous(), "MPI communicator: {} needs a contiguous tensor", what);
}

class MpiWork final : public Work {
 public:
  MpiWork(MPI_Request req, torch::Tensor recv, double scale) : req_(req), recv_(std::move(recv)), scale_(scale) {}
  ~MpiWork() override {
    if (req_ != MPI_REQUEST_NULL) MPI_Wait(&req_, MPI_STATUS_IGNORE);
  }
  void wait() override {
    check_mpi(MPI_Wait(&req_, MPI_STATUS_IGNORE), "MPI_Ireduce_scatter");
    if (scale_ != 1.0 && recv_.numel() > 0) recv_.mul_(scale_);
  }

 private:
  MPI_Request req_;
  torch::Tensor recv_;
  double scale_;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator() {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(torch::Tensor& t, ReduceOp op) override {
    check_cpu_contiguous(t, "all_reduce");
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t),
                            mpi_op(op), MPI_COMM_WORLD),
              "MPI_Allreduce");
    if (op == ReduceOp::Mean) t.div_(size_);
  }

  void reduce_scatter(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op) override {
    check_cpu_contiguous(full, "reduce_scatter");
    check_cpu_contiguous(mine, "reduce_scatter");
    SEDD_CHECK(full.scalar_type() == mine.scalar_type(), "reduce_scatter: dtypes differ");
    const int64_t n = full.numel();
    std::vector<int> counts(size_);
    for (int r = 0; r < size_; ++r) counts[r] = static_cast<int>(shard_range(n, size_, r).size());
    SEDD_CHECK(mine.numel() == counts[rank_], "reduce_scatter: rank {} expects {} elements, buffer has {}",
               rank_, counts[rank_], mine.numel());
    check_mpi(MPI_Reduce_scatter(full.data_ptr(), mine.data_ptr(), counts.data(), mpi_type(full),
                                 mpi_op(op), MPI_COMM_WORLD),
              "MPI_Reduce_scatter");
    if (op == ReduceOp::Mean) mine.div_(size_);
  }

  std::unique_ptr<Work> reduce_scatter_range(const torch::Tensor& full, int64_t begin, int64_t end,
                                             torch::Tensor& mine, ReduceOp op) override {
    check_cpu_contiguous(full, "reduce_scatter_range");
    const int64_t n = full.numel();
    std::vector<int> counts(size_);
    int64_t my_offset = 0;
    for (int r = 0; r < size_; ++r) {
      auto s = shard_range(n, size_, r);
      int64_t lo = std::max(begin, s.begin), hi = std::min(end, s.end);
      counts[r] = static_cast<int>(std::max<int64_t>(0, hi - lo));
      if (r == rank_) my_offset = std::max<int64_t>(0, lo - s.begin);
    }
    torch::Tensor recv = mine.narrow(0, std::min<int64_t>(my_offset, mine.numel()), counts[rank_]);
    MPI_Request req;
    check_mpi(MPI_Ireduce_scatter(static_cast<char*>(full.data_ptr()) + begin * full.element_size(), recv.data_ptr(), counts.data(),
                                  mpi_type(full), mpi_op(op), MPI_COMM_WORLD, &req),
              "MPI_Ireduce_scatter");
    return std::make_unique<MpiWork>(req, recv, op == ReduceOp::Mean ? 1.0 / size_ : 1.0);
  }

  void all_gather(const torch::Tensor& mine, torch::Tensor& full) override {
    check_cpu_contiguous(full, "all_gather");
    check_cpu_contiguous(mine, "all_gather");
    const int64_t n = full.numel();
    std::vector<int> counts(size_), displs(size_);
    for (int r = 0; r < size_; ++r) {
      auto range = shard_range(n, size_, r);
      counts[r] = static_cast<int>(range.size());
      displs[r] = static_cast<int>(range.begin);
    }
    SEDD_CHECK(mine.numel() == counts[rank_], "all_gather: rank {} expects {} elements, buffer has {}",
               rank_, counts[rank_], mine.numel());
    check_mpi(MPI_Allgatherv(mine.data_ptr(), counts[rank_], mpi_type(mine), full.data_ptr(),
                             counts.data(), displs.data(), mpi_type(full), MPI_COMM_WORLD),
              "MPI_Allgatherv");
  }

  void broadcast(torch::Tensor& t, int root) override {
    check_cpu_contiguous(t, "broadcast");
    check_mpi(MPI_Bcast(t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t), root, MPI_COMM_WORLD),
              "MPI_Bcast");
  }

  void barrier() override { check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }

 private:
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator() { return std::make_unique<MpiCommunicator>(); }

#ifndef SEDD_HAVE_CUDA
std::unique_ptr<Communicator> make_nccl_communicator(int, double) {
  fail("this build has no CUDA/NCCL (LibTorch without CUDA); use the MPI backend");
}
bool nccl_available() { return false; }
#endif

}  // namespace sedd
