// Corpus preparation; see prepare.h.
#include "data/prepare.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "data/shard.h"
#include "data/tokenizer.h"
#include "io/error.h"

namespace sedd {

namespace stdfs = std::filesystem;

std::string staging_dir(const std::string& out, int rank) { return fmt::format("{}/.staging-r{:03d}", out, rank); }

PrepareStats prepare_shards(const PrepareOptions& opt, int rank, int world,
                            const std::function<void(int64_t, int64_t)>& progress) {
  SEDD_CHECK(!opt.inputs.empty(), "--input: no input files given");
  SEDD_CHECK(!opt.out.empty(), "--out: an output folder is required");
  for (const auto& in : opt.inputs) SEDD_CHECK(stdfs::exists(in), "{}: no such input file", in);
  auto tok = make_tokenizer(opt.tokenizer);
  std::string stage = staging_dir(opt.out, rank);
  stdfs::remove_all(stage);
  ShardWriter writer(stage, fmt::format("shard-r{:03d}", rank), tok->vocab_size(), tok->eot_id(), tok->serialize(),
                     opt.shard_tokens);
  PrepareStats st;
  auto add = [&](const std::string& text, const std::string& where) {
    check_utf8(text, where);
    writer.add_document(tok->encode(text));
  };
  for (size_t i = rank; i < opt.inputs.size(); i += world) {
    const std::string& path = opt.inputs[i];
    std::ifstream in(path, std::ios::binary);
    SEDD_CHECK(in.good(), "{}: cannot open input", path);
    SEDD_CHECK(stdfs::file_size(path) > 0, "{}: empty input file", path);
    if (opt.jsonl_field.empty()) {
      std::string text((std::istreambuf_iterator<char>(in)), {});
      st.bytes += static_cast<int64_t>(text.size());
      add(text, path);
    } else {
      std::string line;
      int64_t line_no = 0, docs_here = 0;
      while (std::getline(in, line)) {
        ++line_no;
        st.bytes += static_cast<int64_t>(line.size()) + 1;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        nlohmann::json j;
        try {
          j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
          fail("{}:{}: not valid JSON ({})", path, line_no, e.what());
        }
        SEDD_CHECK(j.is_object() && j.contains(opt.jsonl_field) && j[opt.jsonl_field].is_string(),
                   "{}:{}: no string field '{}' (set --jsonl-field)", path, line_no, opt.jsonl_field);
        add(j[opt.jsonl_field].get<std::string>(), fmt::format("{}:{}", path, line_no));
        ++docs_here;
        if (progress && line_no % 1000 == 0) progress(st.bytes, writer.tokens());
      }
      SEDD_CHECK(docs_here > 0, "{}: no documents in the file", path);
    }
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
