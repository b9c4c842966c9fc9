// Single-process checks of the distributed layer: device checks of the collectives, and the
// watchdog against a stalled NCCL collective (GPU).
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <thread>
#include <unistd.h>

#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "distributed/watchdog.h"
#include "io/error.h"
#include "test_util.h"

#ifdef SEDD_HAVE_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

using namespace sedd;
using namespace sedd::test;

namespace {
std::string collective_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const sedd::Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

// The check every collective applies: a tensor on the wrong device is one error naming the
// collective, both devices and where such values belong.
TEST(CollectiveChecks, WrongDeviceIsAClearError) {
  auto host = torch::ones({3});
  std::string msg = collective_error_of([&] {
    check_collective_tensor(host, torch::Device(torch::kCUDA, 0), "NCCL", "reduce_scatter of gradient bucket 2 of 5");
  });
  EXPECT_NE(msg.find("NCCL communicator: reduce_scatter of gradient bucket 2 of 5 got a tensor on cpu"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("works on cuda:0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("control plane"), std::string::npos) << msg;
  msg = collective_error_of([&] { check_collective_tensor(host.t().expand({3, 3}), torch::kCPU, "MPI", "all_reduce"); });
  EXPECT_NE(msg.find("contiguous"), std::string::npos) << msg;
  EXPECT_EQ(collective_error_of([&] { check_collective_tensor(host, torch::kCPU, "MPI", "all_reduce"); }), "");
}

// The watchdog thread catches a collective that never completes even while the main thread is
// blocked waiting for it.
TEST(CollectiveChecks, WatchdogFiresOnAStuckEntryFromItsOwnThread) {
  if (std::getenv("SEDD_WATCHDOG_CHILD")) {
    Watchdog dog(1.0, 7, "testhost", 0.05);
    auto w = dog.watch("all_reduce (stop flag)");
    std::this_thread::sleep_for(std::chrono::seconds(30));  // the main thread "hangs"
    return;
  }
  std::string out;
  auto t0 = std::chrono::steady_clock::now();
  int rc = run(fmt::format("SEDD_WATCHDOG_CHILD=1 {} --gtest_filter=CollectiveChecks.WatchdogFiresOnAStuckEntryFromItsOwnThread",
                           "/proc/" + std::to_string(::getpid()) + "/exe"),
               &out);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(rc, 124) << out;
  EXPECT_LT(secs, 15.0);
  EXPECT_NE(out.find("[rank 7 on testhost] watchdog: collective 'all_reduce (stop flag)' made no progress"),
            std::string::npos)
      << out;
  // Finished work is dropped, not reported.
  Watchdog dog(0.2, 0, "h", 0.02);
  bool done = false;
  dog.track("quick", [&] { return done; });
  done = true;
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
}

// On a GPU: a collective stuck behind device work that never finishes (a host function that
// blocks the stream) is aborted by the watchdog, which names it and ends the job.
TEST(NcclWatchdogGpu, StalledNcclCollectiveEndsTheJob) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
#ifdef SEDD_HAVE_CUDA
  if (std::getenv("SEDD_WATCHDOG_CHILD")) {
    int argc = 1;
    char arg0[] = "child";
    char* args[] = {arg0, nullptr};
    char** argv = args;
    auto& rt = Runtime::init(&argc, &argv, "cuda");
    Watchdog dog(3.0, rt.rank, rt.host);
    auto nccl = make_nccl_communicator(rt.device.index(), &dog);
    auto t = torch::ones({16}, torch::TensorOptions().device(rt.device));
    cudaLaunchHostFunc(c10::cuda::getCurrentCUDAStream().stream(),
                       [](void*) { std::this_thread::sleep_for(std::chrono::hours(1)); }, nullptr);
    nccl->all_reduce(t, ReduceOp::Sum);
    (void)t.sum().item<float>();  // blocks: the stream never gets past the host function
    ADD_FAILURE() << "the stalled collective completed";
    return;
  }
  std::string out;
  auto t0 = std::chrono::steady_clock::now();
  int rc = run(fmt::format("env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE SEDD_WATCHDOG_CHILD=1 {} "
                           "--gtest_filter=NcclWatchdogGpu.StalledNcclCollectiveEndsTheJob",
                           "/proc/" + std::to_string(::getpid()) + "/exe"),
               &out);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "stalled NCCL all_reduce: job ended after " << secs << " s with exit " << rc << "\n";
  EXPECT_NE(rc, 0) << out;
  EXPECT_LT(secs, 60.0);
  EXPECT_NE(out.find("watchdog: collective 'all_reduce (NCCL, cuda:"), std::string::npos) << out;
#endif
}
