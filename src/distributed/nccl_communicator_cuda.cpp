// NCCL backend of Communicator (built only when LibTorch has CUDA); see communicator.h.
//
// Blocking-looking collectives (all_reduce, broadcast) are queued on torch's current stream of the
// rank's GPU and return at once: later work on that stream sees their results, and the host never
// waits. The asynchronous ones run on a communication stream of their own (so gradient buckets are
// reduced while backward keeps the compute stream busy); wait() makes the compute stream wait on
// them, again without blocking the host. Every collective is handed to the watchdog with its CUDA
// event, and the watchdog polls ncclCommGetAsyncError: a peer that died or hangs aborts the
// communicator (ncclCommAbort) and the job instead of hanging it. All CUDA calls run on the rank's
// GPU: under a device guard on the caller's thread, and after setting the device on the watchdog's
// thread (which would otherwise create a context on GPU 0). barrier() is a host barrier over MPI.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <mpi.h>
#include <nccl.h>

#include <mutex>
#include <fmt/format.h>

#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "io/error.h"

namespace sedd {

namespace {

#define SEDD_NCCL(call, what)                                                                              \
  do {                                                                                                     \
    ncclResult_t rc_ = (call);                                                                             \
    if (rc_ != ncclSuccess && rc_ != ncclInProgress)                                                       \
      ::sedd::fail("rank {}: NCCL {} ({}) failed: {}", rank_, #call, what, ncclGetErrorString(rc_));         \
  } while (0)

#define SEDD_CUDA(call)                                                                                    \
  do {                                                                                                     \
    cudaError_t rc_ = (call);                                                                              \
    if (rc_ != cudaSuccess) ::sedd::fail("rank {}: {} failed: {}", rank_, #call, cudaGetErrorString(rc_)); \
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

// A CUDA event shared by the Work object and the watchdog entry; destroyed by whichever goes last,
// on whichever thread: both set the rank's device first (a thread without one would use GPU 0).
struct Event {
  cudaEvent_t e = nullptr;
  int device;
  explicit Event(int dev) : device(dev) {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaEventCreateWithFlags(&e, cudaEventDisableTiming);
  }
  ~Event() {
    if (!e) return;
    cudaSetDevice(device);
    cudaEventDestroy(e);
  }
  bool done() const {
    cudaSetDevice(device);
    return cudaEventQuery(e) == cudaSuccess;
  }
};

class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<Event> done, cudaStream_t compute, int device, std::vector<torch::Tensor> keep)
      : done_(std::move(done)), compute_(compute), device_(device), keep_(std::move(keep)) {}
  void wait() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    cudaStreamWaitEvent(compute_, done_->e, 0);  // the compute stream, not the host, waits
  }

 private:
  std::shared_ptr<Event> done_;
  cudaStream_t compute_;
  int device_;
  std::vector<torch::Tensor> keep_;  // buffers stay alive while the collective may use them
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(int device_index, Watchdog* dog) : device_(device_index), dog_(dog) {
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm_dup(MPI_COMM_WORLD, &host_comm_);
    MPI_Comm_set_errhandler(host_comm_, MPI_ERRORS_RETURN);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    ncclUniqueId id;
    if (rank_ == 0) SEDD_NCCL(ncclGetUniqueId(&id), "unique id");
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
    {
      auto w = dog_ ? dog_->watch("ncclCommInitRank (creating the NCCL communicator)") : Watchdog::Watch();
      SEDD_NCCL(ncclCommInitRank(&comm_, size_, id, rank_), "init");
    }
    SEDD_CUDA(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    state_->comm = comm_;
    if (dog_) {  // the watchdog thread reaches the communicator only through the shared state
      auto state = state_;
      const int device = device_;
      dog_->add_error_check([state, device]() -> std::string {
        std::lock_guard<std::mutex> lock(state->mu);
        if (state->gone) return "";
        cudaSetDevice(device);
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(state->comm, &async);
        if (async == ncclSuccess || async == ncclInProgress) return "";
        return fmt::format("NCCL reported an asynchronous error: {}", ncclGetErrorString(async));
      });
      dog_->add_abort_hook([state, device] {
        std::lock_guard<std::mutex> lock(state->mu);
        cudaSetDevice(device);
        if (!state->gone) ncclCommAbort(state->comm), state->gone = true;
      });
    }
  }
  ~NcclCommunicator() override {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    if (comm_stream_) cudaStreamSynchronize(comm_stream_), cudaStreamDestroy(comm_stream_);
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!state_->gone && comm_) ncclCommDestroy(comm_);
    state_->gone = true;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && host_comm_ != MPI_COMM_NULL) MPI_Comm_free(&host_comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }
  torch::Device device() const override { return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(device_)); }

