// Corpus preparation: text / JSONL / Parquet / Arrow files -> token shards (text_source.h reads
// the documents; a detokenizer, detokenizer.h, may rewrite each document's text first). Every
// input is cut into parts that depend on the file only (JSONL byte ranges cut at line starts,
// Parquet row groups, Arrow record batches; a text file is one part); part i
// goes to rank i mod W, where `threads` threads share the rank's parts. Each part's tokens go to
// a part file in the output's state folder (OUT/.sedd-prepare), committed by rename; a killed
// run, rerun with the same arguments, tokenizes only the parts not yet there. Then the parts'
// documents, in input order, are cut into shards of `shard_tokens` tokens (shard k by rank
// k mod W), so the shards are the same whatever the numbers of ranks and threads; a held-out
// split (the last N documents, or every K-th) goes to OUT/valid/ and the rest to OUT/train/.
// Shards are published into the output folder only once every rank has written its own, so a
// failed run leaves nothing that looks like a dataset. The output folder must be empty, hold an
// unfinished run with the same arguments (continued), or hold only an earlier run's shards when
// those are to be replaced (--overwrite): the old ones are removed only after the new ones are
// complete.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/detokenizer.h"
#include "data/text_source.h"

namespace sedd {

class Tokenizer;

struct PrepareOptions {
  std::vector<std::string> inputs;
  std::optional<InputFormat> format;  // every input's format; unset: from each file's extension
  std::string field = "text";         // JSON field (jsonl) or column (parquet, arrow) of the text
  std::string tokenizer = "byte";     // "byte" or a tokenizer.json path
  Detokenizer detokenizer = Detokenizer::None;  // applied to each document's text before tokenizing
  bool skip_empty = false;            // drop documents whose text (detokenized) is empty; kept: end-of-text only
  std::string out;
  int64_t shard_tokens = 1 << 24;
  bool overwrite = false;             // out may hold shards of an earlier run (replaced on publish)
  int threads = 1;                    // tokenizing threads per rank
  int64_t part_bytes = 0;             // JSONL part size; 0: from the inputs' total size
  int64_t valid_docs = 0;             // held out: the last N documents
  int64_t valid_every = 0;            // held out: every K-th document (the K-th, 2K-th, ...)
};

// What tokenize() has done so far on this rank (for progress lines).
struct PrepareProgress {
  int64_t bytes = 0, bytes_total = 0, documents = 0, tokens = 0;
};

struct SplitStats {
  int64_t documents = 0, tokens = 0, shards = 0;
};

struct PrepareStats {
  SplitStats train, valid;    // without a held-out split everything is `train`
  int64_t parts = 0;          // parts of all inputs
  int64_t parts_resumed = 0;  // found complete from an earlier run
  int64_t bytes = 0;          // input bytes this rank read
};

class Preparation {
 public:
  // Checks the options and the inputs and lists their parts (every rank the same list). Throws
  // OptionError / InputError naming the option or file.
  explicit Preparation(PrepareOptions opt);
  ~Preparation();
  // Root only, before any rank tokenizes: checks --out, then continues the unfinished run found
  // there (same arguments) or starts a new one. An unfinished run with other arguments is refused
  // naming the first one that differs, unless --overwrite (which discards it). Returns the number
  // of parts already complete.
  int64_t open_output();
  // This rank's parts that are not complete yet, on opt.threads threads. progress() is called
  // now and then from a reporting thread.
  PrepareStats tokenize(int rank, int world, const std::function<void(const PrepareProgress&)>& progress = {});
  // After every rank's tokenize(): writes this rank's shards (k mod world == rank) into the
  // state folder. Returns the totals of the whole dataset (the same on every rank).
  PrepareStats write_shards(int rank, int world);
  // Root only, after every rank's write_shards(): removes the shards of an earlier run
  // (--overwrite), moves the new ones into place, removes the state folder.
  void publish();
  // Removes the state folder (a run refused for bad input leaves nothing to continue).
  void discard();
  bool has_valid_split() const { return opt_.valid_docs > 0 || opt_.valid_every > 0; }
  const std::string& out() const { return opt_.out; }

 private:
  struct Part {
    int file;
    int64_t index;  // within its file
    int64_t bytes;  // about (for progress)
  };
  std::string part_path(size_t i) const;
  void tokenize_part(size_t i, std::unique_ptr<DocumentSource>& source, int64_t& source_part,
                     PrepareProgress& done);

  PrepareOptions opt_;
  std::vector<InputFormat> formats_;
  std::vector<Part> parts_;
  std::unique_ptr<Tokenizer> tok_;
  std::string manifest_;
};

// The state folder of an unfinished run in `out`.
std::string prepare_state_dir(const std::string& out);
// Throws unless `out` is absent or empty (its state folder aside): new shards must not mix with
// an earlier run's. With `overwrite`, earlier shards (shard-*.h5, also in train/ and valid/) are
// allowed, anything else is not.
void check_output_folder(const std::string& out, bool overwrite);
// Removes the shard-*.h5 files of `out`, `out`/train and `out`/valid (an earlier run's).
void remove_published_shards(const std::string& out);

}  // namespace sedd
