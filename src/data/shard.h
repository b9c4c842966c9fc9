// Token shards (docs/DESIGN.md, "Token shards"): one HDF5 file each, dataset /tokens (1-D, uint16
// when the vocabulary fits, else uint32, chunked), root attributes vocab_size, eot_id, tokenizer
// ("byte" or the whole tokenizer.json text, so the data carries its tokenizer), tokenizer_hash,
// format_version. Writers commit a shard by rename, so a crash never leaves a file that looks
// complete; readers validate every attribute before use.
#pragma once
#include <torch/torch.h>
#include <memory>
#include <string>
#include <vector>

namespace sedd {

constexpr int64_t kShardFormatVersion = 1;

struct ShardInfo {
  std::string path;
  int64_t tokens = 0;
  int64_t vocab_size = 0;
  int64_t eot_id = 0;
  std::string tokenizer;  // "byte" or tokenizer.json text
  torch::Dtype dtype = torch::kUInt16;
};

// Opens and validates one shard's header (not its tokens).
ShardInfo read_shard_info(const std::string& path);

// Expands a comma-separated list of paths and globs into sorted, existing files; throws when
// a pattern matches nothing.
std::vector<std::string> expand_shard_list(const std::string& spec);

// The headers of the shards `spec` names (expand_shard_list), which must all share the first one's
// vocabulary, end-of-text id and tokenizer (InputError naming the one that differs).
std::vector<ShardInfo> read_shard_set(const std::string& spec);

// Random access to one shard's tokens. HDF5 is asked once, at open, where /tokens lies in the
// file (contiguous, or an index of unfiltered chunks); the file is memory-mapped and windows are
// widened to int64 straight from the page cache, with no HDF5 call or syscall per window. Datasets with filters (compression) or a
// foreign byte order fall back to HDF5 reads.
class ShardReader {
 public:
  explicit ShardReader(const ShardInfo& info);
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  // Tokens [offset, offset + count) into out; returns the largest id read (validation for free).
  int64_t read(int64_t offset, int64_t count, int64_t* out);

 private:
  struct Extent {
    int64_t first_token, tokens, file_offset;
  };
  ShardInfo info_;
  const unsigned char* map_ = nullptr;
  size_t map_size_ = 0;
  int elem_ = 2;                 // bytes per token
  std::vector<Extent> extents_;  // sorted by first_token; empty -> HDF5 fallback
  std::unique_ptr<class H5Fallback> fallback_;
};

// Accumulates documents and writes shards of at most `shard_tokens` tokens each as
// <dir>/<prefix>-NNNNN.h5.
class ShardWriter {
 public:
  ShardWriter(std::string dir, std::string prefix, int64_t vocab_size, int64_t eot_id, std::string tokenizer,
              int64_t shard_tokens);
  void add_document(const std::vector<int64_t>& ids);  // appends ids + eot
  void finish();                                       // writes the last partial shard
  int64_t documents() const { return documents_; }
  int64_t tokens() const { return tokens_; }
  const std::vector<std::string>& written() const { return written_; }

 private:
  void flush();
  std::string dir_, prefix_, tokenizer_;
  int64_t vocab_, eot_, shard_tokens_;
  std::vector<int64_t> buffer_;
  int64_t documents_ = 0, tokens_ = 0;
  std::vector<std::string> written_;
};

// Writes one shard directly (tests and tools): tokens as given, attributes as given.
void write_shard(const std::string& path, const torch::Tensor& tokens, int64_t vocab_size, int64_t eot_id,
                 const std::string& tokenizer);

}  // namespace sedd
