// Corpus preparation; see prepare.h.
#include "data/prepare.h"

#include <filesystem>

#include "data/shard.h"
#include "data/text_source.h"
#include "data/tokenizer.h"
#include "io/error.h"

namespace sedd {

namespace stdfs = std::filesystem;

std::string staging_dir(const std::string& out, int rank) { return fmt::format("{}/.staging-r{:03d}", out, rank); }

PrepareStats prepare_shards(const PrepareOptions& opt, int rank, int world,
                            const std::function<void(int64_t, int64_t)>& progress) {
  SEDD_CHECK(!opt.inputs.empty(), "--input: no input files given");
  SEDD_CHECK(!opt.out.empty(), "--out: an output folder is required");
  auto format_of = [&](const std::string& path) { return opt.format ? *opt.format : input_format_of(path); };
  for (const auto& in : opt.inputs) {
    SEDD_CHECK(stdfs::exists(in), "{}: no such input file", in);
    check_format_supported(in, format_of(in));
  }
  auto tok = make_tokenizer(opt.tokenizer);
  std::string stage = staging_dir(opt.out, rank);
  stdfs::remove_all(stage);
  ShardWriter writer(stage, fmt::format("shard-r{:03d}", rank), tok->vocab_size(), tok->eot_id(), tok->serialize(),
                     opt.shard_tokens);
  PrepareStats st;
  std::string text;
  for (size_t i = rank; i < opt.inputs.size(); i += world) {
    const std::string& path = opt.inputs[i];
    SEDD_CHECK(stdfs::file_size(path) > 0, "{}: empty input file", path);
    auto docs = open_documents(path, format_of(path), opt.field);
    int64_t docs_here = 0;
    while (docs->next(text)) {
      check_utf8(text, docs->where());
      writer.add_document(tok->encode(text));
      if (progress && ++docs_here % 1000 == 0) progress(st.bytes + docs->bytes_read(), writer.tokens());
    }
    SEDD_CHECK(docs_here > 0, "{}: no documents in the file", path);
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
