// Evaluation protocols; see protocol.h.
#include "eval/protocol.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "io/error.h"

namespace sedd {

namespace {

bool is_protocol(const std::string& name) {
  return name == "packed" || name == "sedd" || name == "mdlm-wrap" || name == "mdlm-pad";
}

// Dataset.map(batched=True, num_proc=P, batch_size=B) over n rows: P contiguous parts (the first
// n % P one row longer; P = n when n < P), each in batches of B rows. Returns [first, last) rows.
std::vector<std::pair<int64_t, int64_t>> protocol_map_batches(int64_t n, int64_t procs, int64_t batch_docs) {
  std::vector<std::pair<int64_t, int64_t>> out;
  if (n == 0) return out;
  const int64_t parts = std::min(procs, n), div = n / parts, mod = n % parts;
  for (int64_t p = 0; p < parts; ++p) {
    const int64_t start = div * p + std::min(p, mod), end = start + div + (p < mod ? 1 : 0);
    for (int64_t b = start; b < end; b += batch_docs) out.push_back({b, std::min(b + batch_docs, end)});
  }
  return out;
}

}  // namespace

void ProtocolOptions::validate() const {
  SEDD_CHECK_OPTION(is_protocol(name), "--protocol must be one of {}, got '{}'", protocol_names(), name);
  SEDD_CHECK_OPTION(procs >= 1, "--protocol-procs must be at least 1, got {}", procs);
  SEDD_CHECK_OPTION(batch_docs >= 1, "--protocol-batch-docs must be at least 1, got {}", batch_docs);
}

std::string protocol_names() { return "packed | sedd | mdlm-wrap | mdlm-pad"; }

std::string describe_protocol(const ProtocolOptions& p) {
  if (p.name == "packed")
    return "documents concatenated with the end-of-text id after each, cut into windows of the model's "
           "length; windows cross document boundaries, end-of-text ids count as tokens, no BOS is added, each "
           "shard's partial last window is dropped";
  if (p.name == "sedd")
    return fmt::format(
        "SEDD's data.get_dataset: documents + end-of-text in {} contiguous parts, map batches of {} documents "
        "each concatenated and cut into windows of the model's length, each batch's remainder dropped",
        p.procs, p.batch_docs);
  if (p.name == "mdlm-wrap")
    return fmt::format(
        "MDLM's get_dataset(wrap=True): documents + [EOS] in {} contiguous parts, map batches of {} "
        "documents each concatenated and cut into chunks of length-2, each window [BOS] chunk [EOS], each "
        "batch's remainder dropped",
        p.procs, p.batch_docs);
  return "MDLM's get_dataset(wrap=False): one window per document, [BOS] text[:length-2] [EOS] then "
         "padding, which the network sees but which is not scored";
}

int64_t tokenizer_pad_id(const std::string& tokenizer) {
  if (tokenizer.empty() || tokenizer == "byte") return -1;
  const auto j = nlohmann::json::parse(tokenizer, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return -1;
  if (j.contains("added_tokens") && j["added_tokens"].is_array())
    for (const auto& t : j["added_tokens"])
      if (t.value("content", "") == "[PAD]" && t.contains("id")) return t["id"].get<int64_t>();
  if (j.contains("model") && j["model"].contains("vocab") && j["model"]["vocab"].is_object() &&
      j["model"]["vocab"].contains("[PAD]"))
    return j["model"]["vocab"]["[PAD]"].get<int64_t>();
  return -1;
}

ProtocolIds protocol_ids(const std::string& tokenizer, int64_t eot, int64_t mask_id, bool causal) {
  ProtocolIds ids;
  ids.eot = eot;
  // Only a stored description says which tokenizer it is ("byte" or the tokenizer.json text); older
  // shards name a file that may exist nowhere, converted models store none: no [CLS] then.
  const bool described = tokenizer == "byte" || (!tokenizer.empty() && tokenizer.front() == '{');
  ids.bos = described ? make_tokenizer(tokenizer)->bos_id() : -1;
  ids.pad = tokenizer_pad_id(tokenizer);
  if (ids.pad < 0) ids.pad = mask_id;
  if (ids.pad < 0 && causal) ids.pad = eot;
  return ids;
}

StoredDocuments index_documents(const std::vector<std::vector<int64_t>>& stored) {
  StoredDocuments d;
  int64_t at = 0;
  for (const auto& doc : stored) d.doc_ends.push_back(at += static_cast<int64_t>(doc.size()));
  d.shard_ends.push_back(at);
  return d;
}

int64_t WindowPlan::scored(int64_t k) const {
  return protocol.name == "mdlm-pad" ? windows[k].length + 2 : length;
}

WindowPlan plan_windows(const StoredDocuments& docs, const ProtocolOptions& protocol, const ProtocolIds& ids,
                        int64_t L, const std::function<int64_t(int64_t)>& token_at) {
  protocol.validate();
  WindowPlan plan;
  plan.protocol = protocol;
  plan.ids = ids;
  plan.length = L;
  plan.documents = docs.documents();
  plan.stored_tokens = docs.tokens();
  const auto& name = protocol.name;
  const int64_t D = docs.documents(), T = docs.tokens();
  auto doc_begin = [&](int64_t d) { return d == 0 ? 0 : docs.doc_ends[d - 1]; };
  if (name == "packed") {
    int64_t start = 0;
    for (int64_t end : docs.shard_ends) {
      for (int64_t w = start; w + L <= end; w += L) plan.windows.push_back({w, L});
      start = end;
    }
    plan.scored_tokens = static_cast<int64_t>(plan.windows.size()) * L;
    if (plan.windows.empty())
      plan.no_window_reason = fmt::format("{} shard(s), {} tokens: no full window of seq_len = {} tokens in any shard",
                                          docs.shard_ends.size(), T, L);
    return plan;
  }
  const bool mdlm = name != "sedd";
  SEDD_CHECK_INPUT(!mdlm || L >= (name == "mdlm-pad" ? 2 : 3),
                   "--protocol {} adds [BOS] and [EOS] to every window: the model's length {} is too short", name, L);
  SEDD_CHECK_INPUT(D == 0 || docs.doc_ends.back() == T,
                   "the stored tokens do not end with the end-of-text id ({} tokens after the last one): not a set of "
                   "documents, which --protocol {} needs",
                   T - (D == 0 ? 0 : docs.doc_ends.back()), name);
  if (D == 0) SEDD_CHECK_INPUT(T == 0, "the stored tokens hold no end-of-text id: no document for --protocol {}", name);
  // The content stream: mdlm drops each document's leading [CLS] (MDLM tokenizes without special
  // tokens and adds its own BOS), mdlm-pad also the end-of-text id (the window adds [EOS] after the
  // truncated text).
  const int64_t front = mdlm && ids.bos >= 0 ? 1 : 0, back = name == "mdlm-pad" ? 1 : 0;
  if (mdlm) {
    plan.content_storage.resize(D);
    plan.content_starts.resize(D + 1);
    plan.content_starts[0] = 0;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t b = doc_begin(d), len = docs.doc_ends[d] - b;
      if (front) {
        SEDD_CHECK(token_at, "plan_windows: documents starting with [CLS] need token_at");
        SEDD_CHECK_INPUT(len >= 2 && token_at(b) == ids.bos,
                         "document {} (stored tokens {}..{}) does not start with the tokenizer's [CLS] id {}", d, b,
                         docs.doc_ends[d], ids.bos);
      }
      plan.content_storage[d] = b + front;
      plan.content_starts[d + 1] = plan.content_starts[d] + len - front - back;
    }
  }
  if (name == "mdlm-pad") {
    SEDD_CHECK_INPUT(ids.pad >= 0, "--protocol mdlm-pad needs a pad id: the tokenizer has no [PAD] and the model no "
                                   "mask id to pad with");
    for (int64_t d = 0; d < D; ++d) {
      const int64_t len = std::min(plan.content_starts[d + 1] - plan.content_starts[d], L - 2);
      plan.windows.push_back({plan.content_starts[d], len});
      plan.scored_tokens += len + 2;
    }
    if (plan.windows.empty()) plan.no_window_reason = fmt::format("{} tokens and no document: no window", T);
    return plan;
  }
  // sedd, mdlm-wrap: the map batches, each cut into chunks on its own.
  const int64_t chunk = name == "sedd" ? L : L - 2;
  const auto batches = protocol_map_batches(D, protocol.procs, protocol.batch_docs);
  int64_t longest = 0;
  for (const auto& [first, last] : batches) {
    const int64_t b = mdlm ? plan.content_starts[first] : doc_begin(first);
    const int64_t e = mdlm ? plan.content_starts[last] : docs.doc_ends[last - 1];
    longest = std::max(longest, e - b);
    for (int64_t w = b; w + chunk <= e; w += chunk) plan.windows.push_back({w, chunk});
  }
  plan.scored_tokens = static_cast<int64_t>(plan.windows.size()) * L;
  if (plan.windows.empty())
    plan.no_window_reason = fmt::format(
        "{} documents, {} tokens in {} map batch(es) of at most {} documents: every batch ({} tokens at most) is "
        "shorter than one window's {} tokens: no window",
        D, T, batches.size(), protocol.batch_docs, longest, chunk);
  return plan;
}

void fill_window(const WindowPlan& plan, int64_t k, const StoredReader& read, int64_t* tokens, uint8_t* scored) {
  const EvalWindow& w = plan.windows.at(k);
  const int64_t L = plan.length;
  const auto& name = plan.protocol.name;
  if (name == "packed" || name == "sedd") {
    read(w.begin, w.length, tokens);
    std::fill(scored, scored + L, uint8_t{1});
    return;
  }
  tokens[0] = plan.ids.bos >= 0 ? plan.ids.bos : plan.ids.eot;
  // The content [begin, begin + length), document by document.
  int64_t at = w.begin, out = 1;
  auto d = std::upper_bound(plan.content_starts.begin(), plan.content_starts.end(), at) - plan.content_starts.begin() - 1;
  while (out - 1 < w.length) {
    const int64_t in_doc = plan.content_starts[d + 1] - at, n = std::min(in_doc, w.length - (out - 1));
    if (n > 0) read(plan.content_storage[d] + (at - plan.content_starts[d]), n, tokens + out);
    out += n;
    at += n;
    ++d;
  }
  tokens[out++] = plan.ids.eot;
  std::fill(scored, scored + out, uint8_t{1});
  std::fill(tokens + out, tokens + L, plan.ids.pad);
  std::fill(scored + out, scored + L, uint8_t{0});
}

StoredDataset::StoredDataset(const std::string& glob) : glob_(glob) {
  shards_ = read_shard_set(glob);
  int64_t at = 0;
  for (const auto& s : shards_) docs_.shard_ends.push_back(at += s.tokens);
  readers_.resize(shards_.size());
}

StoredDataset::~StoredDataset() = default;

void StoredDataset::read(int64_t begin, int64_t count, int64_t* out) {
  SEDD_CHECK(begin >= 0 && count >= 0 && begin + count <= tokens(), "StoredDataset::read: [{}, {}) outside {} tokens",
             begin, begin + count, tokens());
  while (count > 0) {
    const size_t s = std::upper_bound(docs_.shard_ends.begin(), docs_.shard_ends.end(), begin) - docs_.shard_ends.begin();
    const int64_t start = s == 0 ? 0 : docs_.shard_ends[s - 1], n = std::min(count, docs_.shard_ends[s] - begin);
    if (!readers_[s]) readers_[s] = std::make_unique<ShardReader>(shards_[s]);
    const int64_t largest = readers_[s]->read(begin - start, n, out);
    SEDD_CHECK_INPUT(largest < shards_[s].vocab_size, "{}: token id {} is outside the vocabulary of {}",
                     shards_[s].path, largest, shards_[s].vocab_size);
    begin += n;
    count -= n;
    out += n;
  }
}

int64_t StoredDataset::token_at(int64_t offset) {
  int64_t t = 0;
  read(offset, 1, &t);
  return t;
}

const StoredDocuments& StoredDataset::documents() {
  if (indexed_) return docs_;
  const int64_t eot = info().eot_id, step = int64_t{1} << 20;
  std::vector<int64_t> buf(static_cast<size_t>(std::min(step, std::max<int64_t>(tokens(), 1))));
  for (int64_t at = 0; at < tokens(); at += step) {
    const int64_t n = std::min(step, tokens() - at);
    read(at, n, buf.data());
    for (int64_t i = 0; i < n; ++i)
      if (buf[i] == eot) docs_.doc_ends.push_back(at + i + 1);
  }
  indexed_ = true;
  return docs_;
}

}  // namespace sedd
