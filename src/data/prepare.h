// Corpus preparation: text / JSONL / Parquet / Arrow files -> token shards (text_source.h reads
// the documents). Each rank tokenizes its share of the inputs (file i goes to rank i mod W) into a
// staging folder; the caller publishes the shards into the output folder only after every rank
// has succeeded, so a failed run leaves nothing that looks like a dataset. The output folder must
// be empty, or hold only an earlier run's shards when those are to be replaced (--overwrite): the
// old ones are removed only after every rank's new ones are complete.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "data/text_source.h"

namespace sedd {

struct PrepareOptions {
  std::vector<std::string> inputs;
  std::optional<InputFormat> format;  // every input's format; unset: from each file's extension
  std::string field = "text";         // JSON field (jsonl) or column (parquet, arrow) of the text
  std::string tokenizer = "byte";     // "byte" or a tokenizer.json path
  std::string out;
  int64_t shard_tokens = 1 << 24;
  bool overwrite = false;             // out may hold shards of an earlier run (replaced on publish)
};

struct PrepareStats {
  int64_t documents = 0, tokens = 0, shards = 0, bytes = 0;
};

// progress(bytes_read, tokens_written) is called now and then.
PrepareStats prepare_shards(const PrepareOptions& opt, int rank, int world,
                            const std::function<void(int64_t, int64_t)>& progress = {});
std::string staging_dir(const std::string& out, int rank);
// Throws unless `out` is absent or empty (its staging folders aside): new shards must not mix with
// an earlier run's. With `overwrite`, earlier shards (shard-*.h5) are allowed, anything else is not.
void check_output_folder(const std::string& out, bool overwrite);
// Removes the shard-*.h5 files of `out` (an earlier run's, before this run's are published).
void remove_published_shards(const std::string& out);
void publish_shards(const std::string& out, int rank);   // staging -> out, then removes staging
void discard_staging(const std::string& out, int rank);

}  // namespace sedd
