// Corpus preparation; see prepare.h.
#include "data/prepare.h"

#include <algorithm>
#include <filesystem>
#include <map>

#include "data/shard.h"
#include "data/text_source.h"
#include "data/tokenizer.h"
#include "io/error.h"

namespace sedd {

namespace stdfs = std::filesystem;

std::string staging_dir(const std::string& out, int rank) { return fmt::format("{}/.staging-r{:03d}", out, rank); }

namespace {
bool is_staging(const stdfs::path& p) { return p.filename().string().rfind(".staging-r", 0) == 0; }
bool is_shard(const stdfs::directory_entry& e) {
  const std::string name = e.path().filename().string();
  return e.is_regular_file() && name.rfind("shard-", 0) == 0 && e.path().extension() == ".h5";
}
}  // namespace

void check_output_folder(const std::string& out, bool overwrite) {
  if (!stdfs::exists(out)) return;
  SEDD_CHECK_OPTION(stdfs::is_directory(out), "--out {}: exists and is not a folder", out);
  // Staging folders are this run's (another rank may have made its own already) or a failed run's.
  std::vector<std::string> shards, others;
  for (const auto& e : stdfs::directory_iterator(out)) {
    if (is_staging(e.path())) continue;
    (is_shard(e) ? shards : others).push_back(e.path().filename().string());
  }
  std::sort(shards.begin(), shards.end());
  std::sort(others.begin(), others.end());
  if (!others.empty())
    fail_option("--out {}: the folder holds '{}'{}, which is not a shard of sedd-prepare; choose an empty or new "
                "folder{}",
                out, others.front(), others.size() > 1 ? fmt::format(" and {} more entries", others.size() - 1) : "",
                overwrite ? " (--overwrite replaces shard-*.h5 files only)" : "");
  if (!shards.empty() && !overwrite)
    fail_option("--out {}: the folder already holds {} shard(s) ({}{}); new shards would mix with them: choose an "
                "empty or new folder, or pass --overwrite to replace them",
                out, shards.size(), shards.front(), shards.size() > 1 ? ", ..." : "");
}

void remove_published_shards(const std::string& out) {
  if (!stdfs::is_directory(out)) return;
  std::vector<stdfs::path> old;
  for (const auto& e : stdfs::directory_iterator(out))
    if (is_shard(e)) old.push_back(e.path());
  for (const auto& p : old) stdfs::remove(p);
}

PrepareStats prepare_shards(const PrepareOptions& opt, int rank, int world,
                            const std::function<void(int64_t, int64_t)>& progress) {
  SEDD_CHECK_OPTION(!opt.inputs.empty(), "--input: no input files given");
  SEDD_CHECK_OPTION(!opt.out.empty(), "--out: an output folder is required");
  auto format_of = [&](const std::string& path) { return opt.format ? *opt.format : input_format_of(path); };
  std::map<std::string, std::string> seen;  // resolved path -> as given
  for (const auto& in : opt.inputs) {
    SEDD_CHECK_INPUT(stdfs::exists(in), "{}: no such input file", in);
    // A file given twice would be tokenized twice (and on two ranks): duplicated documents.
    auto [it, fresh] = seen.emplace(stdfs::weakly_canonical(in).string(), in);
    SEDD_CHECK_OPTION(fresh, "--input: {} is given twice{}", in,
                      it->second == in ? std::string() : fmt::format(" (also as {})", it->second));
    check_format_supported(in, format_of(in));
  }
  check_output_folder(opt.out, opt.overwrite);
  auto tok = make_tokenizer(opt.tokenizer);
  std::string stage = staging_dir(opt.out, rank);
  stdfs::remove_all(stage);
  ShardWriter writer(stage, fmt::format("shard-r{:03d}", rank), tok->vocab_size(), tok->eot_id(), tok->serialize(),
                     opt.shard_tokens);
  PrepareStats st;
  std::string text;
  for (size_t i = rank; i < opt.inputs.size(); i += world) {
    const std::string& path = opt.inputs[i];
    SEDD_CHECK_INPUT(stdfs::file_size(path) > 0, "{}: empty input file", path);
    auto docs = open_documents(path, format_of(path), opt.field);
    int64_t docs_here = 0;
    while (docs->next(text)) {
      check_utf8(text, docs->where());
      writer.add_document(tok->encode(text));
      if (progress && ++docs_here % 1000 == 0) progress(st.bytes + docs->bytes_read(), writer.tokens());
    }
    SEDD_CHECK_INPUT(docs_here > 0, "{}: no documents in the file", path);
    st.bytes += docs->bytes_read();
    if (progress) progress(st.bytes, writer.tokens());
  }
  writer.finish();
  st.documents = writer.documents();
  st.tokens = writer.tokens();
  st.shards = static_cast<int64_t>(writer.written().size());
  return st;
}

void publish_shards(const std::string& out, int rank) {
  std::string stage = staging_dir(out, rank);
  if (!stdfs::exists(stage)) return;
  for (const auto& e : stdfs::directory_iterator(stage))
    stdfs::rename(e.path(), stdfs::path(out) / e.path().filename());
  stdfs::remove_all(stage);
}

void discard_staging(const std::string& out, int rank) {
  std::error_code ec;
  stdfs::remove_all(staging_dir(out, rank), ec);
}

}  // namespace sedd
