// Evaluation protocols (docs/DESIGN.md, "Evaluation protocols"): how a dataset's stored documents
// (each one's ids followed by the end-of-text id, shards concatenated) become the windows of the
// model's length L that the likelihood is measured on, reproducing each paper's code token for token:
//  - packed:    each shard's token stream cut into windows of L; each shard's partial last window
//               dropped (this project's own protocol; the default).
//  - sedd:      SEDD's data.get_dataset: the documents split into `procs` contiguous parts (the
//               first n % procs one document longer; fewer parts when there are fewer documents),
//               each part in map batches of `batch_docs` documents; each batch concatenated and cut
//               into windows of L, its remainder dropped.
//  - mdlm-wrap: MDLM's get_dataset(wrap=True): the same batches of the documents' tokens (without a
//               leading [CLS]) + end-of-text, cut into chunks of L-2, each window [BOS] chunk [EOS].
//  - mdlm-pad:  MDLM's get_dataset(wrap=False): one window per document, [BOS] text[:L-2] [EOS] then
//               pad ids up to L; the padding is fed to the network but not scored.
// BOS is the tokenizer's [CLS] when it has one (WordPiece), else the end-of-text id (GPT-2's
// <|endoftext|>); EOS is the end-of-text id.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "data/shard.h"

namespace sedd {

struct ProtocolOptions {
  std::string name = "packed";  // packed | sedd | mdlm-wrap | mdlm-pad
  // sedd, mdlm-wrap: Dataset.map's num_proc. SEDD hard-codes 8; MDLM uses the CPUs of the machine
  // that prepared the data (len(os.sched_getaffinity(0))), so 8 reproduces an 8-CPU preparation.
  int64_t procs = 8;
  int64_t batch_docs = 1000;    // sedd, mdlm-wrap: Dataset.map's batch_size
  // OptionError naming --protocol, --protocol-procs or --protocol-batch-docs.
  void validate() const;
};

// "packed | sedd | mdlm-wrap | mdlm-pad" (for help texts and messages).
std::string protocol_names();
// One sentence saying how the protocol builds its windows (the tools print it and write it to JSON).
std::string describe_protocol(const ProtocolOptions& protocol);

// The ids a protocol adds around or after the documents' tokens.
struct ProtocolIds {
  int64_t eot = -1;  // the end-of-text id (every stored document ends with it)
  int64_t bos = -1;  // the tokenizer's [CLS] that starts every stored document, or -1 (GPT-2 style)
  int64_t pad = -1;  // mdlm-pad's padding id; -1: none (then no protocol may pad)
};

// The id of the tokenizer's [PAD] token, or -1 (none, or the "byte" tokenizer); `tokenizer` is a
// shard's tokenizer attribute (the tokenizer.json text).
int64_t tokenizer_pad_id(const std::string& tokenizer);
// The ids for a dataset stored with `tokenizer` (a shard's attribute) and end-of-text id `eot`: BOS
// is the tokenizer's [CLS] if it has one; the padding is the tokenizer's [PAD], else `mask_id` (MDLM
// adds [PAD] as a new id, which is also its mask id; -1: the model has none), else for a causal
// (autoregressive) model the end-of-text id (padding after the scored tokens never reaches them).
ProtocolIds protocol_ids(const std::string& tokenizer, int64_t eot, int64_t mask_id, bool causal);

// Where the documents lie in a dataset's stored token stream (all shards concatenated).
struct StoredDocuments {
  std::vector<int64_t> shard_ends;  // offset one past each shard's last token
  std::vector<int64_t> doc_ends;    // offset one past each document's end-of-text id
  int64_t tokens() const { return shard_ends.empty() ? 0 : shard_ends.back(); }
  int64_t documents() const { return static_cast<int64_t>(doc_ends.size()); }
};

// In-memory documents as stored (each ending with the end-of-text id), as one shard.
StoredDocuments index_documents(const std::vector<std::vector<int64_t>>& stored);

// A window: `length` tokens of the protocol's content stream from `begin`. The content stream is
// the stored stream for packed and sedd; for mdlm-wrap each document without its leading [CLS], for
// mdlm-pad also without its end-of-text id, concatenated.
struct EvalWindow {
  int64_t begin = 0, length = 0;
};

struct WindowPlan {
  ProtocolOptions protocol;
  ProtocolIds ids;
  int64_t length = 0;                  // L: every window's length with its added ids and padding
  std::vector<EvalWindow> windows;
  int64_t documents = 0, stored_tokens = 0;
  int64_t scored_tokens = 0;           // over all windows: L each, mdlm-pad without its padding
  // When there is no window: why, naming the documents, tokens and what was too short ("... no window").
  std::string no_window_reason;
  // mdlm-wrap, mdlm-pad: storage offset of each document's content and the content stream's
  // offset where each document starts (one more entry: the stream's end).
  std::vector<int64_t> content_storage, content_starts;
  int64_t scored(int64_t k) const;     // scored positions of window k
};

// The protocol's windows of length L over the documents; `token_at(offset)` reads one stored token
// (needed by mdlm-wrap and mdlm-pad when ids.bos >= 0, to check each document's [CLS]). Throws
// InputError when the documents do not fit the protocol (a document without its [CLS], tokens after
// the last end-of-text id, no pad id for mdlm-pad, L too short for the added ids).
WindowPlan plan_windows(const StoredDocuments& docs, const ProtocolOptions& protocol, const ProtocolIds& ids,
                        int64_t length, const std::function<int64_t(int64_t)>& token_at = {});

// Reads `count` stored tokens from offset `begin` into `out`.
using StoredReader = std::function<void(int64_t begin, int64_t count, int64_t* out)>;

// Window k's L token ids into tokens and 1 (scored) or 0 (padding) into scored.
void fill_window(const WindowPlan& plan, int64_t k, const StoredReader& read, int64_t* tokens, uint8_t* scored);

// A dataset's shards read as one stored stream, and its documents found by their end-of-text ids.
class StoredDataset {
 public:
  // Every shard must share the first one's vocabulary, end-of-text id and tokenizer (InputError).
  explicit StoredDataset(const std::string& glob);
  ~StoredDataset();
  StoredDataset(const StoredDataset&) = delete;
  StoredDataset& operator=(const StoredDataset&) = delete;
  const ShardInfo& info() const { return shards_.front(); }
  int64_t tokens() const { return docs_.tokens(); }
  // The documents (scans every token once, on first use; ids beyond the vocabulary: InputError).
  const StoredDocuments& documents();
  // The shards' lengths only (and the documents once documents() has found them).
  const StoredDocuments& shard_layout() const { return docs_; }
  void read(int64_t begin, int64_t count, int64_t* out);
  int64_t token_at(int64_t offset);

 private:
  std::string glob_;
  std::vector<ShardInfo> shards_;
  std::vector<std::unique_ptr<ShardReader>> readers_;
  StoredDocuments docs_;
  bool indexed_ = false;
};

}  // namespace sedd
