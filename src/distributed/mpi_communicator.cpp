// MPI backend of Communicator; see communicator.h.
#include <mpi.h>

#include <fmt/format.h>

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

void check_mpi(int rc, int rank, const std::string& what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("rank {}: {} failed: {}", rank, what, std::string(msg, len));
}

class MpiWork final : public Work {
 public:
  MpiWork(MPI_Request req, torch::Tensor recv, double scale, int rank, std::string what, Watchdog* dog)
      : req_(req), recv_(std::move(recv)), scale_(scale), rank_(rank), what_(std::move(what)), dog_(dog) {}
  ~MpiWork() override {
    if (req_ != MPI_REQUEST_NULL) MPI_Wait(&req_, MPI_STATUS_IGNORE);
  }
  void wait() override {
    // MPI progresses non-blocking collectives inside MPI calls: the wait is where a hang shows.
    auto w = dog_ ? dog_->watch(what_ + " (MPI)") : Watchdog::Watch();
    check_mpi(MPI_Wait(&req_, MPI_STATUS_IGNORE), rank_, what_);
    if (scale_ != 1.0 && recv_.numel() > 0) recv_.mul_(scale_);
  }

 private:
  MPI_Request req_;
  torch::Tensor recv_;
  double scale_;
  int rank_;
  std::string what_;
  Watchdog* dog_;
};

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(Watchdog* dog) : dog_(dog) {
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }
  torch::Device device() const override { return torch::kCPU; }

  void all_reduce(torch::Tensor& t, ReduceOp op) override {
    check_collective_tensor(t, torch::kCPU, "MPI", "all_reduce");
    auto w = watch("all_reduce");
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t), mpi_op(op), comm_),
              rank_, "MPI_Allreduce");
    if (op == ReduceOp::Mean) t.div_(size_);
  }

  void broadcast(torch::Tensor& t, int root) override {
    check_collective_tensor(t, torch::kCPU, "MPI", "broadcast");
    auto w = watch("broadcast");
    check_mpi(MPI_Bcast(t.data_ptr(), static_cast<int>(t.numel()), mpi_type(t), root, comm_), rank_, "MPI_Bcast");
  }

  void barrier() override {
    auto w = watch("barrier");
    check_mpi(MPI_Barrier(comm_), rank_, "MPI_Barrier");
  }

  std::unique_ptr<Work> reduce_scatter_async(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op,
                                             const std::string& what) override {
    check_collective_tensor(full, torch::kCPU, "MPI", what);
    check_collective_tensor(mine, torch::kCPU, "MPI", what);
    SEDD_CHECK(full.numel() == mine.numel() * size_ && full.scalar_type() == mine.scalar_type(),
               "MPI communicator: {}: {} elements do not split into {} chunks of {}", what, full.numel(), size_,
               mine.numel());
    MPI_Request req;
    check_mpi(MPI_Ireduce_scatter_block(full.data_ptr(), mine.data_ptr(), static_cast<int>(mine.numel()),
                                        mpi_type(full), mpi_op(op), comm_, &req),
              rank_, what);
    return std::make_unique<MpiWork>(req, mine, op == ReduceOp::Mean ? 1.0 / size_ : 1.0, rank_, what, dog_);
  }

  std::unique_ptr<Work> all_gather_async(const torch::Tensor& mine, torch::Tensor& full,
                                         const std::string& what) override {
    check_collective_tensor(full, torch::kCPU, "MPI", what);
    check_collective_tensor(mine, torch::kCPU, "MPI", what);
    const int64_t c = mine.numel();
    SEDD_CHECK(full.numel() == c * size_ && full.scalar_type() == mine.scalar_type(),
               "MPI communicator: {}: {} elements do not split into {} chunks of {}", what, full.numel(), size_, c);
    // In place when `mine` is this rank's chunk of `full`.
    const void* send = mine.data_ptr() == static_cast<char*>(full.data_ptr()) + rank_ * c * full.element_size()
                           ? MPI_IN_PLACE
                           : mine.data_ptr();
    MPI_Request req;
    check_mpi(MPI_Iallgather(send, static_cast<int>(c), mpi_type(mine), full.data_ptr(), static_cast<int>(c),
                             mpi_type(full), comm_, &req),
              rank_, what);
    return std::make_unique<MpiWork>(req, full, 1.0, rank_, what, dog_);
  }

 private:
  Watchdog::Watch watch(const char* what) {
    return dog_ ? dog_->watch(fmt::format("{} (MPI, data plane)", what)) : Watchdog::Watch();
  }
  MPI_Comm comm_ = MPI_COMM_NULL;
  Watchdog* dog_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(Watchdog* watchdog) {
  return std::make_unique<MpiCommunicator>(watchdog);
}

#ifndef SEDD_HAVE_CUDA
std::unique_ptr<Communicator> make_nccl_communicator(int, Watchdog*) {
  fail("this build has no CUDA/NCCL (LibTorch without CUDA); use the MPI backend");
}
bool nccl_available() { return false; }
#endif

}  // namespace sedd
