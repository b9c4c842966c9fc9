// NCCL backend of Communicator (built only when LibTorch has CUDA); see communicator.h.
// Collectives run on torch's current CUDA stream. Every wait is watched: a peer that died or a
// collective that does not finish within the timeout aborts the communicator and throws, so a
// rank never hangs forever (the caller then MPI_Aborts the job).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <thread>

#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "io/error.h"

namespace sedd {

namespace {

#define SEDD_NCCL(call)                                                                              \
  do {                                                                                               \
    ncclResult_t rc_ = (call);                                                                       \
    if (rc_ != ncclSuccess && rc_ != ncclInProgress)                                                 \
      ::sedd::fail("rank {}: {} failed at {}:{}: {}", rank_, #call, __FILE__, __LINE__,              \
                   ncclGetErrorString(rc_));                                                         \
  } while (0)

#define SEDD_CUDA(call)                                                                              \
  do {                                                                                               \
    cudaError_t rc_ = (call);                                                                        \
    if (rc_ != cudaSuccess)                                                                          \
      ::sedd::fail("rank {}: {} failed at {}:{}: {}", rank_, #call, __FILE__, __LINE__,              \
                   cudaGetErrorString(rc_));                                                         \
  } while (0)

ncclDataType_t nccl_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return ncclFloat32;
    case torch::kDouble: return ncclFloat64;
    case torch::kBFloat16: return ncclBfloat16;
    case torch::kHalf: return ncclFloat16;
    case torch::kInt32: return ncclInt32;
    case torch::kInt64: return ncclInt64;
    case torch::kUInt8: return ncclUint8;
    default: fail("NCCL communicator: unsupported dtype {}", c10::toString(t.scalar_type()));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return ncclSum;
    case ReduceOp::Mean: return ncclAvg;
    case ReduceOp::Max: return ncclMax;
  }
  return ncclSum;
}

class NcclCommunicator;

class NcclWork final : public Work {
 public:
  NcclWork(NcclCommunicator& owner, cudaEvent_t done) : owner_(owner), done_(done) {}
  ~NcclWork() override;
  void wait() override;

