// Multi-rank tests of the MPI communicator, run under mpirun with 2 and 3 ranks.
#include <gtest/gtest.h>

#include "distributed/communicator.h"
#include "distributed/control.h"
#include "distributed/runtime.h"
#include "distributed/zero.h"
#include "io/error.h"

#include <chrono>
#include <functional>
#include <thread>

using namespace sedd;

namespace {
Communicator& comm() {
  static auto c = make_mpi_communicator();
  return *c;
}

// This rank's GPU for the NCCL tests, or -1 with the reason to skip them in `why`: no GPU, or
// fewer GPUs on the node than ranks (ranks sharing a GPU make NCCL fail; the runtime refuses it).
int nccl_test_device(std::string* why) {
  if (!nccl_available()) {
    *why = "no CUDA device or no NCCL in this build";
    return -1;
  }
  auto& rt = Runtime::get();
  try {
    return resolve_device("cuda", rt.local_rank, rt.local_world, static_cast<int>(torch::cuda::device_count())).index();
  } catch (const sedd::Error& e) {
    *why = e.what();
    return -1;
  }
}

// Rank 0 arrives `ms` late: the others must wait for it in a barrier.
double seconds_in_barrier_with_late_root(const std::function<void()>& barrier, int ms) {
  if (Runtime::get().rank == 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
  auto t0 = std::chrono::steady_clock::now();
  barrier();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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

TEST(MpiCollectives, BarrierWaitsForEveryRank) {
  if (comm().size() < 2) GTEST_SKIP() << "multi-rank test: run under mpirun with at least 2 ranks";
  const double waited = seconds_in_barrier_with_late_root([] { comm().barrier(); }, 300);
  if (comm().rank() != 0) EXPECT_GT(waited, 0.2) << "the barrier did not wait for the late rank";
}

TEST(MpiCollectives, RuntimeKnowsItsPlace) {
  auto& rt = Runtime::get();
  EXPECT_EQ(rt.rank, comm().rank());
  EXPECT_EQ(rt.world, comm().size());
  EXPECT_EQ(rt.local_world, comm().size());  // one node here
  EXPECT_GE(rt.threads, 1);
  EXPECT_LE(rt.threads * rt.local_world, std::max<int>(rt.local_world, std::thread::hardware_concurrency()));
}

std::vector<ParamSpec> specs(const std::vector<torch::Tensor>& ps) {
  std::vector<ParamSpec> out;
  for (size_t i = 0; i < ps.size(); ++i) out.push_back({"p" + std::to_string(i), ps[i], true});
  return out;
}

torch::Tensor zero_loss() { return torch::zeros({}, torch::kDouble); }

// ZeRO-1: optimizer + EMA bytes per rank <= 1.05 x (unsharded bytes) / W.
TEST(MpiZero, OptimizerStateIsShardedAcrossRanks) {
  const int w = comm().size();
  std::vector<torch::Tensor> params = {torch::randn({1000, 37}), torch::randn({513}), torch::randn({3, 3, 3})};
  int64_t n = 0;
  for (auto& p : params) n += p.numel();
  AdamWConfig cfg;
  cfg.bucket_elems = 500;  // buckets {27 + 513} and {37000}
  ShardedAdamW opt(specs(params), comm(), cfg);
  const int64_t unsharded = 3 * n * static_cast<int64_t>(sizeof(float));  // exp_avg, exp_avg_sq, EMA
  EXPECT_LE(static_cast<double>(opt.state_bytes()), 1.05 * unsharded / w);
  EXPECT_GE(opt.buckets(), 2);
  // The pieces of all ranks tile the parameter vector exactly once.
  std::vector<int64_t> mine;
  for (const auto& p : opt.own_pieces()) mine.insert(mine.end(), {p.param_index, p.count});
  auto all = torch::zeros({n}, torch::kLong);
  for (size_t i = 0; i < mine.size(); i += 2) all.narrow(0, mine[i], mine[i + 1]).add_(1);
  comm().all_reduce(all, ReduceOp::Sum);
  EXPECT_TRUE((all == 1).all().item<bool>()) << "pieces overlap or leave gaps";
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
  ShardedAdamW a(specs(pa), comm(), small), b(specs(pb), comm(), small);
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
    auto ra = a.step(1e-2, zero_loss());
    loss(pb).backward();
    auto rb = b.step(1e-2, zero_loss());
    double na = ra.grad_norm.item<double>(), nb = rb.grad_norm.item<double>();
    EXPECT_NEAR(na, nb, 1e-6 * nb);  // float32 sums in another order
  }
  EXPECT_GE(a.buckets(), 3);
  EXPECT_GT(a.buckets_launched_during_backward(), 0) << "no bucket was reduced during backward";
  EXPECT_EQ(b.buckets_launched_during_backward(), 0);
  EXPECT_TRUE(torch::allclose(a.flat_params(), b.flat_params(), 0, 1e-6));
  EXPECT_TRUE(torch::allclose(a.gather_ema(), b.gather_ema(), 0, 1e-6));
}

// One AdamW step on the shards equals torch's own AdamW on the whole vector (mean gradient over
// ranks), with decay only where asked, clipping, and the EMA with SEDD's warm-up.
TEST(MpiZero, StepMatchesAdamWWithClippingDecayAndEmaWarmup) {
  const int w = comm().size(), r = comm().rank();
  torch::manual_seed(11);
  std::vector<torch::Tensor> init = {torch::randn({30, 5}, torch::kDouble), torch::randn({17}, torch::kDouble)};
  std::vector<torch::Tensor> ps;
  for (auto& t : init) ps.push_back(t.clone().requires_grad_());
  AdamWConfig cfg;
  cfg.weight_decay = 0.1;
  cfg.grad_clip = 0.5;
  cfg.ema = 0.999;
  cfg.bucket_elems = 40;
  std::vector<ParamSpec> sp = {{"matrix", ps[0], true}, {"bias", ps[1], false}};
  ShardedAdamW opt(sp, comm(), cfg);
  // Reference: torch AdamW on copies, with the mean of every rank's gradient, clipped.
  std::vector<torch::Tensor> ref;
  for (auto& t : init) ref.push_back(t.clone().requires_grad_());
  torch::optim::AdamW decayed({ref[0]}, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  torch::optim::AdamW plain({ref[1]}, torch::optim::AdamWOptions(1e-2).weight_decay(0.0));
  std::vector<torch::Tensor> ema;
  for (auto& t : init) ema.push_back(t.clone());
  for (int step = 1; step <= 4; ++step) {
    opt.zero_grad();
    auto scale = [&](int rank) { return static_cast<double>(rank + 1) * step; };
    ((ps[0] * ps[0]).sum() * scale(r) + ps[1].sum() * scale(r)).backward();
    auto st = opt.step(1e-2, zero_loss());
    // Reference gradients: the mean over ranks of each rank's gradient.
    double mean_scale = 0;
    for (int k = 0; k < w; ++k) mean_scale += scale(k) / w;
    torch::NoGradGuard ng;
    auto g0 = 2 * ref[0] * mean_scale, g1 = torch::ones_like(ref[1]) * mean_scale;
    double norm = std::sqrt((g0 * g0).sum().item<double>() + (g1 * g1).sum().item<double>());
    EXPECT_NEAR(st.grad_norm.item<double>(), norm, 1e-9 * norm);
    double clip = norm > 0.5 ? 0.5 / (norm + 1e-6) : 1.0;
    ref[0].mutable_grad() = g0 * clip;
    ref[1].mutable_grad() = g1 * clip;
    decayed.step();
    plain.step();
    double d = std::min(0.999, (1.0 + step) / (10.0 + step));
    for (int i = 0; i < 2; ++i) ema[i] = d * ema[i] + (1 - d) * ref[i];
  }
  EXPECT_DOUBLE_EQ(opt.steps_taken(), 4.0);
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(torch::allclose(ps[i], ref[i], 1e-7, 1e-9)) << i << "\n" << ps[i] - ref[i];
  auto full_ema = opt.gather_ema();
  auto expect_ema = torch::cat({ema[0].reshape({-1}), ema[1]});
  EXPECT_TRUE(torch::allclose(full_ema, expect_ema, 1e-7, 1e-9)) << (full_ema - expect_ema).abs().max();
}

// A non-finite loss on any rank skips the update everywhere: weights, EMA and step count stay.
TEST(MpiZero, NonFiniteLossOrGradientSkipsTheStep) {
  torch::manual_seed(5);
  std::vector<torch::Tensor> ps = {torch::randn({64}).requires_grad_()};
  AdamWConfig cfg;
  cfg.bucket_elems = 16;
  ShardedAdamW opt(specs(ps), comm(), cfg);
  auto train_step = [&](double loss_add, bool nan_grad) {
    opt.zero_grad();
    opt.overlap_next_backward();
    auto l = (ps[0] * ps[0]).sum();
    if (nan_grad && comm().rank() == comm().size() - 1) l = l * std::nan("");
    l.backward();
    auto local = torch::full({}, loss_add, torch::kDouble);
    return opt.step(1e-2, local);
  };
  auto ok = train_step(1.0, false);
  EXPECT_EQ(ok.skipped.item<float>(), 0.0f);
  EXPECT_DOUBLE_EQ(ok.loss_sum.item<double>(), comm().size());
  auto before = ps[0].detach().clone(), ema_before = opt.gather_ema();
  for (bool nan_grad : {false, true}) {
    auto st = train_step(nan_grad ? 1.0 : (comm().rank() == 0 ? std::nan("") : 1.0), nan_grad);
    EXPECT_EQ(st.skipped.item<float>(), 1.0f) << (nan_grad ? "NaN gradient" : "NaN loss");
    EXPECT_TRUE(torch::equal(ps[0].detach(), before)) << "a skipped step changed the weights";
    EXPECT_TRUE(torch::equal(opt.gather_ema(), ema_before)) << "a skipped step changed the EMA";
    EXPECT_DOUBLE_EQ(opt.steps_taken(), 1.0);
  }
  EXPECT_EQ(train_step(1.0, false).skipped.item<float>(), 0.0f);
  EXPECT_FALSE(torch::equal(ps[0].detach(), before));
  EXPECT_DOUBLE_EQ(opt.steps_taken(), 2.0);
  // discard() abandons a step whose buckets are in flight; the next step is unaffected.
  opt.zero_grad();
  opt.overlap_next_backward();
  (ps[0] * 3).sum().backward();
  opt.discard();
  EXPECT_EQ(train_step(1.0, false).skipped.item<float>(), 0.0f);
}

TEST(MpiCollectives, EqualChunkCollectivesInPlace) {
  const int r = comm().rank(), w = comm().size();
  const int64_t c = 5;
  auto full = torch::arange(c * w, torch::kFloat) + 100 * r;
  auto mine = torch::empty({c}, torch::kFloat);
  comm().reduce_scatter_async(full, mine, ReduceOp::Mean, "test")->wait();
  auto expect = torch::arange(r * c, (r + 1) * c, torch::kFloat) + 100.0f * (w - 1) / 2.0f;
  EXPECT_TRUE(torch::allclose(mine, expect));
  auto buf = torch::full({c * w}, -1.0f);
  buf.narrow(0, r * c, c).fill_(static_cast<float>(r));
  auto own = buf.narrow(0, r * c, c);
  comm().all_gather_async(own, buf, "test")->wait();
  for (int k = 0; k < w; ++k) EXPECT_TRUE((buf.narrow(0, k * c, c) == k).all().item<bool>()) << k;
  // Mis-sized buffers are refused, naming the collective.
  auto bad = torch::empty({c + 1});
  try {
    comm().reduce_scatter_async(full, bad, ReduceOp::Sum, "gradient bucket 3");
    ADD_FAILURE() << "no error";
  } catch (const sedd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("gradient bucket 3"), std::string::npos) << e.what();
  }
}

TEST(MpiControlPlane, SumsVotesAgreementAndGather) {
  ControlPlane cp;
  const int r = cp.rank(), w = cp.size();
  EXPECT_DOUBLE_EQ(cp.sum(static_cast<double>(r + 1), "test"), w * (w + 1) / 2.0);
  EXPECT_DOUBLE_EQ(cp.max(static_cast<double>(r), "test"), w - 1.0);
  EXPECT_TRUE(cp.any(r == w - 1, "test"));
  EXPECT_FALSE(cp.any(false, "test"));
  // A vote started at one step is read at the next; every rank sees the same result.
  ControlPlane::Vote vote(cp);
  EXPECT_FALSE(vote.result());
  vote.start(r == w - 1 ? 10 : r);  // the largest value wins (signal numbers)
  EXPECT_EQ(vote.result(), 10);
  vote.start(false);
  EXPECT_FALSE(vote.result());
  // Agreement: the failing rank throws its own message, the others name the step that failed.
  try {
    cp.agree(r == 0 ? "disk full" : "", "writing the checkpoint");
    ADD_FAILURE() << "no error on rank " << r;
  } catch (const sedd::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find(r == 0 ? "disk full" : "writing the checkpoint failed on another rank"), std::string::npos) << msg;
  }
  EXPECT_NO_THROW(cp.agree("", "nothing"));
  std::vector<int64_t> mine(r + 1, r);
  auto all = cp.gather_to_root(mine, "test");
  if (r == 0) {
    std::vector<int64_t> expect;
    for (int k = 0; k < w; ++k) expect.insert(expect.end(), k + 1, k);
    EXPECT_EQ(all, expect);
  } else {
    EXPECT_TRUE(all.empty());
  }
}

// The MPI backend refuses device tensors with one clear message (not a host/device pointer mix-up).
TEST(MpiCollectivesGpu, CudaTensorsAreRefusedByTheMpiBackend) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto t = torch::ones({4}, torch::TensorOptions().device(torch::kCUDA));
  try {
    comm().all_reduce(t, ReduceOp::Sum);
    ADD_FAILURE() << "a CUDA tensor went through MPI";
  } catch (const sedd::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("all_reduce got a tensor on cuda:0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("NCCL communicator"), std::string::npos) << msg;
  }
}

// NCCL path: runs on a GPU (any world size), skips cleanly without one.
TEST(NcclCollectives, AllReduceReduceScatterAllGatherOnGpu) {
  std::string why;
  const int dev = nccl_test_device(&why);
  if (dev < 0) GTEST_SKIP() << why;
  auto& rt = Runtime::get();
  Watchdog dog(60, rt.rank, rt.host);
  auto nccl = make_nccl_communicator(dev, &dog);
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
  // Equal chunks in place, asynchronous: the compute stream waits, the host does not.
  const int64_t c = 6;
  auto buf = torch::full({c * w}, static_cast<float>(r), opts.dtype(torch::kFloat));
  auto own = buf.narrow(0, r * c, c);
  nccl->all_gather_async(own, buf, "test")->wait();
  for (int k = 0; k < w; ++k) EXPECT_TRUE((buf.narrow(0, k * c, c).cpu() == k).all().item<bool>()) << k;
  auto b = torch::full({3}, static_cast<float>(r), opts.dtype(torch::kFloat));
  nccl->broadcast(b, 0);
  EXPECT_EQ(b.sum().item<float>(), 0.0f);
  // barrier() holds the host back until every rank arrives (a device all-reduce would not).
  const double waited = seconds_in_barrier_with_late_root([&] { nccl->barrier(); }, 300);
  if (w > 1 && r != 0) EXPECT_GT(waited, 0.2) << "the NCCL communicator's barrier did not wait for the late rank";
  // A host tensor handed to NCCL is a clear error, not a bad pointer.
  auto host = torch::ones({3});
  try {
    nccl->all_reduce(host, ReduceOp::Sum);
    ADD_FAILURE() << "a CPU tensor went to NCCL";
  } catch (const sedd::Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("all_reduce got a tensor on cpu"), std::string::npos) << msg;
    EXPECT_NE(msg.find("control plane"), std::string::npos) << msg;
  }
}

