// Benchmark (not a test), under mpirun: TokenStream tokens/s per rank against a plain sequential
// HDF5 read of the same shards in the same run.
//   mpirun -np W sedd-bench-reader [DIR] [TOKENS_MILLIONS]
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "data/shard.h"
#include "data/token_stream.h"
#include "distributed/runtime.h"
#include "io/hdf5.h"

using namespace sedd;

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  std::string dir = argc > 1 ? argv[1] : "/tmp/sedd-bench-reader";
  int64_t millions = argc > 2 ? std::stoll(argv[2]) : 32;
  const int64_t shards = 4, per_shard = millions * 1000000 / shards, L = 1024, B = 32 * rt.world;
  if (rt.is_root()) {
    std::filesystem::create_directories(dir);
    for (int s = 0; s < shards; ++s) {
      std::string p = dir + "/bench-" + std::to_string(s) + ".h5";
      if (!std::filesystem::exists(p)) write_shard(p, torch::randint(50000, {per_shard}), 50257, 50256, "byte");
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  auto files = expand_shard_list(dir + "/bench-*.h5");
  // Plain sequential read: every shard front to back in 1M-token pieces (warms the page cache too).
  auto t0 = std::chrono::steady_clock::now();
  int64_t plain_tokens = 0;
  torch::Tensor buf = torch::empty({1 << 20}, torch::kInt32);
  for (int rep = 0; rep < 2; ++rep) {
    plain_tokens = 0;
    t0 = std::chrono::steady_clock::now();
    for (const auto& f : files) {
      h5::File h(f, h5::Mode::Read);
      int64_t n = h.shape("/tokens")[0];
      for (int64_t off = 0; off < n; off += buf.numel()) {
        int64_t c = std::min<int64_t>(buf.numel(), n - off);
        h.read_range("/tokens", off, c, buf);
        plain_tokens += c;
      }
    }
  }
  double plain = plain_tokens / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  TokenStreamConfig tc;
  tc.data = dir + "/bench-*.h5";
  tc.seq_len = L;
  tc.global_batch = B;
  tc.rank = rt.rank;
  tc.world = rt.world;
  TokenStream stream(tc);
  const int64_t batches = 300;
  t0 = std::chrono::steady_clock::now();
  int64_t got = 0;
  for (int64_t b = 0; b < batches; ++b) got += stream.next().numel();
  double reader = got / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double both[2] = {plain, reader}, sum[2];
  MPI_Reduce(both, sum, 2, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
  if (rt.is_root())
    std::printf("ranks %d | plain sequential read %.1f M tokens/s per rank | TokenStream (shuffled windows of %lld, "
                "validated, int64 batches) %.1f M tokens/s per rank | ratio %.2f\n",
                rt.world, sum[0] / rt.world / 1e6, static_cast<long long>(L), sum[1] / rt.world / 1e6, sum[1] / sum[0]);
  return 0;
}
