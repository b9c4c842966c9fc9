// Multi-rank tests of the MPI communicator, run under mpirun with 2 and 3 ranks.
#include <gtest/gtest.h>

#include "distributed/communicator.h"
#include "distributed/runtime.h"
#include "distributed/zero.h"
#include <thread>

using namespace sedd;

namespace {
Communicator& comm() {
  static auto c = make_mpi_communicator();
  return *c;
}
}  // namespace

TEST(MpiCollectives, AllReduceSumMeanMax) {
  const int r = comm().rank(), w = comm().size();
  if (w < 2) GTEST_SKIP() << "multi-rank test: run under mpirun with at least 2 ranks";
  for (auto dtype : {torch::kFloat, torch::kDouble, torch::kLong}) {
    auto t = torch::arange(7, dtype) * (r + 1);
    comm().all_reduce(t, ReduceOp::Sum);
    EXPECT_TRUE(torch::equal(t, torch::arange(7, dtype) * (w * (w + 1) / 2))) << c10::toString(dtype);
    auto m = torch::full({5}, r, dtype);
    comm().all_reduce(m, ReduceOp::Max);
    EXPECT_TRUE(torch::equal(m, torch::full({5}, w - 1, dtype)));
  }
  auto mean = torch::full({3}, static_cast<double>(r), torch::kDouble);
  comm().all_reduce(mean, ReduceOp::Mean);
  EXPECT_DOUBLE_EQ(mean[0].item<double>(), (w - 1) / 2.0);
}

TEST(MpiCollectives, ReduceScatterAnySize) {
  const int r = comm().rank(), w = comm().size();
  for (int64_t n : {1, 2, 5, 7, 12, 13, 100, 1001}) {
    auto full = torch::arange(n, torch::kDouble) * (r + 1) + r;
    auto range = shard_range(n, w, r);
    auto mine = torch::empty({range.size()}, torch::kDouble);
    comm().reduce_scatter(full, mine, ReduceOp::Sum);
    auto expect = (torch::arange(n, torch::kDouble) * (w * (w + 1) / 2) + (w * (w - 1) / 2))
                      .narrow(0, range.begin, range.size());
    EXPECT_TRUE(torch::allclose(mine, expect)) << "n=" << n;
    auto mean_mine = torch::empty({range.size()}, torch::kDouble);
    comm().reduce_scatter(full, mean_mine, ReduceOp::Mean);
    EXPECT_TRUE(torch::allclose(mean_mine, expect / w)) << "n=" << n;
  }
}

TEST(MpiCollectives, AllGatherAnySize) {
  const int r = comm().rank(), w = comm().size();
  for (int64_t n : {1, 3, 7, 13, 64, 1001}) {
    auto range = shard_range(n, w, r);
    auto mine = torch::arange(range.begin, range.end, torch::kFloat) * 2;
    auto full = torch::full({n}, -1.0f);
    comm().all_gather(mine, full);
    EXPECT_TRUE(torch::equal(full, torch::arange(n, torch::kFloat) * 2)) << "n=" << n;
  }
}

TEST(MpiCollectives, ShardRangesTileWithoutGaps) {
  const int w = comm().size();
  for (int64_t n : {0, 1, 7, 13, 100}) {
    int64_t next = 0;
    for (int k = 0; k < w; ++k) {
      auto s = shard_range(n, w, k);
      EXPECT_EQ(s.begin, next);
      EXPECT_GE(s.size(), 0);
      next = s.end;
    }
    EXPECT_EQ(next, n);
  }
}

TEST(MpiCollectives, BroadcastFromLastRank) {
  const int r = comm().rank(), w = comm().size();
  auto t = torch::full({4}, static_cast<int64_t>(r), torch::kLong);
  comm().broadcast(t, w - 1);
  EXPECT_TRUE(torch::equal(t, torch::full({4}, static_cast<int64_t>(w - 1), torch::kLong)));
  comm().barrier();
}

TEST(MpiCollectives, RuntimeKnowsItsPlace) {
  auto& rt = Runtime::get();
  EXPECT_EQ(rt.rank, comm().rank());
  EXPECT_EQ(rt.world, comm().size());
  EXPECT_EQ(rt.local_world, comm().size());  // one node here
  EXPECT_GE(rt.threads, 1);
  EXPECT_LE(rt.threads * rt.local_world, std::max<int>(rt.local_world, std::thread::hardware_concurrency()));
}

