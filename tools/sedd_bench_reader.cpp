// Benchmark (not a test), under mpirun: TokenStream tokens/s per rank against a plain sequential
// HDF5 read of the same shards in the same run.
//   mpirun -np W sedd-bench-reader [--tokens N] [--shards S] [--seq-len L] [--batch B] [--batches K]
//                                  [--device cpu|cuda|auto] [--dir PARENT] [--json FILE]
// The shards (N random tokens in S shards) are written into a fresh folder under --dir (default:
// the system's temp folder), read, and removed at the end: a run never reads another run's files.
// --device cuda: batches in page-locked memory, copied to the rank's GPU, as training does. No
// --precision: token batches are integers whatever the network's precision. Bad or unknown
// options exit 2 (tool_common.h).
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "data/token_stream.h"
#include "distributed/runtime.h"
#include "io/hdf5.h"
#include "tool_common.h"

using namespace sedd;
namespace po = boost::program_options;

namespace {

// Tokens/s of reading every shard front to back in 1M-token pieces (twice: the second pass, timed,
// finds the page cache warm, as the stream's reads will). Sets *tokens to what one pass read.
double plain_read(const std::vector<std::string>& files, int64_t* tokens) {
  torch::Tensor buf = torch::empty({1 << 20}, torch::kInt32);
  double secs = 0;
  for (int rep = 0; rep < 2; ++rep) {
    *tokens = 0;
    auto t0 = std::chrono::steady_clock::now();
    for (const auto& f : files) {
      h5::File h(f, h5::Mode::Read);
      int64_t n = h.shape("/tokens")[0];
      for (int64_t off = 0; off < n; off += buf.numel()) {
        int64_t c = std::min<int64_t>(buf.numel(), n - off);
        h.read_range("/tokens", off, c, buf);
        *tokens += c;
      }
    }
    secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return static_cast<double>(*tokens) / secs;
}

}  // namespace

int main(int argc, char** argv) {
  const char* tool = "sedd-bench-reader";
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  int64_t tokens = 32000000, shards = 4, seq_len = 1024, batch = 32, batches = 300;
  std::string device = "cpu", parent = std::filesystem::temp_directory_path().string(), json_out;
  po::options_description desc("sedd-bench-reader: TokenStream against a plain sequential read");
  desc.add_options()("help,h", "show this help")(
      "tokens", po::value(&tokens)->default_value(tokens), "random tokens written, over all shards")(
      "shards", po::value(&shards)->default_value(shards), "shards they are written into")(
      "seq-len", po::value(&seq_len)->default_value(seq_len), "tokens per window")(
      "batch", po::value(&batch)->default_value(batch), "windows per batch on each rank")(
      "batches", po::value(&batches)->default_value(batches), "batches read from the stream")(
      "device", po::value(&device)->default_value(device),
      "cpu | cuda | auto: cuda copies the batches to the rank's GPU from page-locked memory")(
      "dir", po::value(&parent)->default_value(parent), "folder in which the run's own temporary folder is made")(
      "json", po::value(&json_out), "write the figures as JSON");
  if (int rc = tools::parse_options(tool, desc, argc, argv, rt.is_root()); rc >= 0) return rc;
  std::string dir;
  if (int rc = tools::agree(rt, tool, [&] {
        SEDD_CHECK_OPTION(tokens > 0 && shards > 0 && seq_len > 0 && batch > 0 && batches > 0,
                          "--tokens, --shards, --seq-len, --batch and --batches must be positive");
        SEDD_CHECK_OPTION(tokens / shards >= seq_len, "--tokens {} in {} shards hold no window of --seq-len {}",
                          tokens, shards, seq_len);
        rt.select_device(device);
        if (!rt.is_root()) return;
        tools::check_writable(json_out, "--json");
        tools::check_writable_folder(parent, "--dir");
        dir = (std::filesystem::path(parent) / "sedd-bench-reader.XXXXXX").string();
        if (!mkdtemp(dir.data()))
          fail_option("--dir {}: cannot make a folder there ({})", parent, std::strerror(errno));
      });
      rc >= 0)
    return rc;
  int n = static_cast<int>(dir.size());  // rank 0's folder, to every rank
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  dir.resize(static_cast<size_t>(n));
  MPI_Bcast(dir.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  try {
    if (rt.is_root()) {
      for (int64_t s = 0; s < shards; ++s) {
        const int64_t count = tokens / shards + (s < tokens % shards ? 1 : 0);
        write_shard(dir + "/bench-" + std::to_string(s) + ".h5", torch::randint(50000, {count}), 50257, 50256, "byte");
      }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    int64_t plain_tokens = 0;
    const double plain = plain_read(expand_shard_list(dir + "/bench-*.h5"), &plain_tokens);
    TokenStreamConfig tc;
    tc.data = dir + "/bench-*.h5";
    tc.seq_len = seq_len;
    tc.global_batch = batch * rt.world;
    tc.rank = rt.rank;
    tc.world = rt.world;
    tc.pin_memory = rt.device.is_cuda();
    TokenStream stream(tc);
    auto t0 = std::chrono::steady_clock::now();
    int64_t got = 0;
    for (int64_t b = 0; b < batches; ++b) {
      auto x = stream.next();
      if (rt.device.is_cuda()) x = x.to(rt.device, /*non_blocking=*/true);
      got += x.numel();
    }
    if (rt.device.is_cuda()) torch::cuda::synchronize(rt.device.index());
    double reader = got / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double both[2] = {plain, reader}, sum[2];
    MPI_Reduce(both, sum, 2, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rt.is_root()) {
      const double plain_rank = sum[0] / rt.world, reader_rank = sum[1] / rt.world;
      std::printf("ranks %d | %lld tokens in %lld shards | plain sequential read %.1f M tokens/s per rank | "
                  "TokenStream (shuffled windows of %lld, validated, int64 batches%s) %.1f M tokens/s per rank | "
                  "ratio %.2f\n",
                  rt.world, static_cast<long long>(plain_tokens), static_cast<long long>(shards), plain_rank / 1e6,
                  static_cast<long long>(seq_len), rt.device.is_cuda() ? ", copied to the GPU" : "",
                  reader_rank / 1e6, reader_rank / plain_rank);
      if (!json_out.empty()) {
        nlohmann::json j = {{"ranks", rt.world},
                            {"device", rt.device_name()},
                            {"tokens", plain_tokens},
                            {"shards", shards},
                            {"seq_len", seq_len},
                            {"batch_per_rank", batch},
                            {"batches", batches},
                            {"plain_tokens_per_s_per_rank", plain_rank},
                            {"stream_tokens_per_s_per_rank", reader_rank},
                            {"ratio", reader_rank / plain_rank}};
        std::ofstream f(json_out);
        f << j.dump(2) << "\n";
        f.close();
        SEDD_CHECK(!f.fail(), "{}: writing failed (disk full?)", json_out);
      }
    }
  } catch (const std::exception& e) {
    if (rt.is_root()) std::filesystem::remove_all(dir);
    return tools::end_job(rt, tool, e);
  }
  MPI_Barrier(MPI_COMM_WORLD);  // every rank has closed the shards
  if (rt.is_root()) std::filesystem::remove_all(dir);
  return tools::kExitOk;
}
