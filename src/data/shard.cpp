// Token shards; see shard.h.
#include "data/shard.h"

#include <glob.h>

#include <algorithm>
#include <filesystem>
#include <sstream>

#include "io/error.h"
#include "io/fs.h"
#include "io/hdf5.h"

namespace sedd {

ShardInfo read_shard_info(const std::string& path) {
  h5::File f(path, h5::Mode::Read);
  ShardInfo info;
  info.path = path;
  SEDD_CHECK(f.exists("/tokens"), "{}: not a token shard: dataset /tokens is missing", path);
  for (const char* attr : {"vocab_size", "eot_id", "tokenizer", "format_version"})
    SEDD_CHECK(f.has_attr("/", attr), "{}: not a token shard: root attribute '{}' is missing", path, attr);
  int64_t version = f.attr_int("/", "format_version");
  SEDD_CHECK(version == kShardFormatVersion, "{}: shard format_version {} is not supported (expected {})", path,
             version, kShardFormatVersion);
  auto shape = f.shape("/tokens");
  SEDD_CHECK(shape.size() == 1, "{}: /tokens must be 1-D, found {} dimensions", path, shape.size());
  info.tokens = shape[0];
  info.dtype = f.stored_dtype("/tokens");
  SEDD_CHECK(info.dtype == torch::kUInt16 || info.dtype == torch::kUInt32,
             "{}: /tokens has dtype {}, expected uint16 or uint32", path, c10::toString(info.dtype));
  info.vocab_size = f.attr_int("/", "vocab_size");
  info.eot_id = f.attr_int("/", "eot_id");
  info.tokenizer = f.attr_string("/", "tokenizer");
  SEDD_CHECK(info.vocab_size >= 2 && info.eot_id >= 0 && info.eot_id < info.vocab_size,
             "{}: inconsistent attributes vocab_size={} eot_id={}", path, info.vocab_size, info.eot_id);
  SEDD_CHECK(info.dtype == torch::kUInt32 || info.vocab_size <= 65536,
             "{}: vocab_size {} does not fit the uint16 tokens", path, info.vocab_size);
  return info;
}

std::vector<std::string> expand_shard_list(const std::string& spec) {
  std::vector<std::string> files;
  std::stringstream ss(spec);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    if (item.find_first_of("*?[") == std::string::npos) {
      SEDD_CHECK(std::filesystem::exists(item), "{}: no such shard file", item);
      files.push_back(item);
      continue;
    }
    glob_t g{};
    int rc = glob(item.c_str(), 0, nullptr, &g);
    std::vector<std::string> hits(g.gl_pathv, g.gl_pathv + (rc == 0 ? g.gl_pathc : 0));
    globfree(&g);
    SEDD_CHECK(!hits.empty(), "{}: the pattern matches no shard files", item);
    std::sort(hits.begin(), hits.end());
    files.insert(files.end(), hits.begin(), hits.end());
  }
  SEDD_CHECK(!files.empty(), "no shard files given (empty data list '{}')", spec);
  return files;
}

void write_shard(const std::string& path, const torch::Tensor& tokens, int64_t vocab_size, int64_t eot_id,
                 const std::string& tokenizer) {
  auto dtype = vocab_size <= 65536 ? torch::kUInt16 : torch::kUInt32;
  std::string tmp = fs::temp_name(path);
  {
    h5::File f(tmp, h5::Mode::Create);
    f.write("/tokens", tokens.to(torch::kLong).to(dtype), /*chunk_elems=*/1 << 16);
    f.set_attr("/", "vocab_size", vocab_size);
    f.set_attr("/", "eot_id", eot_id);
    f.set_attr("/", "tokenizer", tokenizer);
    f.set_attr("/", "format_version", kShardFormatVersion);
  }
  fs::commit_file(tmp, path);
}

ShardWriter::ShardWriter(std::string dir, std::string prefix, int64_t vocab_size, int64_t eot_id,
                         std::string tokenizer, int64_t shard_tokens)
    : dir_(std::move(dir)), prefix_(std::move(prefix)), tokenizer_(std::move(tokenizer)), vocab_(vocab_size),
      eot_(eot_id), shard_tokens_(shard_tokens) {
  SEDD_CHECK(shard_tokens_ > 0, "--shard-tokens must be positive, got {}", shard_tokens_);
  std::filesystem::create_directories(dir_);
}

void ShardWriter::add_document(const std::vector<int64_t>& ids) {
  for (auto id : ids) {
    buffer_.push_back(id);
    if (static_cast<int64_t>(buffer_.size()) == shard_tokens_) flush();
  }
  buffer_.push_back(eot_);
  if (static_cast<int64_t>(buffer_.size()) == shard_tokens_) flush();
  documents_++;
  tokens_ += static_cast<int64_t>(ids.size()) + 1;
}

void ShardWriter::flush() {
  if (buffer_.empty()) return;
  std::string path = fmt::format("{}/{}-{:05d}.h5", dir_, prefix_, written_.size());
  write_shard(path, torch::tensor(buffer_, torch::kLong), vocab_, eot_, tokenizer_);
  written_.push_back(path);
  buffer_.clear();
}

void ShardWriter::finish() { flush(); }

}  // namespace sedd