// ZeRO on NCCL: the same step as on MPI (CPU) for the same parameters and gradients.
TEST(NcclZeroGpu, ShardedStepOnGpuMatchesTheCpuStep) {
  std::string why;
  const int dev = nccl_test_device(&why);
  if (dev < 0) GTEST_SKIP() << why;
  auto& rt = Runtime::get();
  Watchdog dog(60, rt.rank, rt.host);
  auto nccl = make_nccl_communicator(dev, &dog);
  auto make = [](torch::Device d) {
    torch::manual_seed(9);
    return std::vector<torch::Tensor>{torch::randn({40, 9}).to(d).requires_grad_(), torch::randn({21}).to(d).requires_grad_()};
  };
  auto pc = make(torch::kCPU), pg = make(torch::Device(torch::kCUDA, dev));
  AdamWConfig cfg;
  cfg.bucket_elems = 50;
  cfg.weight_decay = 0.01;
  ShardedAdamW oc(specs(pc), comm(), cfg), og(specs(pg), *nccl, cfg);
  for (int step = 0; step < 3; ++step) {
    for (auto* o : {&oc, &og}) o->zero_grad(), o->overlap_next_backward();
    ((pc[0] * pc[0]).sum() + pc[1].sum() * 3).backward();
    ((pg[0] * pg[0]).sum() + pg[1].sum() * 3).backward();
    auto a = oc.step(1e-2, zero_loss()), b = og.step(1e-2, zero_loss().cuda());
    EXPECT_NEAR(a.grad_norm.item<double>(), b.grad_norm.item<double>(), 1e-5 * a.grad_norm.item<double>());
  }
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(torch::allclose(pc[i].detach(), pg[i].detach().cpu(), 1e-5, 1e-6)) << i;
  EXPECT_TRUE(torch::allclose(oc.gather_ema(), og.gather_ema().cpu(), 1e-5, 1e-6));
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
