// Benchmark (not a test): this project's tokenizer against Hugging Face `tokenizers` on the same
// documents, one core each, in one run.
//   sedd-bench-tokenizer --tokenizer FILE --input FILE [--format text|jsonl] [--field text]
//                        [--repeat R] [--python PY] [--json OUT]
// Ours: the documents (read into memory first, not timed) encoded one after another on one
// thread. Theirs: `Tokenizer.encode_batch` on the same documents through the virtualenv's Python
// with TOKENIZERS_PARALLELISM=false and RAYON_NUM_THREADS=1 (one core), without special tokens.
// Both take the best of --repeat passes. Prints tokens/s of each, the ratio, and each one's peak
// RSS; exits 1 when the ids differ (naming the first document that does), 2 for bad options or
// input.
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/text_source.h"
#include "data/tokenizer.h"
#include "io/fs.h"
#include "tool_common.h"

using namespace sedd;
namespace po = boost::program_options;

#ifndef SEDD_DEFAULT_PYTHON
#define SEDD_DEFAULT_PYTHON ""
#endif

namespace {

const char* kHfScript = R"(import json, os, resource, struct, sys, time
from tokenizers import Tokenizer
tok_path, docs_path, ids_path, repeat = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
docs = [json.loads(l) for l in open(docs_path, encoding="utf-8")]
tok = Tokenizer.from_file(tok_path)
best = None
for _ in range(repeat):
    t0 = time.perf_counter()
    enc = tok.encode_batch(docs, add_special_tokens=False)
    s = time.perf_counter() - t0
    best = s if best is None else min(best, s)
with open(ids_path, "wb") as f:
    for e in enc:
        f.write(struct.pack("<q", len(e.ids)))
        f.write(struct.pack("<%di" % len(e.ids), *e.ids))
print(json.dumps({"seconds": best, "tokens": sum(len(e.ids) for e in enc),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
)";

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  const char* tool = "sedd-bench-tokenizer";
  std::string tokenizer, input, format, field = "text", python = SEDD_DEFAULT_PYTHON, json_out;
  int repeat = 3;
  if (const char* env = std::getenv("SEDD_PYTHON")) python = env;
  po::options_description desc("sedd-bench-tokenizer: our tokenizer against Hugging Face tokenizers, one core each");
  desc.add_options()("help,h", "show this help")(
      "tokenizer", po::value(&tokenizer)->required(), "tokenizer.json (byte-level BPE or WordPiece)")(
      "input", po::value(&input)->required(), "corpus file (text: one document; jsonl: one per line)")(
      "format", po::value(&format), "text or jsonl (default: from the extension)")(
      "field", po::value(&field)->default_value(field), "JSON field of the text (jsonl)")(
      "repeat", po::value(&repeat)->default_value(repeat), "passes timed (the best counts)")(
      "python", po::value(&python)->default_value(python), "Python with the tokenizers package ($SEDD_PYTHON)")(
      "json", po::value(&json_out), "write the figures as JSON here");
  if (int rc = tools::parse_options(tool, desc, argc, argv, true); rc >= 0) return rc;
  try {
    SEDD_CHECK_OPTION(repeat >= 1, "--repeat must be at least 1");
    InputFormat fmt_in = format.empty() ? input_format_of(input) : parse_input_format(format);
    SEDD_CHECK_OPTION(fmt_in == InputFormat::Text || fmt_in == InputFormat::Jsonl, "--format: text or jsonl only");
    SEDD_CHECK_INPUT(std::filesystem::exists(input), "{}: no such input file", input);
    std::vector<std::string> docs;
    int64_t bytes = 0;
    {
      auto source = open_documents(input, fmt_in, field);
      std::string text;
      while (source->next(text)) {
        check_utf8(text, source->where());
        bytes += static_cast<int64_t>(text.size());
        docs.push_back(text);
      }
    }
    SEDD_CHECK_INPUT(!docs.empty(), "{}: no documents", input);
    auto tok = make_tokenizer(tokenizer);

    std::vector<std::vector<int64_t>> ours(docs.size());
    double ours_s = 1e300;
    for (int r = 0; r < repeat; ++r) {
      auto fresh = make_tokenizer(tokenizer);  // every pass starts with an empty word cache
      auto t0 = std::chrono::steady_clock::now();
      for (size_t d = 0; d < docs.size(); ++d) ours[d] = fresh->encode(docs[d]);
      ours_s = std::min(ours_s, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    int64_t tokens = 0;
    for (const auto& v : ours) tokens += static_cast<int64_t>(v.size());
    const double ours_rss = peak_rss_mb();
    const double ours_tps = tokens / ours_s;
    std::printf("documents %zu, %.2f MB of text, %lld tokens\n", docs.size(), bytes / 1e6,
                static_cast<long long>(tokens));
    std::printf("sedd   : %12.0f tokens/s on one thread (%.2f MB/s), peak RSS %.0f MB\n", ours_tps,
                bytes / 1e6 / ours_s, ours_rss);

    nlohmann::json report = {{"input", input},           {"tokenizer", tokenizer}, {"documents", docs.size()},
                             {"bytes", bytes},           {"tokens", tokens},       {"sedd_tokens_per_s", ours_tps},
                             {"sedd_peak_rss_mb", ours_rss}, {"repeat", repeat}};
    int rc = tools::kExitOk;
    if (python.empty()) {
      std::printf("tokenizers: not measured (no Python: --python or $SEDD_PYTHON)\n");
    } else {
      auto dir = std::filesystem::temp_directory_path() / fmt::format("sedd-bench-tokenizer-{}", getpid());
      std::filesystem::create_directories(dir);
      {
        std::ofstream docs_out(dir / "docs.jsonl", std::ios::binary);
        for (const auto& d : docs) docs_out << nlohmann::json(d).dump() << "\n";
        std::ofstream(dir / "hf.py") << kHfScript;
      }
      std::string cmd = fmt::format(
          "TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1 '{}' '{}' '{}' '{}' '{}' {} > '{}'", python,
          (dir / "hf.py").string(), tokenizer, (dir / "docs.jsonl").string(), (dir / "ids.bin").string(), repeat,
          (dir / "hf.json").string());
      int status = std::system(cmd.c_str());
      if (status != 0) {
        std::filesystem::remove_all(dir);
        fail("{}: the tokenizers script failed (exit status {}); is `tokenizers` installed there?", python, status);
      }
      auto hf = nlohmann::json::parse(fs::read_text((dir / "hf.json").string()));
      std::ifstream in(dir / "ids.bin", std::ios::binary);
      int64_t first_diff = -1;
      for (size_t d = 0; d < docs.size() && first_diff < 0; ++d) {
        int64_t n = 0;
        in.read(reinterpret_cast<char*>(&n), sizeof n);
        std::vector<int32_t> theirs(static_cast<size_t>(std::max<int64_t>(n, 0)));
        in.read(reinterpret_cast<char*>(theirs.data()), static_cast<std::streamsize>(theirs.size() * 4));
        bool same = in.good() && theirs.size() == ours[d].size();
        for (size_t k = 0; same && k < theirs.size(); ++k) same = theirs[k] == ours[d][k];
        if (!same) first_diff = static_cast<int64_t>(d);
      }
      std::filesystem::remove_all(dir);
      const double hf_tps = hf["tokens"].get<double>() / hf["seconds"].get<double>();
      std::printf("tokenizers: %12.0f tokens/s on one thread (encode_batch, RAYON_NUM_THREADS=1), peak RSS %.0f MB\n",
                  hf_tps, hf["peak_rss_mb"].get<double>());
      std::printf("ratio sedd / tokenizers: %.2fx per core\n", ours_tps / hf_tps);
      std::printf("ids: %s\n", first_diff < 0 ? "identical" : fmt::format("DIFFER from document {}", first_diff).c_str());
      report["tokenizers_tokens_per_s"] = hf_tps;
      report["tokenizers_peak_rss_mb"] = hf["peak_rss_mb"];
      report["ratio"] = ours_tps / hf_tps;
      report["ids_identical"] = first_diff < 0;
      if (first_diff >= 0) rc = tools::kExitFailure;
    }
    if (!json_out.empty()) std::ofstream(json_out) << report.dump(2) << "\n";
    return rc;
  } catch (const std::exception& e) {
    tools::print_error(tool, e.what(), 0);
    return tools::exit_code_of(e);
  }
}