  void all_reduce(torch::Tensor& t, ReduceOp op) override {
    check_collective_tensor(t, device(), "NCCL", "all_reduce");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    cudaStream_t s = compute_stream();
    SEDD_NCCL(ncclAllReduce(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), nccl_op(op), comm_, s), "all_reduce");
    watch_on(s, "all_reduce");
  }

  void broadcast(torch::Tensor& t, int root) override {
    check_collective_tensor(t, device(), "NCCL", "broadcast");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    cudaStream_t s = compute_stream();
    SEDD_NCCL(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.numel(), nccl_type(t), root, comm_, s), "broadcast");
    watch_on(s, "broadcast");
  }

  void barrier() override {
    auto w = dog_ ? dog_->watch("barrier (NCCL communicator, host barrier over MPI)") : Watchdog::Watch();
    const int rc = MPI_Barrier(host_comm_);
    SEDD_CHECK(rc == MPI_SUCCESS, "rank {}: MPI_Barrier (NCCL communicator's barrier) failed with MPI error {}", rank_,
               rc);
  }

  // `full` on this device splits into `size_` chunks shaped like `mine`.
  void check_chunked(const torch::Tensor& full, const torch::Tensor& mine, const std::string& what) const {
    check_collective_tensor(full, device(), "NCCL", what);
    check_collective_tensor(mine, device(), "NCCL", what);
    SEDD_CHECK(full.numel() == mine.numel() * size_ && full.scalar_type() == mine.scalar_type(),
               "NCCL communicator: {}: {} elements do not split into {} chunks of {}", what, full.numel(), size_,
               mine.numel());
  }

  std::unique_ptr<Work> reduce_scatter_async(const torch::Tensor& full, torch::Tensor& mine, ReduceOp op,
                                             const std::string& what) override {
    check_chunked(full, mine, what);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    begin_on_comm_stream({full, mine});
    SEDD_NCCL(ncclReduceScatter(full.data_ptr(), mine.data_ptr(), mine.numel(), nccl_type(full), nccl_op(op), comm_,
                                comm_stream_),
              what);
    return finish_on_comm_stream(what, {full, mine});
  }

  std::unique_ptr<Work> all_gather_async(const torch::Tensor& mine, torch::Tensor& full,
                                         const std::string& what) override {
    check_chunked(full, mine, what);
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    begin_on_comm_stream({full, mine});
    // In place when mine is full's chunk `rank` (NCCL allows exactly that aliasing).
    SEDD_NCCL(ncclAllGather(mine.data_ptr(), full.data_ptr(), mine.numel(), nccl_type(full), comm_, comm_stream_),
              what);
    return finish_on_comm_stream(what, {full, mine});
  }

 private:
  cudaStream_t compute_stream() const {
    return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_)).stream();
  }
  // The communication stream starts after everything queued so far on the compute stream.
  void begin_on_comm_stream(const std::vector<torch::Tensor>& tensors) {
    auto ready = std::make_shared<Event>(device_);
    SEDD_CUDA(cudaEventRecord(ready->e, compute_stream()));
    SEDD_CUDA(cudaStreamWaitEvent(comm_stream_, ready->e, 0));
    auto comm = c10::cuda::getStreamFromExternal(comm_stream_, static_cast<c10::DeviceIndex>(device_));
    for (const auto& t : tensors)  // the caching allocator must not reuse them while NCCL runs
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), comm);
  }
  std::unique_ptr<Work> finish_on_comm_stream(const std::string& what, std::vector<torch::Tensor> keep) {
    auto done = watch_on(comm_stream_, what);
    return std::make_unique<NcclWork>(done, compute_stream(), device_, std::move(keep));
  }
  // Records an event after the collective and lets the watchdog follow it to completion.
  std::shared_ptr<Event> watch_on(cudaStream_t s, const std::string& what) {
    auto ev = std::make_shared<Event>(device_);
    SEDD_CUDA(cudaEventRecord(ev->e, s));
    if (dog_) dog_->track(fmt::format("{} (NCCL, cuda:{})", what, device_), [ev] { return ev->done(); });
    return ev;
  }

  int device_ = 0;
  Watchdog* dog_;
  int rank_ = 0, size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t comm_stream_ = nullptr;
  MPI_Comm host_comm_ = MPI_COMM_NULL;  // barrier(): the ranks meet on the host
  struct State {
    std::mutex mu;
    ncclComm_t comm = nullptr;
    bool gone = false;  // destroyed or aborted
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(int device_index, Watchdog* watchdog) {
  SEDD_CHECK(torch::cuda::is_available(), "NCCL communicator: no CUDA device is visible");
  return std::make_unique<NcclCommunicator>(device_index, watchdog);
}

bool nccl_available() { return torch::cuda::is_available(); }

}  // namespace sedd