 private:
  NcclCommunicator& owner_;
  cudaEvent_t done_;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(int device_index, double timeout_s) : device_(device_index), timeout_s_(timeout_s) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    ncclUniqueId id;
    if (rank_ == 0) SEDD_NCCL(ncclGetUniqueId(&id));
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    SEDD_NCCL(ncclCommInitRank(&comm_, size_, id, rank_));
    SEDD_CUDA(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
    SEDD_CUDA(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
  }
  ~NcclCommunicator() override {
    if (done_) cudaEventDestroy(done_);
    if (comm_stream_) cudaStreamDestroy(comm_stream_);
    if (comm_) ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(torch::Tensor& t, ReduceOp op) override {
    check(t, "all_reduce");
    SEDD_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), nccl_op(op), comm_, stream()));
    wait("all_reduce");
  }

  void reduce_scatter(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op) override {
    check(full, "reduce_scatter");
    check(mine, "reduce_scatter");
    const int64_t n = full.numel(), chunk = (n + size_ - 1) / size_;
    // NCCL wants equal chunks: pad the input to chunk * size when n does not divide.
    torch::Tensor send = full;
    if (chunk * size_ != n) send = torch::cat({full, torch::zeros({chunk * size_ - n}, full.options())});
    torch::Tensor recv = mine.numel() == chunk ? mine : torch::empty({chunk}, full.options());
    SEDD_NCCL(ncclReduceScatter(send.data_ptr(), recv.data_ptr(), chunk, nccl_type(full), nccl_op(op), comm_,
                                stream()));
    if (recv.data_ptr() != mine.data_ptr()) mine.copy_(recv.narrow(0, 0, mine.numel()));
    wait("reduce_scatter");
  }

  // Bucketed reduction on a separate stream, so it runs while backward keeps the compute stream
  // busy: one grouped ncclReduce per rank whose shard meets the range.
  std::unique_ptr<Work> reduce_scatter_range(const torch::Tensor& full, int64_t begin, int64_t end,
                                             torch::Tensor& mine, ReduceOp op) override {
    check(full, "reduce_scatter_range");
    check(mine, "reduce_scatter_range");
    const int64_t n = full.numel(), elem = full.element_size();
    cudaEvent_t ready = nullptr, done = nullptr;
    SEDD_CUDA(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    SEDD_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    SEDD_CUDA(cudaEventRecord(ready, stream()));  // the gradients queued so far
    SEDD_CUDA(cudaStreamWaitEvent(comm_stream_, ready, 0));
    SEDD_NCCL(ncclGroupStart());
    for (int r = 0; r < size_; ++r) {
      auto s = shard_range(n, size_, r);
      int64_t lo = std::max(begin, s.begin), hi = std::min(end, s.end);
      if (hi <= lo) continue;
      void* recv = r == rank_ ? static_cast<void*>(static_cast<char*>(mine.data_ptr()) + (lo - s.begin) * elem) : nullptr;
      SEDD_NCCL(ncclReduce(static_cast<const char*>(full.data_ptr()) + lo * elem, recv, hi - lo, nccl_type(full),
                           nccl_op(op), r, comm_, comm_stream_));
    }
    SEDD_NCCL(ncclGroupEnd());
    SEDD_CUDA(cudaEventRecord(done, comm_stream_));
    cudaEventDestroy(ready);
    return std::make_unique<NcclWork>(*this, done);
  }

  void all_gather(const torch::Tensor& mine, torch::Tensor& full) override {
    check(full, "all_gather");
    check(mine, "all_gather");
    const int64_t n = full.numel(), chunk = (n + size_ - 1) / size_;
    torch::Tensor send = mine;
    if (mine.numel() != chunk) {
      send = torch::zeros({chunk}, mine.options());
      send.narrow(0, 0, mine.numel()).copy_(mine);
    }
    torch::Tensor recv = chunk * size_ == n ? full : torch::empty({chunk * size_}, full.options());
    SEDD_NCCL(ncclAllGather(send.data_ptr(), recv.data_ptr(), chunk, nccl_type(full), comm_, stream()));
    if (recv.data_ptr() != full.data_ptr()) full.copy_(recv.narrow(0, 0, n));
    wait("all_gather");
  }

  void broadcast(torch::Tensor& t, int root) override {
    check(t, "broadcast");
    SEDD_NCCL(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), root, comm_, stream()));
    wait("broadcast");
  }

  void barrier() override {
    torch::Tensor one = torch::ones({1}, torch::TensorOptions().device(torch::kCUDA, device_));
    all_reduce(one, ReduceOp::Sum);
  }

 private:
  cudaStream_t stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }
  void check(const torch::Tensor& t, const char* what) const {
    SEDD_CHECK(t.is_cuda() && t.get_device() == device_, "NCCL communicator: {} needs a tensor on cuda:{}",
               what, device_);
    SEDD_CHECK(t.is_contiguous(), "NCCL communicator: {} needs a contiguous tensor", what);
  }
  friend class NcclWork;
  // Waits for the collective with a watchdog: async NCCL errors and the timeout both abort.
  void wait(const char* what) {
    SEDD_CUDA(cudaEventRecord(done_, stream()));
    wait_event(done_, what);
  }
  void wait_event(cudaEvent_t event, const char* what) {
    auto start = std::chrono::steady_clock::now();
    for (;;) {
      cudaError_t q = cudaEventQuery(event);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) SEDD_CUDA(q);
      ncclResult_t async_rc = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async_rc);
      double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (async_rc != ncclSuccess || waited > timeout_s_) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        fail("rank {}: NCCL {} {} (communicator aborted)", rank_, what,
             async_rc != ncclSuccess ? std::string("failed: ") + ncclGetErrorString(async_rc)
                                     : fmt::format("did not finish within {} s", timeout_s_));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  int device_ = 0;
  double timeout_s_ = 300;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaEvent_t done_ = nullptr;
  cudaStream_t comm_stream_ = nullptr;
};

NcclWork::~NcclWork() {
  if (done_) cudaEventDestroy(done_);
}

void NcclWork::wait() {
  owner_.wait_event(done_, "reduce_scatter_range");
  cudaStreamWaitEvent(owner_.stream(), done_, 0);  // later work on the compute stream sees the result
}

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(int device_index, double timeout_s) {
  SEDD_CHECK(torch::cuda::is_available(), "NCCL communicator: no CUDA device is visible");
  return std::make_unique<NcclCommunicator>(device_index, timeout_s);
}

bool nccl_available() { return torch::cuda::is_available(); }

}  // namespace sedd
