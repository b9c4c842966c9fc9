// sedd-prepare: text / JSONL / Parquet / Arrow files -> HDF5 token shards. Runs under mpirun
// (ranks split the inputs); shards appear in --out only when every rank succeeded. --out must be
// empty or new; --overwrite replaces an earlier run's shards there. Exit codes as every tool's
// (tool_common.h): an error that every rank meets is printed once.
#include <boost/program_options.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <unistd.h>

#include "data/prepare.h"
#include "distributed/runtime.h"
#include "io/error.h"
#include "tool_common.h"

namespace po = boost::program_options;
using namespace sedd;

int main(int argc, char** argv) {
  Runtime& rt = Runtime::init(&argc, &argv, "cpu");
  PrepareOptions opt;
  std::string format, jsonl_field;
  po::options_description desc("sedd-prepare: text / JSONL / Parquet / Arrow -> token shards");
  desc.add_options()("help,h", "show this help")(
      "input", po::value(&opt.inputs)->multitoken()->required(), "input files")(
      "format", po::value(&format),
      "text (a file is one document), jsonl (a JSON object per line), parquet, or arrow (Arrow IPC stream or "
      "file, e.g. Hugging Face datasets' data-*.arrow); default: from each file's extension (.parquet, .arrow, "
      ".jsonl/.json, else text)")(
      "field", po::value(&opt.field)->default_value("text"), "JSON field (jsonl) or string column (parquet, arrow) holding the text")(
      "jsonl-field", po::value(&jsonl_field), "the older spelling of --format jsonl --field NAME")(
      "tokenizer", po::value(&opt.tokenizer)->default_value("byte"), "byte, or PATH/tokenizer.json (byte-level BPE)")(
      "out", po::value(&opt.out)->required(), "output folder for shard-*.h5 (must be empty or new)")(
      "overwrite", po::bool_switch(&opt.overwrite),
      "replace the shard-*.h5 files already in --out (removed only once the new shards are complete)")(
      "shard-tokens", po::value(&opt.shard_tokens)->default_value(int64_t{1} << 24), "maximum tokens per shard");
  try {
    po::variables_map vm;
    po::store(po::command_line_parser(argc, argv).options(desc).positional({}).run(), vm);  // stray words refused
    if (vm.count("help")) {
      if (rt.is_root()) std::cout << desc << "\n";
      return 0;
    }
    po::notify(vm);
    if (!jsonl_field.empty()) {
      if (!vm["field"].defaulted() && opt.field != jsonl_field)
        throw po::error("--jsonl-field and --field name different fields; give one of them");
      opt.field = jsonl_field;
      if (format.empty()) format = "jsonl";
    }
    if (!format.empty()) opt.format = parse_input_format(format);
  } catch (const std::exception& e) {
    if (rt.is_root()) std::fprintf(stderr, "sedd-prepare: error: %s (see --help)\n", e.what());
    return 2;
  }

  auto start = std::chrono::steady_clock::now();
  double last_report = -1;
  const bool tty = isatty(STDERR_FILENO);
  auto progress = [&](int64_t bytes, int64_t tokens) {
    if (!rt.is_root()) return;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (s - last_report < (tty ? 0.2 : 5.0)) return;  // a live line on a terminal, sparse lines in logs
    last_report = s;
    std::fprintf(stderr, "%s[prepare] rank 0: %.1f MB read, %lld tokens, %.0f tokens/s%s", tty ? "\r" : "",
                 bytes / 1e6, static_cast<long long>(tokens), tokens / std::max(s, 1e-9), tty ? "   " : "\n");
  };
  PrepareStats st;
  // Every rank learns whether any failed; only then are shards published (or all discarded).
  // --out is probed first, on its own: no rank may see the probe file while it checks the folder.
  int failed = tools::agree(rt, "sedd-prepare", [&] {
    if (rt.is_root()) tools::check_writable_folder(opt.out, "--out");
  });
  if (failed < 0)
    failed = tools::agree(rt, "sedd-prepare", [&] { st = prepare_shards(opt, rt.rank, rt.world, progress); });
  if (failed >= 0) {
    discard_staging(opt.out, rt.rank);
    return failed;
  }
  if (opt.overwrite) {
    // Every rank's new shards are complete in staging: only now do the old ones go, before any new
    // one is moved in (so no old shard is left among the new ones).
    if (rt.is_root()) remove_published_shards(opt.out);
    MPI_Barrier(MPI_COMM_WORLD);
  }
  publish_shards(opt.out, rt.rank);
  int64_t local[4] = {st.documents, st.tokens, st.shards, st.bytes}, total[4];
  MPI_Allreduce(local, total, 4, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);  // every rank exits alike
  if (rt.is_root()) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "%s[prepare] %lld documents, %lld tokens, %lld shards in %s (%.1f s, %.0f tokens/s, %d ranks)\n",
                 tty ? "\n" : "", static_cast<long long>(total[0]), static_cast<long long>(total[1]), static_cast<long long>(total[2]),
                 opt.out.c_str(), s, total[1] / std::max(s, 1e-9), rt.world);
    if (total[0] == 0) std::fprintf(stderr, "sedd-prepare: error: the inputs hold no documents\n");
  }
  return total[0] == 0 ? tools::kExitBadInput : tools::kExitOk;
}