// ZeRO-1: optimizer + EMA bytes per rank <= 1.05 x (unsharded bytes) / W.
TEST(MpiZero, OptimizerStateIsShardedAcrossRanks) {
  const int w = comm().size();
  std::vector<torch::Tensor> params = {torch::randn({1000, 37}), torch::randn({513}), torch::randn({3, 3, 3})};
  int64_t n = 0;
  for (auto& p : params) n += p.numel();
  ShardedAdamW opt(params, comm(), AdamWConfig{});
  const int64_t unsharded = 3 * n * static_cast<int64_t>(sizeof(float));  // exp_avg, exp_avg_sq, EMA
  EXPECT_LE(static_cast<double>(opt.state_bytes()), 1.05 * unsharded / w);
  EXPECT_EQ(opt.padded_numel() % w, 0);
  // Parameters now live in the flat buffer: writing the buffer changes the tensors.
  opt.flat_params().fill_(2.0);
  EXPECT_EQ(params[1][7].item<float>(), 2.0f);
}

// Buckets reduced while backward runs give the same step as one reduction after it.
TEST(MpiZero, OverlappedBucketsGiveTheSameStepAsOneReduction) {
  auto make = [] {
    torch::manual_seed(3);
    return std::vector<torch::Tensor>{torch::randn({50, 7}).requires_grad_(), torch::randn({33}).requires_grad_(),
                                      torch::randn({4, 4}).requires_grad_(), torch::randn({9}).requires_grad_()};
  };
  auto pa = make(), pb = make();
  AdamWConfig small;
  small.bucket_elems = 20;
  small.ema = 0.5;
  ShardedAdamW a(pa, comm(), small), b(pb, comm(), small);
  auto loss = [&](std::vector<torch::Tensor>& ps) {
    torch::Tensor l = torch::zeros({});
    for (size_t i = 0; i < ps.size(); ++i) l = l + (ps[i] * ps[i] * static_cast<double>(comm().rank() + 1 + i)).sum();
    return l;
  };
  for (int step = 0; step < 3; ++step) {
    a.zero_grad();
    b.zero_grad();
    a.overlap_next_backward();
    loss(pa).backward();
    auto ra = a.step(1e-2);
    loss(pb).backward();
    auto rb = b.step(1e-2);
    EXPECT_NEAR(ra.grad_norm, rb.grad_norm, 1e-6 * rb.grad_norm);  // float32 sums in another order
  }
  EXPECT_GE(a.buckets(), 3);
  EXPECT_GT(a.buckets_launched_during_backward(), 0) << "no bucket was reduced during backward";
  EXPECT_EQ(b.buckets_launched_during_backward(), 0);
  EXPECT_TRUE(torch::allclose(a.flat_params(), b.flat_params(), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(a.gather_ema(), b.gather_ema(), 0, 1e-6));
}

// NCCL path: runs on a GPU (any world size), skips cleanly without one.
TEST(NcclCollectives, AllReduceReduceScatterAllGatherOnGpu) {
  if (!nccl_available()) GTEST_SKIP() << "no CUDA device or no NCCL in this build";
  auto& rt = Runtime::get();
  const int dev = rt.local_rank % static_cast<int>(torch::cuda::device_count());
  auto nccl = make_nccl_communicator(dev, 60);
  const int r = nccl->rank(), w = nccl->size();
  auto opts = torch::TensorOptions().device(torch::kCUDA, dev);
  auto t = torch::arange(10, opts.dtype(torch::kFloat)) * (r + 1);
  nccl->all_reduce(t, ReduceOp::Sum);
  EXPECT_TRUE(torch::equal(t.cpu(), torch::arange(10, torch::kFloat) * (w * (w + 1) / 2)));
  for (int64_t n : {1, 7, 13, 1000}) {
    auto full = torch::arange(n, opts.dtype(torch::kDouble)) + r;
    auto range = shard_range(n, w, r);
    auto mine = torch::empty({range.size()}, opts.dtype(torch::kDouble));
    nccl->reduce_scatter(full, mine, ReduceOp::Sum);
    auto expect = (torch::arange(n, torch::kDouble) * w + w * (w - 1) / 2).narrow(0, range.begin, range.size());
    EXPECT_TRUE(torch::allclose(mine.cpu(), expect)) << n;
    auto gathered = torch::empty({n}, opts.dtype(torch::kDouble));
    nccl->all_gather(mine, gathered);
    EXPECT_TRUE(torch::allclose(gathered.cpu(), torch::arange(n, torch::kDouble) * w + w * (w - 1) / 2)) << n;
  }
  auto b = torch::full({3}, static_cast<float>(r), opts.dtype(torch::kFloat));
  nccl->broadcast(b, 0);
  EXPECT_EQ(b.sum().item<float>(), 0.0f);
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto& rt = Runtime::init(&argc, &argv, "cpu");
  if (!rt.is_root()) {  // only rank 0 prints progress; failures still fail the rank's exit code
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int rc = RUN_ALL_TESTS();
  // Every rank must agree on success, so mpirun reports a failure seen on any rank.
  int any_failed = rc != 0;
  MPI_Allreduce(MPI_IN_PLACE, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rt.is_root() && any_failed && rc == 0) std::fprintf(stderr, "a test failed on another rank\n");
  return any_failed;
}
