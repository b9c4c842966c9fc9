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
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

using namespace sedd;
using namespace sedd::test;

// The check every collective applies: a tensor on the wrong device is one error naming the
// collective, both devices and where such values belong.
TEST(CollectiveChecks, WrongDeviceIsAClearError) {
  auto host = torch::ones({3});
  std::string msg = error_of([&] {
    check_collective_tensor(host, torch::Device(torch::kCUDA, 0), "NCCL", "reduce_scatter of gradient bucket 2 of 5");
  });
  EXPECT_NE(msg.find("NCCL communicator: reduce_scatter of gradient bucket 2 of 5 got a tensor on cpu"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("works on cuda:0"), std::string::npos) << msg;
  EXPECT_NE(msg.find("control plane"), std::string::npos) << msg;
  msg = error_of([&] { check_collective_tensor(host.t().expand({3, 3}), torch::kCPU, "MPI", "all_reduce"); });
  EXPECT_NE(msg.find("contiguous"), std::string::npos) << msg;
  EXPECT_EQ(error_of([&] { check_collective_tensor(host, torch::kCPU, "MPI", "all_reduce"); }), "<no error>");
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

// device = cuda needs a GPU of its own for every rank of the node (ranks sharing one make NCCL
// fail): more local ranks than visible GPUs is refused with both counts; auto falls back to the CPU.
TEST(CollectiveChecks, CudaNeedsAGpuForEveryLocalRank) {
  EXPECT_EQ(resolve_device("cuda", 3, 4, 8), torch::Device(torch::kCUDA, 3));
  EXPECT_EQ(resolve_device("cuda", 0, 1, 1), torch::Device(torch::kCUDA, 0));
  EXPECT_EQ(resolve_device("auto", 1, 2, 2), torch::Device(torch::kCUDA, 1));
  EXPECT_EQ(resolve_device("cpu", 1, 2, 2), torch::Device(torch::kCPU));
  std::string msg = error_of([] { resolve_device("cuda", 1, 2, 1); });
  EXPECT_NE(msg.find("2 ranks on this node but 1 visible GPU"), std::string::npos) << msg;
  EXPECT_NE(msg.find("at most 1 rank per node"), std::string::npos) << msg;
  msg = error_of([] { resolve_device("cuda", 0, 3, 2); });
  EXPECT_NE(msg.find("3 ranks on this node but 2 visible GPUs"), std::string::npos) << msg;
  try {
    resolve_device("cuda", 0, 3, 2);
  } catch (const OptionError&) {  // a setting to change: executables exit 2 on every rank
  } catch (...) {
    ADD_FAILURE() << "not an OptionError";
  }
  EXPECT_NE(error_of([] { resolve_device("cuda", 0, 1, 0); }).find("no GPU is visible"), std::string::npos);
  EXPECT_EQ(resolve_device("auto", 1, 3, 2), torch::Device(torch::kCPU));
  EXPECT_EQ(resolve_device("auto", 0, 1, 0), torch::Device(torch::kCPU));
  EXPECT_NE(error_of([] { resolve_device("gpu", 0, 1, 1); }).find("device must be cpu, cuda or auto, got 'gpu'"),
            std::string::npos);
}

// When the abort hooks hang (ncclCommAbort behind a stream that never drains), the watchdog's
// deadline still ends the process, with a line saying so.
TEST(CollectiveChecks, WatchdogEndsTheProcessWhenAbortingHangs) {
  if (std::getenv("SEDD_WATCHDOG_HOOK_CHILD")) {
    Watchdog dog(0.5, 3, "testhost", 0.05, /*abort_deadline_s=*/1.0);
    dog.add_abort_hook([] { std::this_thread::sleep_for(std::chrono::hours(1)); });
    auto w = dog.watch("reduce_scatter of gradient bucket 1 of 2");
    std::this_thread::sleep_for(std::chrono::seconds(30));
    return;
  }
  std::string out;
  auto t0 = std::chrono::steady_clock::now();
  int rc = run(fmt::format("SEDD_WATCHDOG_HOOK_CHILD=1 {} --gtest_filter=CollectiveChecks.WatchdogEndsTheProcessWhenAbortingHangs",
                           "/proc/" + std::to_string(::getpid()) + "/exe"),
               &out);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(rc, 124) << out;
  EXPECT_LT(secs, 15.0) << out;
  EXPECT_NE(out.find("watchdog: collective 'reduce_scatter of gradient bucket 1 of 2' made no progress"),
            std::string::npos)
      << out;
  EXPECT_NE(out.find("[rank 3 on testhost] watchdog: aborting did not finish within 1 s; exiting"), std::string::npos)
      << out;
}

// On a GPU: the rank's device is the current device of the main thread after select_device, and
// with two GPUs a rank on GPU 1 that runs NCCL collectives under the watchdog (whose thread polls
// their events and the communicator) never creates a CUDA context on GPU 0.
TEST(NcclWatchdogGpu, EveryThreadUsesTheRanksGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
#ifdef SEDD_HAVE_CUDA
  if (std::getenv("SEDD_DEVICE_CHILD")) {
    auto& rt = test::child_runtime("cpu");
    rt.local_rank = 1;  // as the second of two ranks on this node
    rt.local_world = 2;
    rt.select_device("cuda");
    ASSERT_EQ(rt.device, torch::Device(torch::kCUDA, 1));
    int current = -1;
    cudaGetDevice(&current);
    EXPECT_EQ(current, 1) << "select_device did not make the rank's GPU current";
    {
      Watchdog dog(30, rt.rank, rt.host, 0.01);
      auto nccl = make_nccl_communicator(1, &dog);
      auto t = torch::ones({1 << 20}, torch::TensorOptions().device(rt.device));
      for (int i = 0; i < 20; ++i) nccl->all_reduce(t, ReduceOp::Sum);
      std::this_thread::sleep_for(std::chrono::milliseconds(300));  // the watchdog polls events, async errors
      EXPECT_EQ(t[0].item<float>(), 1.0f);
      nccl->barrier();
    }
    EXPECT_FALSE(c10::cuda::hasPrimaryContext(0)) << "a CUDA context was created on GPU 0";
    std::cout << "no CUDA context on GPU 0\n";
    return;
  }
  if (torch::cuda::device_count() < 2)
    GTEST_SKIP() << "one GPU: no other GPU for a context to land on by mistake (needs 2 GPUs)";
  std::string out;
  int rc = run(fmt::format("env -u OMPI_COMM_WORLD_RANK -u OMPI_COMM_WORLD_SIZE SEDD_DEVICE_CHILD=1 {} "
                           "--gtest_filter=NcclWatchdogGpu.EveryThreadUsesTheRanksGpu",
                           "/proc/" + std::to_string(::getpid()) + "/exe"),
               &out);
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("no CUDA context on GPU 0"), std::string::npos) << out;
#endif
}

// On a GPU: a collective stuck behind device work that never finishes (a host function that
// blocks the stream) is aborted by the watchdog, which names it and ends the job.
TEST(NcclWatchdogGpu, StalledNcclCollectiveEndsTheJob) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (auto why = gpu_children_unavailable(); !why.empty()) GTEST_SKIP() << why;
#ifdef SEDD_HAVE_CUDA
  if (std::getenv("SEDD_WATCHDOG_CHILD")) {
    auto& rt = test::child_runtime("cuda");
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
