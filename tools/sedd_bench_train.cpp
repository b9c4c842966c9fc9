// Benchmark (not a test), under mpirun: training tokens/s per rank for a tiny and a small CPU
// config, the share of step time spent in collectives, and optimizer + EMA bytes per rank.
//   mpirun -np W sedd-bench-train [STEPS]
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "data/shard.h"
#include "distributed/communicator.h"
#include "train/trainer.h"

using namespace sedd;

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  int64_t steps = argc > 1 ? std::stoll(argv[1]) : 20;
  std::string dir = "/tmp/sedd-bench-train-" + std::to_string(rt.world);
  if (rt.is_root()) {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    write_shard(dir + "/data.h5", torch::randint(256, {2000000}), 257, 256, "byte");
  }
  MPI_Barrier(MPI_COMM_WORLD);
  auto comm = make_mpi_communicator();
  struct Shape { const char* name; int64_t hidden, heads, blocks, len, batch; };
  for (Shape s : {Shape{"tiny", 128, 4, 2, 128, 16}, Shape{"small", 384, 6, 6, 256, 8}}) {
    TrainingConfig c;
    c.run.dir = dir + "/" + s.name;
    c.run.device = "cpu";
    c.data.train = dir + "/data.h5";
    c.data.seq_len = s.len;
    c.model.hidden_size = s.hidden;
    c.model.n_heads = s.heads;
    c.model.n_blocks = s.blocks;
    c.model.cond_dim = 128;
    c.train.batch_size = s.batch * rt.world;  // the same work per rank at every W
    c.train.steps = steps;
    c.train.log_every = 1000000;
    c.train.warmup = 0;
    c.train.ckpt_every = -1;  // no checkpoints: pure step time
    c.train.bucket_elems = 1 << 20;
    Trainer t(c, rt, *comm, "");
    auto t0 = std::chrono::steady_clock::now();
    std::atomic<int> stop{0};
    t.run(&stop);
    double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double comm_s = t.optimizer().comm_seconds();
    double tokens_per_rank = static_cast<double>(steps * s.batch * s.len) / secs;
    if (rt.is_root())
      std::printf("%-6s W=%d | %lld params | %.0f tokens/s per rank | communication %.1f%% of step time | "
                  "optimizer+EMA %.2f MB per rank | %lld of %lld buckets reduced during backward\n",
                  s.name, rt.world, static_cast<long long>(t.model()->parameter_count()), tokens_per_rank,
                  100 * comm_s / secs, t.optimizer().state_bytes() / 1e6,
                  static_cast<long long>(t.optimizer().buckets_launched_during_backward()),
                  static_cast<long long>(t.optimizer().buckets() * steps));
  }
  if (rt.is_root()) std::filesystem::remove_all(dir);
  return 0;
}
