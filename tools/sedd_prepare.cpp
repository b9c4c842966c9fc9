// sedd-prepare: text / JSONL / Parquet / Arrow files -> HDF5 token shards. Runs under mpirun:
// ranks and their --threads share every input (parts of files, src/data/prepare.h), and the
// shards are the same whatever their number; shards appear in --out only when every rank
// succeeded. --out must be empty or new, or hold an unfinished run with the same arguments (a
// killed run, continued); --overwrite replaces an earlier run's shards there. Exit codes as every
// tool's (tool_common.h): an error that every rank meets is printed once.
#include <boost/program_options.hpp>
#include <chrono>
#include <filesystem>
#include <memory>
#include <cstdio>
#include <iostream>
#include <sys/resource.h>
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
  std::string format, jsonl_field, detokenizer = "none";
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
      "detokenizer", po::value(&detokenizer)->default_value("none"),
      "rewrite each document's text before tokenizing as the SEDD/MDLM papers do for their evaluation corpora: none, "
      "wikitext, ptb, lm1b, lambada or scientific_papers")(
      "skip-empty", po::bool_switch(&opt.skip_empty),
      "drop documents whose text (after --detokenizer) is empty; by default each is kept as one end-of-text token, as "
      "the papers' pipelines keep WikiText's empty lines")(
      "out", po::value(&opt.out)->required(), "output folder for shard-*.h5 (must be empty or new)")(
      "overwrite", po::bool_switch(&opt.overwrite),
      "replace the shard-*.h5 files already in --out (removed only once the new shards are complete)")(
      "shard-tokens", po::value(&opt.shard_tokens)->default_value(int64_t{1} << 24), "maximum tokens per shard")(
      "threads", po::value(&opt.threads)->default_value(rt.threads),
      "tokenizing threads per rank (default: this rank's share of the cores, or SEDD_CORES)")(
      "valid-docs", po::value(&opt.valid_docs)->default_value(0),
      "hold out the last N documents (in input order) as OUT/valid/; the rest goes to OUT/train/")(
      "valid-every", po::value(&opt.valid_every)->default_value(0),
      "hold out every K-th document (the K-th, 2K-th, ...) as OUT/valid/; the rest goes to OUT/train/")(
      "part-bytes", po::value(&opt.part_bytes)->default_value(0),
      "JSONL part size that ranks and threads share (0: 1/256 of the inputs, 64 KiB to 64 MiB)");
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
    opt.detokenizer = parse_detokenizer(detokenizer);
  } catch (const std::exception& e) {
    if (rt.is_root()) std::fprintf(stderr, "sedd-prepare: error: %s (see --help)\n", e.what());
    return 2;
  }

  auto start = std::chrono::steady_clock::now();
  double last_report = -1;
  const bool tty = isatty(STDERR_FILENO);
  // One line for the rank group: rank 0's share, which is about 1/W of the work.
  auto progress = [&](const PrepareProgress& p) {
    if (!rt.is_root()) return;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (s - last_report < (tty ? 0.5 : 10.0)) return;  // a live line on a terminal, sparse lines in logs
    last_report = s;
    const double rate = p.bytes / std::max(s, 1e-9);
    const double eta = rate > 0 ? std::max<double>(0, p.bytes_total - p.bytes) / rate : 0;
    std::fprintf(stderr, "%s[prepare] rank 0: %.1f of %.1f MB, %.1f MB/s, %.0f documents/s, %.0f tokens/s, ETA %d:%02d%s",
                 tty ? "\r" : "", p.bytes / 1e6, p.bytes_total / 1e6, rate / 1e6, p.documents / s, p.tokens / s,
                 static_cast<int>(eta) / 60, static_cast<int>(eta) % 60, tty ? "   " : "\n");
  };
  std::unique_ptr<Preparation> prep;
  PrepareStats mine, total;
  int64_t resumed = 0;
  // Every rank learns whether any failed; only then are shards published (or all discarded).
  // --out is probed first, on its own: no rank may see the probe file while it checks the folder.
  int failed = tools::agree(rt, "sedd-prepare", [&] {
    if (rt.is_root()) tools::check_writable_folder(opt.out, "--out");
  });
  if (failed < 0) failed = tools::agree(rt, "sedd-prepare", [&] { prep = std::make_unique<Preparation>(opt); });
  if (failed < 0) failed = tools::agree(rt, "sedd-prepare", [&] {
    if (rt.is_root()) resumed = prep->open_output();
  });
  if (failed >= 0) return failed;  // nothing of this run is in --out
  if (rt.is_root() && resumed > 0)
    std::fprintf(stderr, "[prepare] continuing the unfinished run in %s: %lld part(s) already done\n", opt.out.c_str(),
                 static_cast<long long>(resumed));
  failed = tools::agree(rt, "sedd-prepare", [&] { mine = prep->tokenize(rt.rank, rt.world, progress); });
  if (failed < 0) failed = tools::agree(rt, "sedd-prepare", [&] { total = prep->write_shards(rt.rank, rt.world); });
  if (failed < 0) failed = tools::agree(rt, "sedd-prepare", [&] {
    if (rt.is_root()) prep->publish();
  });
  if (failed >= 0) {
    // Bad input or options: nothing to continue. Other failures keep the finished parts for a rerun.
    if (rt.is_root()) {
      std::error_code ec;
      std::filesystem::remove_all(prepare_state_dir(opt.out) + "/shards", ec);
      if (failed == tools::kExitBadInput) prep->discard();
    }
    return failed;
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  int64_t local[2] = {mine.bytes, usage.ru_maxrss}, sum_bytes = 0, max_rss = 0;
  MPI_Allreduce(&local[0], &sum_bytes, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);  // every rank exits alike
  MPI_Allreduce(&local[1], &max_rss, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  if (rt.is_root()) {
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const int64_t docs = total.train.documents + total.valid.documents;
    const int64_t tokens = total.train.tokens + total.valid.tokens;
    std::fprintf(stderr,
                 "%s[prepare] %lld documents, %lld tokens, %lld shards in %s (%.1f s, %.0f tokens/s, %.1f MB/s read, "
                 "%d ranks x %d threads, %lld parts, peak RSS %.0f MB)\n",
                 tty ? "\n" : "", static_cast<long long>(docs), static_cast<long long>(tokens),
                 static_cast<long long>(total.train.shards + total.valid.shards), opt.out.c_str(), s,
                 tokens / std::max(s, 1e-9), sum_bytes / 1e6 / std::max(s, 1e-9), rt.world, opt.threads,
                 static_cast<long long>(total.parts), max_rss / 1024.0);
    if (prep->has_valid_split())
      std::fprintf(stderr,
                   "[prepare] train: %lld documents, %lld tokens, %lld shards in %s/train; valid: %lld documents, %lld "
                   "tokens, %lld shards in %s/valid\n",
                   static_cast<long long>(total.train.documents), static_cast<long long>(total.train.tokens),
                   static_cast<long long>(total.train.shards), opt.out.c_str(),
                   static_cast<long long>(total.valid.documents), static_cast<long long>(total.valid.tokens),
                   static_cast<long long>(total.valid.shards), opt.out.c_str());
  }
  return tools::kExitOk;
}
